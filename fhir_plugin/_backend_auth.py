"""SMART Backend Services: an access token for a job that runs with no user, and a Session that carries it.

The flow (SMART App Launch 2.x, "Backend Services", and RFC 7523 §2.2):

1. discovery — ``GET {fhir base}/.well-known/smart-configuration`` names the
   ``token_endpoint`` (and, when it says, the auth methods and signing
   algorithms it accepts) — read and checked by ``_smart``, shared with the
   SMART app; the https-or-loopback endpoint rule and the sentences are ours;
2. the client signs a JWT assertion with its private key: header ``alg``
   RS384 or ES384 and the ``kid`` of the key registered at the EHR; claims
   ``iss`` = ``sub`` = client id, ``aud`` = the token URL, ``exp`` no more than
   five minutes ahead, and a ``jti`` never used before (the server refuses a
   replayed one);
3. ``POST`` to the token endpoint: ``grant_type=client_credentials``, the
   scopes, ``client_assertion_type`` = jwt-bearer, ``client_assertion``;
4. the answer's ``access_token`` is used as a Bearer token until shortly
   before ``expires_in`` runs out, then a new one is fetched the same way (a
   backend client gets no refresh token).

Built and sent apart, as in SMART's client-js: ``client_assertion`` and
``token_request_form`` are pure; ``fetch_token`` sends; ``TokenCache`` keeps
the token and fetches a new one when it is near expiry or after the FHIR
server answered 401; ``BearerAuth`` puts it on every request of a
``requests.Session`` and repeats a request once with a new token on a 401.

Which scopes to ask for (issue 12, item 5): a job says what it searches,
reads and creates (``ScopeRequest``); ``scope_candidates`` spells that in SMART
v2 when the server's ``.well-known/smart-configuration`` takes v2 (or says
nothing) and v1 otherwise, with v1 as the one fallback when the token endpoint
refuses v2 with ``invalid_scope`` (Epic grants v1 spellings only);
``negotiated_session`` asks, and the granted ``scope`` string it returns says
which types the job may create (``granted_creates``).

Neither the token nor the assertion is ever logged or put in a message.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey, import_key

from ._errors import LaunchError, ScopeRefused, UsageError
from ._smart import (
    EndpointRule,
    Wording,
    check_endpoint,
    check_token_response,
    configuration_object,
    configuration_url,
    fetch_configuration,
)

__all__ = [
    "ASSERTION_TYPE",
    "MAX_ASSERTION_LIFETIME",
    "SigningKey",
    "Token",
    "TokenCache",
    "BearerAuth",
    "load_signing_key",
    "discover_token_endpoint",
    "client_assertion",
    "token_request_form",
    "fetch_token",
    "generate_signing_key",
    "backend_session",
    "ScopeRequest",
    "scope_candidates",
    "granted_creates",
    "discover_configuration",
    "negotiated_session",
]

log = logging.getLogger("fhir_plugin.auth")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART Backend Services: the assertion's ``exp`` is "no more than five minutes in the future"
MAX_ASSERTION_LIFETIME = 300
#: the two algorithms SMART Backend Services asks servers to support, by key type
_ALG_FOR_KEY = {"RSA": "RS384", "EC": "ES384"}
#: ES384 is ECDSA on P-384 (RFC 7518 §3.4); another curve cannot sign it
_EC_CURVE = "P-384"
#: renew this long before the token runs out (capped at a fifth of its lifetime)
_RENEW_MARGIN = 60.0
#: assumed lifetime when the token response has no ``expires_in``
_DEFAULT_LIFETIME = 300.0
_TOKEN_TRIES = 3
_HTTPS_ONLY = "the {what} {url!r} is not an https URL (plain http is allowed on loopback only)"
#: this module's sentences for the shared SMART checks (``_smart``): they name the URL and the client
_SAY = Wording(
    unreachable="could not read the SMART configuration at {url} ({error})",
    bad_status="the SMART configuration at {url} answered {status}; "
    "the server does not seem to offer SMART Backend Services",
    not_json="the SMART configuration at {url} is not JSON",
    not_object="the SMART configuration at {url} names no token_endpoint",
    missing_endpoint=_HTTPS_ONLY,
    not_absolute=_HTTPS_ONLY,
    plain_http=_HTTPS_ONLY,
    token_not_json="the token endpoint {url} did not answer with JSON",
    no_access_token="the token endpoint {url} answered without an access_token",
    not_bearer="the token endpoint {url} issued a {token_type!r} token, not a bearer token",
    bad_expires_in=None,
)  # a backend token without a readable lifetime gets _DEFAULT_LIFETIME


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs client assertions, with its algorithm and key id."""

    key: RSAKey | ECKey = field(repr=False)
    alg: str
    kid: str

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK (with kid and alg), for registering the client at the EHR."""
        return {**self.key.as_dict(private=False), "kid": self.kid, "alg": self.alg}


def _signing_key(key: Any, kid: str | None, where: str) -> SigningKey:
    if not isinstance(key, (RSAKey, ECKey)):
        raise UsageError(
            f"{where} holds a {getattr(key, 'key_type', 'non-RSA/EC')} key; "
            "SMART Backend Services signs with an RSA (RS384) or EC P-384 (ES384) key"
        )
    if not key.is_private:
        raise UsageError(f"{where} holds a public key; the job needs the private key to sign its assertions")
    if isinstance(key, ECKey) and key.curve_name != _EC_CURVE:
        raise UsageError(f"{where} holds an EC {key.curve_name} key; ES384 needs a P-384 key")
    if isinstance(key, RSAKey) and key.raw_value.key_size < 2048:
        raise UsageError(f"{where} holds a {key.raw_value.key_size}-bit RSA key; use 2048 bits or more")
    # The kid must name the key the EHR has registered; a JWK file usually carries it,
    # otherwise the RFC 7638 thumbprint is the conventional default.
    return SigningKey(key, _ALG_FOR_KEY[key.key_type], kid or key.kid or key.thumbprint())


def generate_signing_key(kind: str = "rsa") -> SigningKey:
    """A new private key for SMART Backend Services: RSA 2048 (RS384, the default EHRs ask for) or EC P-384."""
    key: RSAKey | ECKey = RSAKey.generate_key(2048) if kind == "rsa" else ECKey.generate_key(_EC_CURVE)
    return _signing_key(key, None, "the generated key")


def load_signing_key(path: str | Path, *, kid: str | None = None) -> SigningKey:
    """Read a private key from a PEM file or a JWK JSON file (a single key, or a JWKS holding one private key).

    The algorithm follows the key: RS384 for RSA, ES384 for EC P-384.  ``kid``
    overrides the key id; else the JWK's own ``kid``, else its RFC 7638 thumbprint.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the private key file {p}: {exc.strerror or exc}") from exc
    text = data.lstrip()
    try:
        if text.startswith(b"{"):
            jwk = json.loads(text)
            if isinstance(jwk, dict) and isinstance(jwk.get("keys"), list):
                private = [k for k in jwk["keys"] if isinstance(k, dict) and "d" in k]
                if len(private) != 1:
                    raise UsageError(f"{p} is a JWKS with {len(private)} private keys; name a file with exactly one")
                jwk = private[0]
            if not isinstance(jwk, dict):
                raise UsageError(f"{p} is not a JWK (a JSON object)")
            key = import_key(jwk)
        elif b"PRIVATE KEY-----" in text:
            if b"BEGIN EC PRIVATE KEY" in text:
                key = import_key(data, "EC")
            else:
                try:
                    key = import_key(data, "RSA")
                except (JoseError, ValueError, TypeError):
                    key = import_key(data, "EC")
        else:
            raise UsageError(f"{p} is neither a PEM private key nor a JWK JSON file")
    except UsageError:
        raise
    except (JoseError, ValueError, TypeError) as exc:
        # not the exception text: it could quote key material
        raise UsageError(f"{p} does not hold a usable RSA or EC private key ({type(exc).__name__})") from exc
    return _signing_key(key, kid, str(p))


