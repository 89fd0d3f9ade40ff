"""authlib's generic AuthorizationServer, fitted to Starlette and to SMART.

Grants registered:

- authorization code, PKCE required with S256 only (SMART App Launch 2.x
  §"Request authorization": "code_challenge_method ... S256 ... SHALL"),
  ``aud`` = this server's FHIR base, ``state`` required, ``launch`` a live
  launch id from ``/ehr/launch``;
- refresh token, rotating (the old refresh token dies, the old access token
  lives until its own expiry);
- client credentials for SMART Backend Services, authenticated only by a
  ``private_key_jwt`` assertion (RS384 or ES384) checked against the
  client's registered JWKS: iss = sub = client_id, aud = the token URL,
  exp at most 5 minutes ahead, jti never seen before.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Payload,
    OAuth2Request,
    grants,
)
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7636.challenge import compare_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey
from requests.structures import CaseInsensitiveDict
from starlette.responses import JSONResponse, RedirectResponse, Response

from . import _scopes
from ._config import EhrConfig
from ._store import Approval, AuthorizationCode, LaunchContext, Store, Token, new_secret

log = logging.getLogger("sandbox.ehr")

ASSERTION_ALGORITHMS = ("RS384", "ES384")  # SMART Backend Services: servers SHALL support both
# authlib logs whole token responses at DEBUG in these modules; the sandbox never logs secrets.
_CHATTY_LOGGERS = (
    "authlib.oauth2.rfc6749.grants.authorization_code",
    "authlib.oauth2.rfc6749.grants.refresh_token",
    "authlib.oauth2.rfc6749.grants.client_credentials",
    "authlib.oauth2.rfc6749.authenticate_client",
    "authlib.oauth2.rfc7523.client",
)


def quiet_authlib() -> None:
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


def safe_description(text: str) -> str:
    """An error_description authlib will accept (RFC 6749 §5.2 allows %x20-21 / %x23-5B / %x5D-7E)."""
    return re.sub(r"[^\x20\x21\x23-\x5b\x5d-\x7e]", "?", text)[:300]


# ------------------------------------------------------------------ requests


class _Payload(OAuth2Payload):
    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._datalist: dict[str, list[str]] = defaultdict(list)
        for key, value in pairs:
            self._datalist[key].append(value)
        self._data = {key: values[0] for key, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return self._datalist


class SandboxRequest(OAuth2Request):
    """An OAuth2Request built from already-read parts of a Starlette request (query and form pairs)."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        query: Iterable[tuple[str, str]] = (),
        form: Iterable[tuple[str, str]] = (),
    ) -> None:
        # authlib looks headers up as "Authorization"; Starlette hands them over lower-cased.
        super().__init__(method, uri, headers=CaseInsensitiveDict(dict(headers)))
        self._query = list(query)
        self._form = list(form)
        self.payload = _Payload(self._query + self._form)

    @property
    def args(self) -> dict[str, str]:
        return dict(reversed(self._query))  # first value wins, as in payload.data

    @property
    def form(self) -> dict[str, str]:
        return dict(reversed(self._form))

    def params(self) -> dict[str, str]:
        return dict(self.payload.data)


# ------------------------------------------------------------------ PKCE and SMART rules


