"""The SMART App Launch 2.x steps, as free functions, one per step (no web framework in here).

    discover(iss, session)               -> SmartConfig      .well-known, else the CapabilityStatement
    choose_scopes(config, standalone=)   -> str              v2 scopes, v1 when the EHR has only v1
    build_authorize_url(config, ...)     -> AuthorizeRequest  URL + the state and PKCE verifier to keep
    build_token_request(config, ...)     -> TokenRequest      pure: what to POST to the token endpoint
    send_token_request(request, session) -> dict              the token response, checked
    parse_launch_context(token)          -> LaunchContext     patient, encounter, banner, style, fhirContext
    authorized_session(token, ...)       -> OAuth2Session     refreshes before expiry, reports new tokens

Only ``discover`` and ``send_token_request`` do I/O.  The checks of the
smart-configuration and of the token response are ``fhir_plugin._smart``'s,
shared with backend services; this module gives them the app's endpoint rule
(follow the issuer's scheme) and the app's sentences (``_SAY``).  Failures are
``LaunchError`` with one sentence that never holds a token, a code or a
verifier.  Section references are to SMART App Launch 2.x (app-launch.html,
conformance.html, scopes-and-launch-context.html).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc6749.wrappers import OAuth2Token
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from fhir_plugin import LaunchError, _smart

from ._settings import normalize_issuer

__all__ = [
    "SmartConfig",
    "AuthorizeRequest",
    "TokenRequest",
    "LaunchContext",
    "DiscoveryCache",
    "discover",
    "choose_scopes",
    "build_authorize_url",
    "build_token_request",
    "send_token_request",
    "parse_launch_context",
    "authorized_session",
    "granted_scopes",
    "can_write_drafts",
    "missing_write_scopes",
    "SCOPES_V2",
    "SCOPES_V1",
    "DRAFT_TYPES",
    "OAUTH_URIS",
    "WriteAccess",
    "write_access",
]

log = logging.getLogger("smart_launch.launch")

#: the CapabilityStatement extension that lists the OAuth endpoints (conformance.html, pre-2.0 discovery)
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
#: resource types the drafts create (SPEC §7): writing needs create permission on each
DRAFT_TYPES = ("Condition", "Goal", "CarePlan", "Provenance")
_READ_TYPES = ("Patient", "Condition", "Observation", "Encounter", "CarePlan")

#: least privilege, SMART v2 (scopes-and-launch-context.html): read+search what the check reads,
#: create what the drafts write (DocumentReference: the plan note an EHR without CarePlan create gets,
#: issue 12). ``patient/Patient.r`` is for the banner and the record's Patient;
#: ``online_access`` asks for a refresh token that lives while the user is online, so the app can
#: renew the access token before it expires (SMART issues refresh tokens only with it or offline_access).
SCOPES_V2 = (
    "launch openid fhirUser online_access patient/Patient.r patient/Condition.rs patient/Observation.rs "
    "patient/Encounter.rs patient/CarePlan.rs patient/Condition.c patient/CarePlan.c "
    "patient/Goal.c patient/Provenance.c patient/DocumentReference.c "
    # the ledger writer looks for its drafts before creating them (EHRs without conditional create)
    "patient/Goal.rs patient/Provenance.rs patient/DocumentReference.rs"
)
#: the same for an EHR that only speaks SMART v1 scopes
SCOPES_V1 = (
    "launch openid fhirUser online_access patient/*.read patient/Condition.write patient/CarePlan.write "
    "patient/Goal.write patient/Provenance.write patient/DocumentReference.write"
)


# ---------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SmartConfig:
    """What the app needs to know about one EHR's authorization server."""

    iss: str
    authorization_endpoint: str
    token_endpoint: str
    capabilities: frozenset[str] = frozenset()
    code_challenge_methods: tuple[str, ...] = ()
    scopes_supported: tuple[str, ...] = ()
    source: Literal["well-known", "capability-statement"] = "well-known"

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def to_json(self) -> dict[str, Any]:
        return {
            "iss": self.iss,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "capabilities": sorted(self.capabilities),
            "code_challenge_methods": list(self.code_challenge_methods),
            "scopes_supported": list(self.scopes_supported),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SmartConfig:
        return cls(
            iss=data["iss"],
            authorization_endpoint=data["authorization_endpoint"],
            token_endpoint=data["token_endpoint"],
            capabilities=frozenset(data.get("capabilities", ())),
            code_challenge_methods=tuple(data.get("code_challenge_methods", ())),
            scopes_supported=tuple(data.get("scopes_supported", ())),
            source=data.get("source", "well-known"),
        )


#: discovered configurations per issuer (the shared TTL cache of ``fhir_plugin._smart``)
DiscoveryCache = _smart.DiscoveryCache
_default_cache: DiscoveryCache[SmartConfig] = DiscoveryCache()

#: the app's sentences for the shared SMART checks: they speak of "the EHR at <issuer>"
_SAY = _smart.Wording(
    unreachable="the EHR at {base} could not be reached to discover its sign-in endpoints ({error})",
    bad_status="the EHR at {base} answered {status} for its smart-configuration",
    not_json="the EHR at {base} published a smart-configuration that is not JSON",
    not_object="the EHR at {base} published a smart-configuration that is not a JSON object",
    missing_endpoint="the EHR at {base} does not name its {what}, so the app cannot sign in there",
    not_absolute="the EHR at {base} gives a {what} that is not an absolute http(s) URL",
    plain_http="the EHR at {base} gives a {what} over plain http; refusing to send credentials there",
    token_not_json="the EHR's token endpoint answered with something that is not JSON",
    no_access_token="the EHR's token response has no access token",
    not_bearer="the EHR issued a token that is not a bearer token",
    bad_expires_in="the EHR's token response has an unreadable expires_in",
)


def _endpoint(value: Any, what: str, iss: str) -> str:
    """An absolute http(s) endpoint; on an https issuer, https only (the code and verifier travel to it)."""
    return _smart.check_endpoint(value, what, rule=_smart.EndpointRule.FOLLOW_ISSUER, say=_SAY, base=iss)


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def config_from_well_known(iss: str, data: Any) -> SmartConfig:
    """Check a ``.well-known/smart-configuration`` document (conformance.html: the required fields)."""
    data = _smart.configuration_object(200, data, base=iss, say=_SAY)
    methods = _strings(data.get("code_challenge_methods_supported"))
    if "code_challenge_methods_supported" in data and "S256" not in methods:
        # SMART 2.0 servers SHALL support S256; the app always uses it (PKCE, app-launch.html)
        raise LaunchError(f"the EHR at {iss} does not support PKCE with S256, which this app requires")
    return SmartConfig(
        iss=iss,
        authorization_endpoint=_endpoint(data.get("authorization_endpoint"), "authorization endpoint", iss),
        token_endpoint=_endpoint(data.get("token_endpoint"), "token endpoint", iss),
        capabilities=frozenset(_strings(data.get("capabilities"))),
        code_challenge_methods=methods,
        scopes_supported=_strings(data.get("scopes_supported")),
        source="well-known",
    )


def config_from_capability_statement(iss: str, data: Any) -> SmartConfig:
    """The OAuth endpoints from a CapabilityStatement's ``rest.security`` oauth-uris extension."""
    if not isinstance(data, dict) or data.get("resourceType") != "CapabilityStatement":
        raise LaunchError(f"the EHR at {iss} publishes neither a smart-configuration nor a CapabilityStatement")
    uris: dict[str, Any] = {}
    for rest in data.get("rest") or []:
        for ext in ((rest or {}).get("security") or {}).get("extension") or []:
            if isinstance(ext, dict) and ext.get("url") == OAUTH_URIS:
                for sub in ext.get("extension") or []:
                    if isinstance(sub, dict) and isinstance(sub.get("url"), str):
                        uris.setdefault(sub["url"], sub.get("valueUri") or sub.get("valueUrl"))
    if not uris:
        raise LaunchError(
            f"the EHR at {iss} publishes no SMART endpoints (no smart-configuration, and no "
            "oauth-uris in its CapabilityStatement)"
        )
    return SmartConfig(
        iss=iss,
        authorization_endpoint=_endpoint(uris.get("authorize"), "authorization endpoint", iss),
        token_endpoint=_endpoint(uris.get("token"), "token endpoint", iss),
        source="capability-statement",
    )


def discover(
    iss: str,
    session: requests.Session,
    *,
    cache: DiscoveryCache[SmartConfig] | None = _default_cache,
    timeout: float = 10.0,
) -> SmartConfig:
    """The EHR's SMART configuration: ``{iss}/.well-known/smart-configuration``, else the CapabilityStatement.

    The well-known document wins when it is there (200); a 200 that is not a
    usable configuration is refused rather than papered over by the fallback.
    Any other answer (404, 5xx, ...) falls back to ``{iss}/metadata``.
    """
    iss = normalize_issuer(iss)
    if cache is not None and (hit := cache.get(iss)) is not None:
        return hit
    try:
        status, body = _smart.fetch_configuration(session, iss, say=_SAY, timeout=timeout)
        if status == 200:
            config = config_from_well_known(iss, body)
        else:
            log.info(
                "discovery: %s/.well-known/smart-configuration answered %d; trying the CapabilityStatement", iss, status
            )
            status, body = _smart.get_json(session, f"{iss}/metadata", accept="application/fhir+json", timeout=timeout)
            if status != 200:
                raise LaunchError(
                    f"the EHR at {iss} publishes no SMART configuration "
                    f"(smart-configuration and metadata both failed, the last with {status})"
                )
            config = config_from_capability_statement(iss, body)
    except requests.RequestException as exc:
        raise LaunchError(
            f"the EHR at {iss} could not be reached to discover its sign-in endpoints ({type(exc).__name__})"
        ) from exc
    if cache is not None:
        cache.set(iss, config)
    return config


# ---------------------------------------------------------------- scopes


def choose_scopes(config: SmartConfig, *, standalone: bool = False, override: str | None = None) -> str:
    """The scopes to ask for: v2, or v1 when the EHR advertises ``permission-v1`` and not ``permission-v2``.

    An EHR found only through its CapabilityStatement predates SMART 2.0 and
    gets v1 scopes too.  A standalone launch asks for ``launch/patient`` (the
    EHR lets the user pick the patient) instead of ``launch``.
    """
    if override:
        scopes = override
    else:
        v1 = (
            config.supports("permission-v1") and not config.supports("permission-v2")
        ) or config.source == "capability-statement"
        scopes = SCOPES_V1 if v1 else SCOPES_V2
    words = scopes.split()
    if standalone:
        words = ["launch/patient" if w == "launch" else w for w in words]
    else:
        words = ["launch" if w == "launch/patient" else w for w in words]
    return " ".join(dict.fromkeys(words))


def granted_scopes(token: Mapping[str, Any], requested: str) -> tuple[str, ...]:
    """The scopes the token carries; RFC 6749 §5.1: an absent ``scope`` means the requested ones."""
    scope = token.get("scope")
    return tuple((scope if isinstance(scope, str) else requested).split())


def _covers(scope: str, resource_type: str, action: Literal["c", "r"]) -> bool:
    """Whether one SMART scope permits ``action`` (create, read) on ``resource_type`` in patient context."""
    context, _, rest = scope.partition("/")
    if context not in ("patient", "user") or not rest or "?" in rest:  # a query narrows it: not all resources
        return False
    rtype, _, perms = rest.partition(".")
    if rtype not in (resource_type, "*"):
        return False
    if perms in ("*", "write" if action == "c" else "read"):  # v1
        return True
    return bool(perms) and set(perms) <= set("cruds") and action in perms  # v2, e.g. "rs", "c", "cruds"


def missing_write_scopes(scopes: Iterable[str]) -> list[str]:
    """The draft resource types the granted scopes do not let the app create."""
    scopes = list(scopes)
    return [t for t in DRAFT_TYPES if not any(_covers(s, t, "c") for s in scopes)]


def can_write_drafts(scopes: Iterable[str]) -> bool:
    return not missing_write_scopes(scopes)


#: every type the writer may create: the drafts, and the plan note they fold into (issue 12, writer d)
WRITE_TYPES = (*DRAFT_TYPES, "DocumentReference")


@dataclass(frozen=True)
class WriteAccess:
    """What the granted scopes let the app write on this server (issue 12, item 5)."""

    allowed: bool
    #: the create scopes the writer needs and the grant lacks (what the page tells the user)
    missing: tuple[str, ...]
    #: the types the grant lets the app create; the writer folds or names the rest
    creatable: frozenset[str]


def write_access(scopes: Iterable[str], server_can_create: Callable[[str], bool] | None = None) -> WriteAccess:
    """Whether the writer chosen for this server can write the drafts under these scopes.

    It needs the Condition and the plan in some form: the CarePlan and its
    Goals as drafted, or, folded, the DocumentReference note (SPEC §7.1, "not
    every server takes every resource").  A Provenance it cannot create is
    named as not written, so it is not needed.  ``server_can_create`` is the
    server's declared create per type (None: not known, taken as any).
    """
    scopes = list(scopes)
    granted = frozenset(t for t in WRITE_TYPES if any(_covers(s, t, "c") for s in scopes))
    server = server_can_create or (lambda _t: True)

    def can(t: str) -> bool:
        return t in granted and server(t)

    plan_as_drafted = server("CarePlan") and server("Goal")
    plan_ok = (can("CarePlan") and can("Goal")) or can("DocumentReference")
    allowed = can("Condition") and plan_ok
    if allowed:
        return WriteAccess(True, (), granted)
    wanted = [] if can("Condition") else ["Condition"]
    if not plan_ok:
        wanted += ["Goal", "CarePlan"] if plan_as_drafted else ["DocumentReference"]
    missing = tuple(t for t in wanted if t not in granted) or tuple(wanted)
    return WriteAccess(False, missing, granted)


# ---------------------------------------------------------------- authorize


@dataclass(frozen=True)
class AuthorizeRequest:
    """The redirect to the EHR, and what the app must keep to finish the launch (server-side only)."""

    url: str
    state: str
    code_verifier: str
    scope: str
    redirect_uri: str


def build_authorize_url(
    config: SmartConfig,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    launch: str | None = None,
    state: str | None = None,
    code_verifier: str | None = None,
) -> AuthorizeRequest:
    """The authorization request of app-launch.html §"Obtain authorization code". Pure.

    PKCE S256 always; ``state`` is 43 random characters; ``aud`` is the FHIR
    base (the issuer) so a token cannot be phished for another server;
    ``launch`` is passed through in an EHR launch.
    """
    state = state or generate_token(43)
    verifier = code_verifier or generate_token(64)  # RFC 7636 §4.1: 43-128 unreserved characters
    params = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("scope", scope),
        ("state", state),
        ("aud", config.iss),
        ("code_challenge", create_s256_code_challenge(verifier)),
        ("code_challenge_method", "S256"),
    ]
    if launch:
        params.append(("launch", launch))
    parts = urlsplit(config.authorization_endpoint)
    query = urlencode(parse_qsl(parts.query, keep_blank_values=True) + params)
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    return AuthorizeRequest(url=url, state=state, code_verifier=verifier, scope=scope, redirect_uri=redirect_uri)