# ---------------------------------------------------------------- pure parts: the assertion and the form


def client_assertion(
    key: SigningKey,
    client_id: str,
    token_url: str,
    *,
    now: float | None = None,
    lifetime: int = MAX_ASSERTION_LIFETIME,
    jti: str | None = None,
) -> str:
    """The signed JWT that authenticates the client at the token endpoint (SMART Backend Services, RFC 7523).

    A fresh random ``jti`` every call unless one is given (tests only): the
    server keeps the ones it saw until they expire and refuses a replay.
    """
    if not client_id:
        raise UsageError("a backend-services client needs a client id")
    if not 0 < lifetime <= MAX_ASSERTION_LIFETIME:
        raise UsageError(f"the assertion lifetime must be 1-{MAX_ASSERTION_LIFETIME} seconds (SMART Backend Services)")
    issued = int(time.time() if now is None else now)
    header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": jti or secrets.token_urlsafe(24),
    }
    # joserfc refuses RS384/ES384 unless the call names them
    return jwt.encode(header, claims, key.key, algorithms=[key.alg])


def token_request_form(
    key: SigningKey, client_id: str, token_url: str, scope: str, *, now: float | None = None
) -> dict[str, str]:
    """The form body of the client_credentials token request, with a new assertion in it."""
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(key, client_id, token_url, now=now),
    }


