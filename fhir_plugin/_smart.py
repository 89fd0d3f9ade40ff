"""SMART discovery and token-response checks, once, for the SMART app and for backend services.

Both callers read ``{base}/.well-known/smart-configuration`` (SMART App Launch
2.x, conformance.html) and check what a token endpoint answers (RFC 6749
§5.1).  They differ on two points, which are parameters here, not copies:

- which endpoints they will send credentials to (``EndpointRule``): the app
  follows its issuer's scheme; a backend job sends a signed assertion, so
  https only, or plain http on a loopback host;
- the sentences their users (and tests) know (``Wording``): the app speaks of
  "the EHR at ...", the job names the configuration URL and the client.

Pure checks, plus two thin I/O helpers (``get_json``, ``fetch_configuration``)
that never follow redirects (a redirect could leave the issuer).  Failures are
``LaunchError`` with one sentence that never holds a token.  Nothing here
imports the app (``smart_launch``): the app imports this.
"""

from __future__ import annotations

import enum
import ipaddress
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import requests

from ._errors import LaunchError, UsageError
from ._urls import safe_url

__all__ = [
    "WELL_KNOWN",
    "EndpointRule",
    "Wording",
    "DiscoveryCache",
    "configuration_url",
    "get_json",
    "fetch_configuration",
    "configuration_object",
    "endpoint_fault",
    "check_endpoint",
    "token_fault",
    "check_token_response",
    "stamp_expiry",
    "token_expired",
]

WELL_KNOWN = ".well-known/smart-configuration"

#: why a token response is not usable, in the order they are checked
TokenFault = Literal["no-access-token", "not-bearer", "bad-expires-in"]
#: why an endpoint URL is not usable
EndpointFault = Literal["missing", "not-absolute", "plain-http"]


class EndpointRule(enum.Enum):
    """Where credentials (a code and PKCE verifier, or a signed assertion) may be sent."""

    #: an absolute http(s) URL without a fragment; https whenever the issuer is https (the app)
    FOLLOW_ISSUER = "follow-issuer"
    #: https, or plain http on a loopback host only (backend services: the assertion must not travel in clear)
    HTTPS_OR_LOOPBACK = "https-or-loopback"


@dataclass(frozen=True)
class Wording:
    """One caller's sentence for each failure, as ``str.format`` templates.

    Fields available to every template: ``base`` (the FHIR base), ``url`` (the
    URL concerned), ``status``, ``error`` (an exception's type name), ``what``
    (which endpoint), ``token_type``.  ``bad_expires_in`` None means an
    unreadable ``expires_in`` is tolerated (the caller assumes a lifetime).
    """

    unreachable: str
    bad_status: str
    not_json: str
    not_object: str
    missing_endpoint: str
    not_absolute: str
    plain_http: str
    token_not_json: str
    no_access_token: str
    not_bearer: str
    bad_expires_in: str | None

    def error(self, template: str, **fields: Any) -> LaunchError:
        values = {"base": "", "url": "", "status": "", "error": "", "what": "", "token_type": None, **fields}
        return LaunchError(template.format(**values))


# ---------------------------------------------------------------- caching

T = TypeVar("T")