# ---------------------------------------------------------------- token


@dataclass(frozen=True)
class TokenRequest:
    """A token-endpoint POST, built and not yet sent.  ``repr`` hides the code and verifier."""

    url: str
    data: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict)


def build_token_request(
    config: SmartConfig, *, code: str, redirect_uri: str, code_verifier: str, client_id: str
) -> TokenRequest:
    """The authorization-code exchange (app-launch.html §"Obtain access token"), public client. Pure."""
    return TokenRequest(
        url=config.token_endpoint,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
            "client_id": client_id,
        },
        headers={"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"},
    )


def _oauth_error(response: requests.Response) -> str:
    """The OAuth error code of a refused token request (RFC 6749 §5.2), never the rest of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str) and error.replace("_", "").isalnum() and len(error) < 64:
        return error
    return f"HTTP {response.status_code}"


def send_token_request(
    request: TokenRequest, session: requests.Session, *, timeout: float = 15.0, clock: Callable[[], float] = time.time
) -> OAuth2Token:
    """POST the token request; return the checked token response with ``expires_at`` worked out on ``clock``.

    Nothing of the request or the answer is logged but the endpoint and the status.
    """
    started = time.monotonic()
    try:
        response = session.post(
            request.url, data=request.data, headers=request.headers, timeout=timeout, allow_redirects=False
        )
    except requests.RequestException as exc:
        raise LaunchError(
            "the EHR's token endpoint could not be reached to finish signing in; please launch the app again"
        ) from exc
    log.info(
        "token: POST %s -> %d in %.3f s", urlsplit(request.url).path, response.status_code, time.monotonic() - started
    )
    if response.status_code != 200:
        raise LaunchError(
            f"the EHR refused to issue an access token ({_oauth_error(response)}); please launch the app again"
        )
    body = _smart.check_token_response(response, say=_SAY, url=request.url)
    return OAuth2Token(_smart.stamp_expiry(body, clock()))


# ---------------------------------------------------------------- launch context


@dataclass(frozen=True)
class LaunchContext:
    """The launch context parameters of the token response (scopes-and-launch-context.html)."""

    patient: str | None
    encounter: str | None
    need_patient_banner: bool
    smart_style_url: str | None
    fhir_context: tuple[dict[str, Any], ...]
    intent: str | None
    tenant: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "encounter": self.encounter,
            "need_patient_banner": self.need_patient_banner,
            "smart_style_url": self.smart_style_url,
            "fhirContext": list(self.fhir_context),
            "intent": self.intent,
            "tenant": self.tenant,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LaunchContext:
        return parse_launch_context(data)


def _id(value: Any, what: str) -> str | None:
    if value is None:
        return None
    parts = str(value).split("/")
    if len(parts) == 2 and parts[0] == what.capitalize():  # "Patient/123" is read as "123"
        parts = parts[1:]
    text = parts[0] if len(parts) == 1 else ""
    if not text or len(text) > 64 or not all(c.isalnum() or c in "-." for c in text):
        raise LaunchError(f"the EHR gave a {what} context that is not a FHIR id")
    return text


def parse_launch_context(token: Mapping[str, Any]) -> LaunchContext:
    """Read ``patient``, ``encounter``, ``need_patient_banner``, ``smart_style_url``, ``fhirContext``...

    ``fhirContext`` (2.x) items are kept when they are objects with a
    ``reference`` (or a canonical/identifier); an ``Encounter/...`` reference
    there gives the encounter when the ``encounter`` parameter is absent.
    """
    items = token.get("fhirContext") or []
    context = tuple(dict(i) for i in items if isinstance(i, dict)) if isinstance(items, list) else ()
    encounter = token.get("encounter")
    if encounter is None:
        for item in context:
            ref = item.get("reference")
            if isinstance(ref, str) and ref.startswith("Encounter/"):
                encounter = ref
                break
    banner = token.get("need_patient_banner")
    style = token.get("smart_style_url")
    return LaunchContext(
        patient=_id(token.get("patient"), "patient"),
        encounter=_id(encounter, "encounter"),
        need_patient_banner=banner if isinstance(banner, bool) else str(banner).lower() == "true",
        smart_style_url=style if isinstance(style, str) and style.startswith(("https://", "http://")) else None,
        fhir_context=context,
        intent=token.get("intent") if isinstance(token.get("intent"), str) else None,
        tenant=token.get("tenant") if isinstance(token.get("tenant"), str) else None,
    )


# ---------------------------------------------------------------- using the token


class _ClockedSession(OAuth2Session):
    """authlib's session, except that "is the token about to expire?" asks the app's clock, not ``time.time``.

    So the refresh follows the same clock the app stamped ``expires_at`` with,
    and a test moves that clock instead of sleeping.  A refreshed token is
    stamped on the clock too, then handed to ``on_refresh`` to be stored.
    """

    def __init__(
        self, *args: Any, clock: Callable[[], float], on_refresh: Callable[[dict[str, Any]], None], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock
        self._on_refresh = on_refresh

    def ensure_active_token(self, token: Any = None) -> bool:
        # authlib ships no type hints, so mypy cannot see the type of its ``token`` property
        current: Mapping[str, Any] = self.token if token is None else token  # type: ignore[has-type]
        if not _smart.token_expired(current, self._clock(), self.leeway):
            return True
        refresh_token, url = current.get("refresh_token"), self.metadata.get("token_endpoint")
        if not (refresh_token and url):
            return False  # authlib raises InvalidTokenError, which FhirClient turns into AuthError
        fresh = _smart.stamp_expiry(self.refresh_token(url, refresh_token=refresh_token), self._clock())
        self.token = fresh
        log.info("token refreshed (expires at %s)", fresh.get("expires_at"))
        self._on_refresh(dict(fresh))
        return True


def authorized_session(
    token: Mapping[str, Any],
    *,
    client_id: str,
    token_endpoint: str,
    on_refresh: Callable[[dict[str, Any]], None],
    leeway: float = 30.0,
    timeout: float = 15.0,
    clock: Callable[[], float] = time.time,
) -> OAuth2Session:
    """A ``requests`` session that sends the bearer token and refreshes it ``leeway`` s before it expires.

    ``on_refresh`` gets the new token (to store server-side) each time it is
    refreshed; without a refresh token, an expired token fails with authlib's
    InvalidTokenError, which ``FhirClient`` turns into AuthError.  ``clock``
    (epoch seconds) decides expiry: the one ``send_token_request`` stamped with.
    """
    session = _ClockedSession(
        client_id=client_id,
        token=dict(token),
        token_endpoint=token_endpoint,
        token_endpoint_auth_method="none",
        leeway=int(leeway),
        default_timeout=timeout,
        clock=clock,
        on_refresh=on_refresh,
    )
    # A review must show the record as it is now: servers such as HAPI reuse a repeated search's
    # results for a while unless asked not to (RFC 9111 §5.2.1.4 no-cache), which would hide the
    # drafts just written from the next look.
    session.headers["Cache-Control"] = "no-cache"
    return session