def _check_endpoint_url(url: str, what: str) -> str:
    """Refuse a token endpoint that would expose the assertion: https, or plain http on a loopback host only."""
    return check_endpoint(url, what, rule=EndpointRule.HTTPS_OR_LOOPBACK, say=_SAY)


# ---------------------------------------------------------------- sending


def discover_configuration(
    session: requests.Session, fhir_base: str, *, timeout: float = 30.0, alg: str | None = None
) -> dict[str, Any]:
    """``{fhir_base}/.well-known/smart-configuration``, checked for what a backend client needs.

    Refuses a server that says it does not take ``private_key_jwt``, or not
    the key's algorithm, or the client_credentials grant, rather than failing
    later with a less clear answer.
    """
    status, body = fetch_configuration(session, fhir_base, say=_SAY, timeout=timeout)
    config = configuration_object(status, body, base=fhir_base, say=_SAY)
    if not isinstance(config.get("token_endpoint"), str):
        raise _SAY.error(_SAY.not_object, url=configuration_url(fhir_base))
    methods = config.get("token_endpoint_auth_methods_supported")
    if isinstance(methods, list) and "private_key_jwt" not in methods:
        raise LaunchError(f"the token endpoint of {fhir_base} does not accept private_key_jwt client assertions")
    grants = config.get("grant_types_supported")
    if isinstance(grants, list) and "client_credentials" not in grants:
        raise LaunchError(f"the authorization server of {fhir_base} does not offer the client_credentials grant")
    algs = config.get("token_endpoint_auth_signing_alg_values_supported")
    if alg and isinstance(algs, list) and alg not in algs:
        raise LaunchError(
            f"the token endpoint of {fhir_base} does not accept {alg} assertions "
            f"(it names {', '.join(map(str, algs)) or 'none'})"
        )
    return config


def discover_token_endpoint(
    session: requests.Session, fhir_base: str, *, timeout: float = 30.0, alg: str | None = None
) -> str:
    """The token endpoint named by ``{fhir_base}/.well-known/smart-configuration`` (see ``discover_configuration``)."""
    config = discover_configuration(session, fhir_base, timeout=timeout, alg=alg)
    return _check_endpoint_url(config["token_endpoint"], "token endpoint")