class DiscoveryCache(Generic[T]):
    """Discovered configurations per issuer, kept ``ttl`` seconds (client-js caches the same way)."""

    def __init__(self, ttl: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._items: dict[str, tuple[T, float]] = {}
        self._lock = threading.Lock()

    def get(self, iss: str) -> T | None:
        with self._lock:
            item = self._items.get(iss)
            if item and item[1] > self._clock():
                return item[0]
            self._items.pop(iss, None)
            return None

    def set(self, iss: str, config: T) -> None:
        with self._lock:
            self._items[iss] = (config, self._clock() + self.ttl)

    def unset(self, iss: str) -> None:
        with self._lock:
            self._items.pop(iss, None)


# ---------------------------------------------------------------- discovery (I/O at the edge)


def configuration_url(base: str) -> str:
    """Where a FHIR base publishes its SMART configuration (conformance.html)."""
    return f"{base.rstrip('/')}/{WELL_KNOWN}"


def get_json(
    session: requests.Session, url: str, *, accept: str = "application/json", timeout: float = 10.0
) -> tuple[int, Any]:
    """(status, parsed JSON or None); no redirects followed (they could leave the issuer).

    Raises ``requests.RequestException`` when the server cannot be reached: each caller words that itself,
    and LaunchError for a URL the one URL check refuses (issue 11: backslashes, userinfo, dot segments).
    """
    _checked(url, "SMART configuration URL")
    response = session.get(url, headers={"Accept": accept}, timeout=timeout, allow_redirects=False)
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    return response.status_code, body


def fetch_configuration(
    session: requests.Session, base: str, *, say: Wording, timeout: float = 10.0
) -> tuple[int, Any]:
    """GET the smart-configuration of ``base``: (status, JSON or None); unreachable is ``say.unreachable``."""
    url = configuration_url(base)
    try:
        return get_json(session, url, timeout=timeout)
    except requests.RequestException as exc:
        raise say.error(say.unreachable, base=base, url=url, error=type(exc).__name__) from exc


def configuration_object(status: int, body: Any, *, base: str, say: Wording) -> dict[str, Any]:
    """The configuration as a JSON object, or the caller's sentence for a non-200, non-JSON or non-object answer."""
    url = configuration_url(base)
    if status != 200:
        raise say.error(say.bad_status, base=base, url=url, status=status)
    if body is None:
        raise say.error(say.not_json, base=base, url=url)
    if not isinstance(body, dict):
        raise say.error(say.not_object, base=base, url=url)
    return body


# ---------------------------------------------------------------- endpoints


def _checked(url: str, what: str) -> None:
    """The one URL check (``_urls.safe_url``) before credentials or a request go to ``url``."""
    try:
        safe_url(url.strip(), what=what)
    except UsageError as exc:
        raise LaunchError(str(exc)) from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def endpoint_fault(value: Any, rule: EndpointRule, *, issuer: str = "") -> EndpointFault | None:
    """Why ``value`` may not receive credentials under ``rule``, or None when it may. Pure."""
    if not isinstance(value, str) or not value.strip():
        return "missing"
    if rule is EndpointRule.HTTPS_OR_LOOPBACK:
        parts = urlsplit(value)
        if parts.hostname and (parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname))):
            return None
        return "plain-http"
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        return "not-absolute"
    if urlsplit(issuer).scheme == "https" and parts.scheme != "https":
        return "plain-http"
    return None


def check_endpoint(value: Any, what: str, *, rule: EndpointRule, say: Wording, base: str = "") -> str:
    """``value`` when credentials may go there (see ``endpoint_fault``), else the caller's sentence."""
    fault = endpoint_fault(value, rule, issuer=base)
    if fault is None:
        _checked(value, what)
        return value.strip() if rule is EndpointRule.FOLLOW_ISSUER else value
    template = {"missing": say.missing_endpoint, "not-absolute": say.not_absolute, "plain-http": say.plain_http}[fault]
    raise say.error(template, base=base, url=value, what=what)


# ---------------------------------------------------------------- token responses


def token_fault(body: Any) -> TokenFault | None:
    """Why a token endpoint's JSON answer is not a usable bearer token (RFC 6749 §5.1, RFC 6750), or None. Pure."""
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or not body["access_token"]:
        return "no-access-token"
    if str(body.get("token_type", "")).lower() != "bearer":
        return "not-bearer"
    if "expires_in" in body and not isinstance(body["expires_in"], (int, float)):
        return "bad-expires-in"
    return None


def check_token_response(response: requests.Response, *, say: Wording, url: str = "") -> dict[str, Any]:
    """The JSON body of a 200 token response once ``token_fault`` finds nothing wrong, else the caller's sentence."""
    try:
        body = response.json()
    except ValueError as exc:
        raise say.error(say.token_not_json, url=url) from exc
    fault = token_fault(body)
    if fault == "no-access-token":
        raise say.error(say.no_access_token, url=url)
    if fault == "not-bearer":
        raise say.error(say.not_bearer, url=url, token_type=body.get("token_type"))
    if fault == "bad-expires-in" and say.bad_expires_in is not None:
        raise say.error(say.bad_expires_in, url=url)
    return dict(body)


def stamp_expiry(token: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``token`` with ``expires_at`` (whole epoch seconds, as authlib keeps it) worked out from ``expires_in``.

    ``now`` is the caller's clock, so a test can move time instead of sleeping.
    """
    out = dict(token)
    try:
        out["expires_at"] = int(now) + int(out["expires_in"])
    except (KeyError, TypeError, ValueError):
        pass
    return out


def token_expired(token: Mapping[str, Any], now: float, leeway: float) -> bool:
    """Whether ``token`` is within ``leeway`` seconds of its ``expires_at`` (no ``expires_at``: never). Pure."""
    expires_at = token.get("expires_at")
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)):
        return False
    return expires_at - leeway < now
