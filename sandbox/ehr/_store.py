"""In-memory state of the sandbox EHR: launches, pending approvals, codes, tokens, seen assertion ids.

Everything expires; expired entries are swept on the next write.  One lock
guards it all — the sandbox serves a handful of requests a second at most.
Nothing here is ever logged: codes and tokens are secrets.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, TokenMixin


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


@dataclass(frozen=True)
class LaunchContext:
    """What a grant is about, carried from the launch (or the picker) into every token.

    ``user_id`` is the sandbox clinician (or None for a backend service).
    The SMART context fields follow the token response of SMART App Launch 2.x
    §"Launch context arrives with your access_token".
    """

    user_id: str | None = None
    patient: str | None = None
    encounter: str | None = None
    need_patient_banner: bool = True
    smart_style_url: str | None = None
    fhir_context: tuple[dict[str, str], ...] = ()
    nonce: str | None = None
    launch_id: str | None = None

    def token_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.patient:
            fields["patient"] = self.patient
        if self.encounter:
            fields["encounter"] = self.encounter
        if self.patient or self.encounter:
            fields["need_patient_banner"] = self.need_patient_banner
            if self.smart_style_url:
                fields["smart_style_url"] = self.smart_style_url
        if self.fhir_context:
            fields["fhirContext"] = [dict(item) for item in self.fhir_context]
        return fields


@dataclass
class Launch:
    launch_id: str
    patient: str | None
    encounter: str | None
    client_id: str | None
    need_patient_banner: bool
    expires_at: float
    used: bool = False


@dataclass
class Approval:
    """The user's decision on the approval page, handed to authlib as the grant's "user"."""

    context: LaunchContext
    keep_write: tuple[str, ...] | None = None  # None: everything asked for stays

    def get_user_id(self) -> str | None:
        return self.context.user_id


@dataclass
class Pending:
    """An authorize request waiting on the approval page."""

    pending_id: str
    params: dict[str, str]
    launch_context: LaunchContext
    needs_patient: bool
    expires_at: float


@dataclass
class AuthorizationCode(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    code_challenge_method: str
    context: LaunchContext
    expires_at: float
    used: bool = False
    token_ids: list[str] = field(default_factory=list)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class Token(TokenMixin):
    token_id: str
    client_id: str
    scope: str
    context: LaunchContext
    access_token: str
    issued_at: float
    expires_at: float
    refresh_token: str | None = None
    refresh_expires_at: float = 0.0
    access_revoked: bool = False
    refresh_revoked: bool = False
    grant_type: str = ""
    # The grant this token descends from (first token's id; refreshes inherit it), and whether its
    # refresh token was spent by rotation: presenting a rotated one again revokes the whole family
    # (OAuth 2.0 Security BCP, RFC 9700 §4.14.2: refresh token rotation with replay detection).
    family: str = ""
    rotated: bool = False

    # TokenMixin: authlib asks these of the *refresh* credential.
    def check_client(self, client) -> bool:
        return client.get_client_id() == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.expires_at - time.time()))

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.access_revoked

    def get_user(self) -> LaunchContext:
        return self.context

    def get_client(self):  # pragma: no cover - not used by the grants here
        raise NotImplementedError

    def access_valid(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return not self.access_revoked and now < self.expires_at

    def refresh_valid(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return bool(self.refresh_token) and not self.refresh_revoked and now < self.refresh_expires_at


class Store:
    """The sandbox's memory."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.launches: dict[str, Launch] = {}
        self.pending: dict[str, Pending] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.tokens: dict[str, Token] = {}  # by token_id
        self._by_access: dict[str, str] = {}
        self._by_refresh: dict[str, str] = {}
        self._jtis: dict[tuple[str, str], float] = {}

    def now(self) -> float:
        return self._clock()

    # ------------------------------------------------------------ launches

    def add_launch(
        self,
        patient: str | None,
        encounter: str | None,
        client_id: str | None,
        need_patient_banner: bool,
        lifetime: float,
    ) -> Launch:
        launch = Launch(new_secret(12), patient, encounter, client_id, need_patient_banner, self.now() + lifetime)
        with self._lock:
            self._sweep()
            self.launches[launch.launch_id] = launch
        return launch

    def get_launch(self, launch_id: str | None) -> Launch | None:
        with self._lock:
            launch = self.launches.get(launch_id or "")
            if launch is None or launch.used or launch.expires_at <= self.now():
                return None
            return launch

    def use_launch(self, launch_id: str) -> None:
        with self._lock:
            launch = self.launches.get(launch_id)
            if launch is not None:
                launch.used = True

    # ------------------------------------------------------------ pending approvals

    def add_pending(
        self, params: dict[str, str], context: LaunchContext, needs_patient: bool, lifetime: float
    ) -> Pending:
        pending = Pending(new_secret(), dict(params), context, needs_patient, self.now() + lifetime)
        with self._lock:
            self._sweep()
            self.pending[pending.pending_id] = pending
        return pending

    def pop_pending(self, pending_id: str | None) -> Pending | None:
        with self._lock:
            pending = self.pending.pop(pending_id or "", None)
        if pending is None or pending.expires_at <= self.now():
            return None
        return pending

    # ------------------------------------------------------------ codes

    def add_code(self, code: AuthorizationCode) -> None:
        with self._lock:
            self._sweep()
            self.codes[code.code] = code

    def take_code(
        self, code: str, client_id: str, *, proven: Callable[[AuthorizationCode], bool] | None = None
    ) -> AuthorizationCode | None:
        """The code if it is live and was issued to this client.

        A code presented a second time is refused; when ``proven(record)`` says
        the request also carries the code's PKCE verifier, the tokens issued
        from it (and their refreshed successors) are revoked (RFC 6749 §4.1.2:
        the server "SHOULD revoke ... all tokens previously issued based on
        that authorization code").  Without the verifier the replay is only
        refused: anyone who merely saw a spent code in a URL or a log must not
        be able to log the user out (issue 11).
        """
        with self._lock:
            record = self.codes.get(code)
            if record is None or record.client_id != client_id:
                return None
            if record.used:
                if proven is not None and proven(record):
                    families = {self.tokens[t].family for t in record.token_ids if t in self.tokens}
                    self._revoke_families(families)
                return None
            if record.expires_at <= self.now():
                return None
            return record

    def spend_code(self, record: AuthorizationCode, token_id: str | None = None) -> None:
        with self._lock:
            record.used = True
            if token_id:
                record.token_ids.append(token_id)

    # ------------------------------------------------------------ tokens

    def add_token(self, token: Token) -> None:
        with self._lock:
            self._sweep()
            self.tokens[token.token_id] = token
            self._by_access[token.access_token] = token.token_id
            if token.refresh_token:
                self._by_refresh[token.refresh_token] = token.token_id

    def by_access_token(self, access_token: str) -> Token | None:
        with self._lock:
            token_id = self._by_access.get(access_token)
            return self.tokens.get(token_id) if token_id else None

    def by_refresh_token(self, refresh_token: str) -> Token | None:
        """The live token this refresh token belongs to.  A refresh token already spent by rotation
        is a replay — the old one was stolen, or the new one was — so the whole family is revoked."""
        with self._lock:
            token_id = self._by_refresh.get(refresh_token)
            token = self.tokens.get(token_id) if token_id else None
            if token is not None and token.rotated:
                self._revoke_families({token.family})
                return None
        if token is None or not token.refresh_valid(self.now()):
            return None
        return token

    def revoke_refresh(self, token: Token) -> None:
        """Spend a refresh token by rotation (a replay of it is then detected)."""
        with self._lock:
            token.refresh_revoked = True
            token.rotated = True

    def _revoke_families(self, families: set[str]) -> None:
        families.discard("")
        for token in self.tokens.values():
            if token.family in families:
                token.access_revoked = token.refresh_revoked = True

    # ------------------------------------------------------------ assertion ids

    def remember_jti(self, client_id: str, jti: str, until: float) -> bool:
        """False when this client already used this jti (and it has not expired yet)."""
        with self._lock:
            self._sweep()
            key = (client_id, jti)
            if key in self._jtis:
                return False
            self._jtis[key] = until
            return True

    # ------------------------------------------------------------ housekeeping

    def _sweep(self) -> None:
        now = self.now()
        for name in ("launches", "pending"):
            table = getattr(self, name)
            for key in [k for k, v in table.items() if v.expires_at <= now - 60]:
                del table[key]
        # Spent codes are kept a while longer so a replay can still revoke its tokens.
        for key in [k for k, v in self.codes.items() if v.expires_at <= now - 3600]:
            del self.codes[key]
        for key in [k for k, v in self._jtis.items() if v <= now - 60]:
            del self._jtis[key]
        for token_id in [k for k, t in self.tokens.items() if t.expires_at <= now - 3600 and not t.refresh_valid(now)]:
            token = self.tokens.pop(token_id)
            self._by_access.pop(token.access_token, None)
            if token.refresh_token:
                self._by_refresh.pop(token.refresh_token, None)
