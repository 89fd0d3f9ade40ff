"""The SMART launch: ``/launch`` (EHR or standalone) and ``/callback`` (SMART App Launch 2.x, app-launch.html).

- ``/launch`` refuses any ``iss`` not on the allow-list before it sends or
  redirects anywhere; it clears this browser's previous session, mints a new
  one, and keeps the ``state`` and PKCE verifier under that ``state``, bound
  to the new session id.
- ``/callback`` takes the ``state`` once (the store's ``unset`` decides who
  wins), exchanges the code, stores the token, rotates the session id, and
  redirects to ``/review``.  A replayed callback finds no state.

Logs carry issuer URLs, resource ids and a short hash of the session id —
never a token, a code, a verifier or the session id itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from authlib.common.security import generate_token
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_plugin import LaunchError

from .. import _launch as smart
from .._settings import Settings, normalize_issuer
from ..deps import COOKIE, CacheDep, ClockDep, HttpDep, PagesDep, SessionsDep, SettingsDep
from ..state import LaunchState, PendingAuthorization, Sessions

__all__ = ["router", "tag"]

log = logging.getLogger("smart_launch.app")
router = APIRouter()


def tag(sid: str) -> str:
    """What logs show for a session: a short hash, since the id itself is a credential."""
    return hashlib.sha256(sid.encode()).hexdigest()[:10]


def set_cookie(request: Request, response: Response, sid: str, settings: Settings) -> None:
    secure = request.url.scheme == "https" or settings.redirect_uri.startswith("https://")
    # SameSite=Lax: the EHR's redirect back to /callback is a top-level GET, which Lax lets through
    response.set_cookie(COOKIE, sid, httponly=True, samesite="lax", secure=secure, path="/",
                        max_age=int(settings.session_ttl))


@router.get("/launch", response_class=HTMLResponse, summary="Start an EHR launch (iss + launch) or a standalone one")
def launch(request: Request, settings: SettingsDep, sessions: SessionsDep, http: HttpDep, cache: CacheDep,
           pages: PagesDep, clock: ClockDep, iss: str | None = None, launch: str | None = None) -> Response:
    # The allow-list is checked before anything else: no discovery request, no redirect (SMART's
    # app-launch.html tells apps to verify iss; an open redirector would leak the launch).
    if not iss or not settings.allows(iss):
        log.warning("launch refused: issuer not on the allow-list")
        return pages.refusal(request, 400, "Launch refused",
                             f"This app is not configured to trust the EHR at {(iss or '(none)')[:200]}, so it did "
                             "not contact it. Ask your administrator to add it to SMART_ALLOWED_ISSUERS.")
    if launch is not None and (not launch or len(launch) > 2048):
        raise LaunchError("the EHR sent an empty or oversized launch parameter")
    iss = normalize_issuer(iss)
    config = smart.discover(iss, http, cache=cache, timeout=settings.http_timeout)
    standalone = launch is None
    if not standalone and not (config.supports("launch-ehr") or not config.capabilities):
        raise LaunchError(f"the EHR at {iss} does not declare support for EHR launches")
    scope = smart.choose_scopes(config, standalone=standalone, override=settings.scopes)
    auth = smart.build_authorize_url(config, client_id=settings.client_id, redirect_uri=settings.redirect_uri,
                                     scope=scope, launch=launch)
    sessions.drop(request.cookies.get(COOKIE))  # a new launch clears the old state
    sid = generate_token(48)
    sessions.put(sid, LaunchState(iss=iss, config=config, requested_scope=scope, standalone=standalone,
                                  started=clock(), state=auth.state), ttl=settings.launch_ttl)
    sessions.put_pending(auth.state, PendingAuthorization(sid, auth.code_verifier, auth.redirect_uri),
                         ttl=settings.launch_ttl)
    log.info("launch: iss=%s mode=%s session=%s", iss, "standalone" if standalone else "ehr", tag(sid))
    response = RedirectResponse(auth.url, status_code=302)
    set_cookie(request, response, sid, settings)
    return response


def _spend_state(sessions: Sessions, sid: str | None, state: str | None) -> tuple[LaunchState, PendingAuthorization]:
    """The launch this ``state`` belongs to, once: it must be this browser's, and only one caller may spend it."""
    if not state:
        raise LaunchError("the EHR's answer has no state parameter, so it cannot be matched to a launch")
    pending = sessions.pending(state)
    if not sid or pending is None or not hmac.compare_digest(pending.sid, sid):
        log.warning("callback refused: unknown, expired, reused or foreign state (session=%s)",
                    tag(sid) if sid else "none")
        raise LaunchError("this sign-in answer does not belong to a launch started in this browser, or it "
                          "was already used; please launch the app again from the EHR")
    if not sessions.take_pending(state):  # single use: a concurrent replay lost the race
        raise LaunchError("this sign-in answer was already used; please launch the app again from the EHR")
    launched = sessions.get(sid)
    if not launched or launched.state != state:
        raise LaunchError("the launch this answer belongs to has expired; please launch the app again")
    return launched, pending


@router.get("/callback", response_class=HTMLResponse, summary="The EHR's redirect back with the authorization code")
def callback(request: Request, settings: SettingsDep, sessions: SessionsDep, http: HttpDep, clock: ClockDep,
             code: str | None = None, state: str | None = None, error: str | None = None,
             error_description: str | None = None) -> Response:
    sid = request.cookies.get(COOKIE)
    if error:
        reason = error if error.replace("_", "").isalnum() and len(error) < 64 else "an error"
        raise LaunchError(f"the EHR did not authorize the app ({reason})")
    launched, pending = _spend_state(sessions, sid, state)
    assert sid is not None  # _spend_state matched it
    if not code:
        raise LaunchError("the EHR's answer has no authorization code")
    exchange = smart.build_token_request(launched.config, code=code, redirect_uri=pending.redirect_uri,
                                         code_verifier=pending.code_verifier, client_id=settings.client_id)
    try:
        token = smart.send_token_request(exchange, http, timeout=settings.http_timeout, clock=clock)
    except LaunchError:
        sessions.remove(sid)
        raise
    context = smart.parse_launch_context(token)
    if not context.patient:
        sessions.remove(sid)
        raise LaunchError("the EHR did not say which patient the app is for (no patient in the launch context)")
    signed = launched.signed(token=token, context=context, csrf=generate_token(43),
                             scopes=smart.granted_scopes(token, launched.requested_scope))
    new_sid = generate_token(48)  # a fresh id once signed in (no session fixation)
    sessions.remove(sid)
    sessions.put(new_sid, signed, ttl=settings.session_ttl)
    log.info("callback: signed in for Patient/%s Encounter/%s session=%s", context.patient,
             context.encounter or "-", tag(new_sid))
    response = RedirectResponse("/review", status_code=303)
    set_cookie(request, response, new_sid, settings)
    return response