class S256Challenge(CodeChallenge):
    """PKCE, required, S256 only: a missing challenge or ``plain`` is refused at the authorize step."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256")
        return super().validate_code_challenge(grant, redirect_uri)


class SmartLaunchRules:
    """The SMART App Launch checks authlib does not make, run inside its authorize validation
    (so an error goes back to the client's redirect_uri with ``state``)."""

    def __init__(self, config: EhrConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def __call__(self, grant) -> None:
        grant.register_hook("after_validate_authorization_request_payload", self.validate)

    def validate(self, grant, _result) -> None:
        request = grant.request
        data = request.payload.data
        if not data.get("state"):
            raise InvalidRequestError("state is required")
        aud = (data.get("aud") or "").rstrip("/")
        if aud != self.config.fhir_base_url:
            # SMART App Launch 2.x: aud is the FHIR base the app will talk to; a mismatch
            # means the token would be sent to another resource server.
            raise InvalidRequestError("aud must be this server's FHIR base URL")
        if len(grant.request.payload.datalist.get("launch", [])) > 1:
            raise InvalidRequestError("Multiple 'launch' in request.")
        scopes = _scopes.enforceable(_scopes.split(request.scope), v2=not self.config.permission_v1_only)
        launch_id = data.get("launch")
        if launch_id:
            launch = self.store.get_launch(launch_id)
            if launch is None:
                raise InvalidRequestError("unknown, expired or used launch")
            if launch.client_id and launch.client_id != request.payload.client_id:
                raise InvalidRequestError("this launch was made for another app")
            if "launch" not in scopes:
                raise InvalidScopeError("an EHR launch must request the launch scope")
        elif "launch" in scopes:
            scopes.remove("launch")  # no EHR context to give without a launch id
        if not [s for s in scopes if s not in ("launch",)]:
            raise InvalidScopeError("none of the requested scopes can be granted to this client")
        request.scope = _scopes.join(scopes)


# ------------------------------------------------------------------ client assertions


class PrivateKeyJwt(JWTBearerClientAssertion):
    """``private_key_jwt`` (SMART Backend Services §"Authenticating to the token endpoint")."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, config: EhrConfig, store: Store) -> None:
        super().__init__(validate_jti=True, leeway=config.assertion_leeway)
        self.config = config
        self.store = store

    def get_audiences(self) -> list[str]:
        return [self.config.token_url]

    def resolve_client_public_key(self, client):
        return client.key_set()

    def process_assertion_claims(self, assertion, resolve_key):
        try:
            # joserfc refuses RS384/ES384 unless named: they are not in its recommended set.
            token = jwt.decode(assertion, resolve_key, algorithms=list(ASSERTION_ALGORITHMS))
        except (JoseError, ValueError) as exc:
            raise InvalidClientError(
                description="the client assertion's signature does not verify with the client's registered keys"
            ) from exc
        self.verify_claims(token.claims)
        return token.claims

    def verify_claims(self, claims) -> None:
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise InvalidClientError(description="the client assertion needs a numeric exp")
        now = self.store.now()
        start = iat if isinstance(iat, (int, float)) and not isinstance(iat, bool) else now
        limit = self.config.assertion_max_lifetime
        if exp - start > limit or exp - now > limit + self.config.assertion_leeway:
            raise InvalidClientError(description=f"the client assertion must expire within {limit} s")
        if claims.get("iss") != claims.get("sub"):
            raise InvalidClientError(description="Issuer and Subject MUST match.")
        super().verify_claims(claims)

    def validate_jti(self, claims, jti) -> bool:
        if not isinstance(jti, str) or not jti:
            return False
        return self.store.remember_jti(str(claims["sub"]), jti, until=float(claims["exp"]))


# ------------------------------------------------------------------ grants

_USER_AUTH_METHODS = ["private_key_jwt", "client_secret_basic", "client_secret_post", "none"]


class SmartCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = _USER_AUTH_METHODS

    def save_authorization_code(self, code: str, request) -> None:
        approval: Approval = request.user
        scopes = _scopes.split(request.scope)
        if approval.keep_write is not None:
            scopes = _scopes.downgrade_writes(scopes, approval.keep_write)
        context = approval.context
        record = AuthorizationCode(
            code=code,
            client_id=request.client.get_client_id(),
            redirect_uri=request.payload.redirect_uri,
            scope=_scopes.join(scopes),
            code_challenge=request.payload.data.get("code_challenge"),
            code_challenge_method=request.payload.data.get("code_challenge_method"),
            context=context,
            expires_at=self.server.store.now() + self.server.config.code_lifetime,
        )
        if context.launch_id:
            self.server.store.use_launch(context.launch_id)
        self.server.store.add_code(record)
        log.info("authorization code issued: client=%s patient=%s", record.client_id, context.patient or "-")

    def query_authorization_code(self, code, client):
        verifier = self.request.payload.data.get("code_verifier")

        def proven(record: AuthorizationCode) -> bool:
            # a replayed code revokes its tokens only when the replayer also holds the PKCE verifier
            return (
                isinstance(verifier, str)
                and bool(record.code_challenge)
                and compare_s256_code_challenge(verifier, record.code_challenge)
            )

        return self.server.store.take_code(code, client.get_client_id(), proven=proven)

    def delete_authorization_code(self, authorization_code) -> None:
        self.server.store.spend_code(authorization_code)

    def authenticate_user(self, authorization_code) -> LaunchContext:
        return authorization_code.context


class SmartRefreshGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = _USER_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token):
        return self.server.store.by_refresh_token(refresh_token)

    def authenticate_user(self, refresh_token) -> LaunchContext:
        return refresh_token.context

    def revoke_old_credential(self, refresh_token) -> None:
        self.server.store.revoke_refresh(refresh_token)


class BackendServicesGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt"]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        requested = self.request.payload.scope
        if not requested:
            raise InvalidScopeError("scope is required (SMART Backend Services)")
        allowed = self.request.client.get_allowed_scope(requested)
        scopes = [s for s in _scopes.split(allowed) if s.startswith("system/")]
        scopes = _scopes.enforceable(scopes, v2=not self.server.config.permission_v1_only)
        if not scopes:
            raise InvalidScopeError("none of the requested system scopes can be granted to this client")
        self.request.scope = _scopes.join(scopes)

    def create_token_response(self):
        token = self.generate_token(scope=self.request.scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


# ------------------------------------------------------------------ the server


class SandboxAuthorizationServer(AuthorizationServer):
    """The generic authlib server with the sandbox's client registry, store and token format."""

    def __init__(self, config: EhrConfig, store: Store) -> None:
        super().__init__(scopes_supported=None)
        self.config = config
        self.store = store
        self.signing_key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"})
        self.signing_key.ensure_kid()
        self.register_token_generator("default", self._generate_token)
        self.register_client_auth_method(PrivateKeyJwt.CLIENT_AUTH_METHOD, PrivateKeyJwt(config, store))
        self.register_grant(SmartCodeGrant, [S256Challenge(required=True), SmartLaunchRules(config, store)])
        self.register_grant(SmartRefreshGrant)
        self.register_grant(BackendServicesGrant)
        quiet_authlib()

    # -------------------------------------------------------------- authlib hooks

    def query_client(self, client_id):
        return self.config.clients.get(client_id)

    def validate_requested_scope(self, scope) -> None:
        try:
            _scopes.validate(scope)
        except _scopes.ScopeError as exc:
            raise InvalidScopeError(safe_description(str(exc))) from None

    def create_oauth2_request(self, request) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        raise TypeError("build a SandboxRequest first")

    def create_json_request(self, request):  # pragma: no cover - no JSON endpoints here
        raise NotImplementedError

    def handle_response(self, status, body, headers) -> Response:
        headers = dict(headers or [])
        if status in (301, 302, 303, 307) and "Location" in headers:
            return RedirectResponse(headers["Location"], status_code=302, headers={"Cache-Control": "no-store"})
        if isinstance(body, dict):
            headers.pop("Content-Type", None)
            return JSONResponse(body, status_code=status, headers=headers)
        return Response(body or b"", status_code=status, headers=headers)

    def send_signal(self, name, *args, **kwargs) -> None:
        return None

    def save_token(self, token: dict[str, Any], request) -> None:
        now = self.store.now()
        client = request.client
        context = request.user if isinstance(request.user, LaunchContext) else LaunchContext()
        token_id = new_secret(12)
        parent = getattr(request, "refresh_token", None)
        family = parent.family if isinstance(parent, Token) and parent.family else token_id
        record = Token(
            family=family,
            token_id=token_id,
            client_id=client.get_client_id(),
            scope=token.get("scope", ""),
            context=context,
            access_token=token["access_token"],
            issued_at=now,
            expires_at=now + token["expires_in"],
            refresh_token=token.get("refresh_token"),
            refresh_expires_at=now + self.config.refresh_token_lifetime if token.get("refresh_token") else 0.0,
            grant_type=request.payload.grant_type or "",
        )
        self.store.add_token(record)
        if request.authorization_code is not None:
            request.authorization_code.token_ids.append(record.token_id)
        log.info(
            "token issued: client=%s grant=%s patient=%s scopes=%d refresh=%s",
            record.client_id,
            record.grant_type,
            context.patient or "-",
            len(_scopes.split(record.scope)),
            "yes" if record.refresh_token else "no",
        )

    # -------------------------------------------------------------- tokens

    def _generate_token(
        self, grant_type, client, user=None, scope=None, expires_in=None, include_refresh_token=True
    ) -> dict[str, Any]:
        context = user if isinstance(user, LaunchContext) else LaunchContext()
        granted = _scopes.split(scope)
        token: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": new_secret(32),
            "expires_in": int(expires_in or self.config.access_token_lifetime),
            "scope": _scopes.join(granted),
        }
        # SMART App Launch 2.x: a refresh token comes with offline_access or online_access.
        if include_refresh_token and ({"offline_access", "online_access"} & set(granted)):
            token["refresh_token"] = new_secret(32)
        token.update(context.token_fields())
        if (
            self.config.issue_id_token
            and "openid" in granted
            and context.user_id
            and ({"fhirUser", "profile"} & set(granted))
        ):
            token["id_token"] = self._id_token(client.get_client_id(), context, "fhirUser" in granted)
        return token

    def _id_token(self, client_id: str, context: LaunchContext, fhir_user: bool) -> str:
        now = int(self.store.now())
        claims: dict[str, Any] = {
            "iss": self.config.base_url,
            "sub": context.user_id,
            "aud": client_id,
            "iat": now,
            "exp": now + self.config.access_token_lifetime,
        }
        if fhir_user:
            claims["fhirUser"] = f"{self.config.fhir_base_url}/{context.user_id}"
        if context.nonce:
            claims["nonce"] = context.nonce
        return jwt.encode({"alg": "RS256", "kid": self.signing_key.kid}, claims, self.signing_key)

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [self.signing_key.as_dict(private=False)]}