@dataclass(frozen=True)
class Token:
    """An access token and when it runs out (``time.monotonic()`` seconds); never shown in repr."""

    access_token: str = field(repr=False)
    expires_at: float
    lifetime: float
    scope: str = ""

    def fresh(self, now: float) -> bool:
        """Still good for a while: not within the renewal margin of its expiry."""
        margin = min(_RENEW_MARGIN, self.lifetime / 5)
        return now < self.expires_at - margin


def _token_error(response: requests.Response, token_url: str, client_id: str) -> LaunchError:
    """One sentence for a refused token request: the OAuth error code and description, never the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    code = body.get("error") if isinstance(body, dict) else None
    desc = body.get("error_description") if isinstance(body, dict) else None
    text = (
        f"{code}" + (f": {' '.join(str(desc).split())[:200]}" if desc else "")
        if code
        else f"status {response.status_code}"
    )
    message = f"the token endpoint {token_url} refused client {client_id!r} ({text})"
    return ScopeRefused(message) if code == "invalid_scope" else LaunchError(message)


def fetch_token(
    session: requests.Session,
    token_url: str,
    key: SigningKey,
    client_id: str,
    scope: str,
    *,
    timeout: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Token:
    """Ask the token endpoint for an access token; a busy (429/5xx) or unreachable endpoint is tried 3 times.

    Every try signs a new assertion: a ``jti`` is good for one request only.
    """
    last: Exception | None = None
    for attempt in range(1, _TOKEN_TRIES + 1):
        form = token_request_form(key, client_id, token_url, scope)
        started = clock()
        try:
            response = session.post(
                token_url, data=form, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            last = exc
            log.debug("token request for client %s failed: %s", client_id, type(exc).__name__)
        else:
            if response.status_code == 200:
                return _read_token(response, token_url, started)
            if response.status_code not in (429, 500, 502, 503, 504):
                raise _token_error(response, token_url, client_id)
            last = _token_error(response, token_url, client_id)
            log.debug("token request for client %s answered %d", client_id, response.status_code)
        if attempt < _TOKEN_TRIES:
            sleep(0.5 * 2 ** (attempt - 1))
    if isinstance(last, LaunchError):
        raise LaunchError(f"{last} after {_TOKEN_TRIES} attempts") from last
    raise LaunchError(
        f"could not reach the token endpoint {token_url} ({type(last).__name__}, {_TOKEN_TRIES} attempts)"
    ) from last


def _read_token(response: requests.Response, token_url: str, started: float) -> Token:
    body = check_token_response(response, say=_SAY, url=token_url)
    try:
        lifetime = float(body.get("expires_in", _DEFAULT_LIFETIME))
    except (TypeError, ValueError):
        lifetime = _DEFAULT_LIFETIME
    lifetime = max(lifetime, 1.0)
    # counted from when the request was sent, so network time only makes us renew earlier
    return Token(body["access_token"], started + lifetime, lifetime, str(body.get("scope") or ""))


class TokenCache:
    """The current access token, fetched on first use, renewed near expiry, dropped on a 401. Thread-safe.

    ``fetch`` is any callable returning a ``Token`` (``fetch_token`` with its
    arguments bound).  Only one thread fetches; the others wait for its token.
    """

    def __init__(
        self, fetch: Callable[[], Token], *, clock: Callable[[], float] = time.monotonic, first: Token | None = None
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Token | None = first  # a token already fetched (``negotiated_session``)
        self.fetches = 0 if first is None else 1

    def __repr__(self) -> str:
        return f"TokenCache(fetches={self.fetches})"

    def get(self) -> str:
        """A token good for a while yet (fetching one if needed)."""
        with self._lock:
            if self._token is None or not self._token.fresh(self._clock()):
                self._token = self._fetch()
                self.fetches += 1
                log.info("access token %d fetched; valid for %.0f s", self.fetches, self._token.lifetime)
            return self._token.access_token

    def invalidate(self, rejected: str) -> None:
        """Forget the token the server rejected (if it is still the current one)."""
        with self._lock:
            if self._token is not None and secrets.compare_digest(self._token.access_token, rejected):
                self._token = None


class BearerAuth(requests.auth.AuthBase):
    """Puts the cache's token on a request; on a 401 renews it once and sends the request again.

    A 401 means the server did not act on the request (RFC 9110 §15.5.2), so
    repeating it is safe even for a transaction.  A second 401 is returned as
    it is, and the FHIR client reports it as an AuthError.
    """

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    def __repr__(self) -> str:
        return "BearerAuth(...)"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.cache.get()}"
        request.register_hook("response", self._on_response)
        return request

    def _on_response(self, response: requests.Response, **send_kwargs: Any) -> requests.Response:
        if response.status_code != 401:
            return response
        sent = response.request
        header = str(sent.headers.get("Authorization", ""))
        log.info("the server answered 401; renewing the access token once")
        self.cache.invalidate(header[len("Bearer ") :])
        _ = response.content  # read the body so the connection goes back to the pool
        response.close()
        again = sent.copy()
        again.headers["Authorization"] = f"Bearer {self.cache.get()}"
        again.hooks = {"response": []}  # the repeat is not repeated again
        answer = response.connection.send(again, **send_kwargs)
        answer.history.append(response)
        answer.request = again
        return answer


def backend_session(
    fhir_base: str,
    client_id: str,
    key: SigningKey,
    scope: str,
    *,
    token_url: str | None = None,
    timeout: float = 30.0,
    session: requests.Session | None = None,
) -> tuple[requests.Session, TokenCache]:
    """A Session that authenticates every request with a backend-services token, and the cache behind it.

    The token endpoint is discovered from the FHIR base unless ``token_url``
    is given.  Discovery and token requests go through their own plain session,
    so no bearer token is ever sent to the authorization server.
    """
    auth_http = requests.Session()
    url = (
        _check_endpoint_url(token_url, "token endpoint")
        if token_url
        else discover_token_endpoint(auth_http, fhir_base, timeout=timeout, alg=key.alg)
    )
    cache = TokenCache(lambda: fetch_token(auth_http, url, key, client_id, scope, timeout=timeout))
    out = session if session is not None else requests.Session()
    out.auth = BearerAuth(cache)
    return out, cache


# ---------------------------------------------------------------- which scopes (issue 12, item 5)

_V1_WORDS = ("read", "write", "*")


@dataclass(frozen=True)
class ScopeRequest:
    """What a job does with each resource type, to be spelled as SMART system scopes.

    ``searches``: searched (and read); ``reads``: read by id only (a Group);
    ``creates``: created, and then found again by search or by id (the
    ledger writer does both).  Least privilege: nothing else is asked.
    """

    searches: tuple[str, ...]
    reads: tuple[str, ...] = ()
    creates: tuple[str, ...] = ()

    def _types(self) -> list[str]:
        return list(dict.fromkeys((*self.searches, *self.creates, *self.reads)))

    def v2(self) -> str:
        """SMART v2: ``system/<Type>.rs`` (``.r``) per type read, and ``system/<Type>.cs`` apart per type created.

        Create apart from read, so a server that will not grant the create
        drops only that scope and the job can still read (Oracle grants fewer
        scopes than asked); ``s`` with ``c``: a conditional create or the
        ledger's search looks for the draft first.
        """
        words = []
        for t in self._types():
            letters = ("r" if t in self.searches or t in self.reads else "") + ("s" if t in self.searches else "")
            if letters:
                words.append(f"system/{t}.{letters}")
        words += [f"system/{t}.cs" for t in self._types() if t in self.creates]
        return " ".join(words)

    def v1(self) -> str:
        """SMART v1: ``system/<Type>.read`` for every type used, ``system/<Type>.write`` for those created."""
        words = [f"system/{t}.read" for t in self._types()]
        words += [f"system/{t}.write" for t in self._types() if t in self.creates]
        return " ".join(words)


def _is_v1_resource_scope(scope: str) -> bool | None:
    """True for a v1 resource scope, False for a v2 one, None for anything else (``openid``, ``launch``...)."""
    context, _, rest = scope.partition("/")
    if context not in ("patient", "user", "system") or "." not in rest:
        return None
    return rest.rsplit(".", 1)[1].split("?")[0] in _V1_WORDS


def scope_candidates(request: ScopeRequest, config: Mapping[str, Any] | None) -> list[str]:
    """The scope strings to ask for, in order: v2 then v1, or v1 alone when the server names v1 only.

    SMART App Launch 2.x: ``capabilities`` lists ``permission-v1`` and/or
    ``permission-v2``; without them, the spellings in ``scopes_supported``
    tell.  A server that says nothing is asked in v2 first.
    """
    caps = config.get("capabilities") if isinstance(config, Mapping) else None
    caps = {c for c in caps if isinstance(c, str)} if isinstance(caps, list) else set()
    if "permission-v2" in caps:
        v2 = True
    elif "permission-v1" in caps:
        v2 = False
    else:
        listed = config.get("scopes_supported") if isinstance(config, Mapping) else None
        kinds = {_is_v1_resource_scope(s) for s in listed or [] if isinstance(s, str)} - {None}
        v2 = kinds != {True}  # only v1 spellings listed: v1; otherwise try v2 first
    return [request.v2(), request.v1()] if v2 else [request.v1()]


def granted_creates(granted: str, types: Iterable[str]) -> frozenset[str]:
    """The ``types`` a granted scope string lets a system client create (v1 ``write``/``*``, v2 ``c``)."""
    out: set[str] = set()
    for scope in granted.split():
        context, _, rest = scope.partition("/")
        if context != "system" or "." not in rest or "?" in rest:  # a granular scope covers only some
            continue
        rtype, _, perms = rest.rpartition(".")
        can = perms in ("write", "*") or (perms not in _V1_WORDS and "c" in perms and set(perms) <= set("cruds"))
        if can:
            out.update(t for t in types if rtype in ("*", t))
    return frozenset(out)


def negotiated_session(
    fhir_base: str,
    client_id: str,
    key: SigningKey,
    scope: str | ScopeRequest,
    *,
    token_url: str | None = None,
    timeout: float = 30.0,
    session: requests.Session | None = None,
) -> tuple[requests.Session, TokenCache, str]:
    """Like ``backend_session``, with the first token fetched now; also returns the granted scope string.

    A ``ScopeRequest`` is spelled as the server's SMART configuration says
    (``scope_candidates``); an ``invalid_scope`` answer to the v2 spelling is
    asked once more in v1.  A plain string (``--scope``) is asked as it is.
    The granted scope is the token response's ``scope``, or, when it names
    none, what was asked (RFC 6749 §5.1).
    """
    auth_http = requests.Session()
    config: dict[str, Any] | None = None
    if token_url:
        url = _check_endpoint_url(token_url, "token endpoint")
    else:
        config = discover_configuration(auth_http, fhir_base, timeout=timeout, alg=key.alg)
        url = _check_endpoint_url(config["token_endpoint"], "token endpoint")
    candidates: Sequence[str] = [scope] if isinstance(scope, str) else scope_candidates(scope, config)
    token: Token | None = None
    asked = candidates[0]
    for i, asked in enumerate(candidates):
        try:
            token = fetch_token(auth_http, url, key, client_id, asked, timeout=timeout)
            break
        except ScopeRefused:
            if i == len(candidates) - 1:
                raise
            log.info("the token endpoint refused the SMART v2 scopes (invalid_scope); asking in v1 spelling")
    assert token is not None
    chosen = asked
    cache = TokenCache(lambda: fetch_token(auth_http, url, key, client_id, chosen, timeout=timeout), first=token)
    out = session if session is not None else requests.Session()
    out.auth = BearerAuth(cache)
    return out, cache, token.scope or chosen
