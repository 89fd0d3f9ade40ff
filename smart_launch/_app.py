"""The web app: ``create_app`` wires the routers, the middleware and the one error handler together.

A thin shell: the launch steps are ``_launch``'s free functions, the check,
the drafts and the write are the core library's public API.  The pieces:

    routes/    one router per area (launch, review pages, JSON API, assets)
    deps.py    what handlers declare: settings, the session, a FHIR client, the CSRF and write checks...
    state.py   the typed session (``LaunchState``) as stored in the ``SessionStore``
    views.py   what the pages show, and the page / refusal renderer

The browser holds only an opaque random session id in an HttpOnly cookie;
everything else is server-side in a ``SessionStore``.  Logs carry issuer URLs,
resource ids and a short hash of the session id — never a token, a code, a
verifier or the session id itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import requests
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from fhir_plugin import AuthError, LaunchError, PluginError, TransportError, __version__, load_profile

from . import _launch as smart
from ._settings import Settings
from ._store import SessionStore, open_store
from .deps import COOKIE, AppServices
from .routes import ROUTERS
from .routes.cds import CdsServices
from .state import Sessions
from .views import Pages
from .views import _fetch_style as _fetch_style  # re-exported: callers (and a test) knew it here

__all__ = ["create_app", "COOKIE"]

log = logging.getLogger("smart_launch.app")
access = logging.getLogger("smart_launch.access")

_HERE = Path(__file__).parent


def _content_security_policy(settings: Settings) -> str:
    """No inline script or style anywhere; framing only by the EHR (SMART apps run in its frame)."""
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors " + (" ".join(settings.frame_ancestors()) or "'none'"),
        ]
    )


def _security_headers(csp: str, pages: Pages) -> Callable[..., Any]:
    """The middleware: security headers and no-store on every answer, our access log, and no traceback pages."""

    async def middleware(request: Request, call_next: Callable[..., Any]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: one sentence for the user, the type in the log, never a traceback page
            log.error(
                "internal error on %s %s: %s",
                request.method,
                request.url.path,
                type(exc).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            response = pages.refusal(
                request,
                500,
                "Something went wrong",
                "The app hit an internal error; the details are in the server log.",
            )
        response.headers["Content-Security-Policy"] = csp
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"  # pages and API answers carry patient data
            response.headers["Pragma"] = "no-cache"
        # our access log: the path without its query (a callback's query holds the authorization code)
        access.info(
            "%s %s %d %.1f ms",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    return middleware


def _plugin_error_handler(pages: Pages) -> Callable[..., Any]:
    """The one error handler: a ``PluginError``'s own ``http_status`` and ``title``, its message as one sentence."""

    async def handler(request: Request, exc: PluginError) -> Response:
        message = str(exc).rstrip(".") + "."
        message = message[0].upper() + message[1:]
        status, title = exc.http_status, exc.title
        if isinstance(exc, LaunchError) and isinstance(exc.__cause__, (requests.RequestException, TransportError)):
            status = 502  # the EHR's server failed us, not the browser
        if isinstance(exc, AuthError) and exc.status == 403:  # the token is fine but does not reach that far
            log.warning("the EHR answered 403 on %s: %s", request.url.path, type(exc).__name__)
            status, title = 403, "The EHR refused this request"
            message = (
                "The EHR did not let this app read that record: it belongs to another patient or lies "
                "outside what this launch may see. Go back to the review of this patient."
            )
        elif isinstance(exc, AuthError):
            message += " Please launch the app again from the EHR."
        return pages.refusal(request, status, title, message)

    return handler


def create_app(
    settings: Settings,
    *,
    store: SessionStore | None = None,
    http: requests.Session | None = None,
    discovery_cache: smart.DiscoveryCache[smart.SmartConfig] | None = None,
    today: Callable[[], date] = date.today,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The FastAPI app for ``settings``.

    ``store`` defaults to ``settings.session_store``; ``http`` is the
    ``requests`` session used for discovery and the token exchange (FHIR calls
    get their own, token-bearing session per request).  ``clock`` (epoch
    seconds) stamps and checks token expiry: tests pass one they move forward.
    """
    profile = load_profile(settings.profile_code)
    pages = Pages(profile_code=profile.code, profile_display=profile.display)
    services = AppServices(
        settings=settings,
        sessions=Sessions(store if store is not None else open_store(settings.session_store)),
        http=http if http is not None else requests.Session(),
        cache=discovery_cache if discovery_cache is not None else smart.DiscoveryCache(settings.discovery_ttl),
        profile=profile,
        pages=pages,
        today=today,
        clock=clock,
    )

    app = FastAPI(
        title="fhir-plugin SMART app",
        version=__version__,
        description=f"Checks a patient's record for the documentation {profile.code} needs and "
        "writes back a draft Condition and phased CarePlan after clinician confirmation.",
        docs_url=None,
        redoc_url=None,
    )  # the interactive docs need inline script, which the CSP forbids
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    app.state.settings = settings
    app.state.store = services.sessions.store
    app.state.services = services
    app.state.cds = CdsServices.build(settings, http=services.http, today=today, clock=clock)
    app.middleware("http")(_security_headers(_content_security_policy(settings), pages))
    app.add_exception_handler(PluginError, _plugin_error_handler(pages))
    for router in ROUTERS:
        app.include_router(router)
    return app
