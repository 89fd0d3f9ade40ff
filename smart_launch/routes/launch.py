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
from collections.abc import Mapping

from authlib.common.security import generate_token
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_plugin import LaunchError

from .. import _launch as smart
from .._settings import Settings, normalize_issuer
from ..deps import COOKIE, CacheDep, ClockDep, HttpDep, PagesDep, SessionsDep, SettingsDep, cookie_name
from ..state import LaunchState, PendingAuthorization, Sessions

__all__ = ["router", "tag"]

log = logging.getLogger("smart_launch.app")
router = APIRouter()


def tag(sid: str) -> str:
    """What logs show for a session: a short hash, since the id itself is a credential."""
    return hashlib.sha256(sid.encode()).hexdigest()[:10]


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def embeddable(request: Request, settings: Settings) -> bool:
    """Whether a browser keeps a ``Secure`` cookie here: over https, or on loopback (a secure context)."""
    host = (request.url.hostname or "").lower()
    return (
        request.url.scheme == "https"
        or settings.redirect_uri.startswith("https://")
        or host in _LOOPBACK
        or host.endswith(".localhost")
    )


def cookie_header(name: str, value: str, *, max_age: int, embedded: bool) -> str:
    """One Set-Cookie value.  Pure.

    Embedded in the EHR's frame the app is a third party: only ``SameSite=None; Secure; Partitioned``
    (CHIPS) is stored and sent there, keyed to the EHR's site.  Otherwise (plain http off loopback)
    ``SameSite=Lax``, which the EHR's top-level redirect to /callback still carries.
    """
    parts = [f"{name}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly"]
    parts += ["SameSite=None", "Secure", "Partitioned"] if embedded else ["SameSite=Lax"]
    return "; ".join(parts)


#: launches one browser keeps open at once (EHR workspaces); older ones are signed out so cookies stay few
MAX_OPEN_LAUNCHES = 12


def prune_launch_cookies(request: Request, response: Response, sessions: Sessions, settings: Settings) -> None:
    """Expire this browser's launch cookies whose session is gone, and the oldest beyond MAX_OPEN_LAUNCHES."""
    live: list[tuple[float, str, str]] = []
    for name, sid in request.cookies.items():
        if not name.startswith(COOKIE + "_"):
            continue
        state = sessions.get(sid)
        if state is None:
            response.headers.append(
                "set-cookie", cookie_header(name, "", max_age=0, embedded=embeddable(request, settings))
            )
        else:
            live.append((state.started, name, sid))
    for _started, name, sid in sorted(live)[: max(0, len(live) - (MAX_OPEN_LAUNCHES - 1))]:
        sessions.drop(sid)
        response.headers.append(
            "set-cookie", cookie_header(name, "", max_age=0, embedded=embeddable(request, settings))
        )


def set_cookie(
    request: Request,
    response: Response,
    sid: str,
    settings: Settings,
    *,
    lid: str | None = None,
    max_age: float | None = None,
) -> None:
    """The launch's own cookie, and ``fp_sid`` for the browser's latest launch (pages without ``launch``)."""
    embedded = embeddable(request, settings)
    age = int(settings.session_ttl if max_age is None else max_age)
    for name in ([cookie_name(lid)] if lid else []) + [COOKIE]:
        response.headers.append("set-cookie", cookie_header(name, sid, max_age=age, embedded=embedded))


@router.get("/launch", response_class=HTMLResponse, summary="Start an EHR launch (iss + launch) or a standalone one")
def launch(
    request: Request,
    settings: SettingsDep,
    sessions: SessionsDep,
    http: HttpDep,
    cache: CacheDep,
    pages: PagesDep,
    clock: ClockDep,
    iss: str | None = None,
    launch: str | None = None,
) -> Response:
    # The allow-list is checked before anything else: no discovery request, no redirect (SMART's
    # app-launch.html tells apps to verify iss; an open redirector would leak the launch).
    if not iss or not settings.allows(iss):
        # the integrator's detail goes to the log; the person at the screen gets a sentence and a next step
        log.warning("launch refused: issuer %s not in SMART_ALLOWED_ISSUERS", (iss or "(none)")[:200])
        return pages.refusal(
            request,
            400,
            "The app could not start",
            "This app is not configured to trust the EHR it was opened from, so it did not contact "
            "it. Open the app again from the patient's chart in your EHR; if this page comes back, "
            "tell your EHR support team that the app's list of trusted EHRs needs this one.",
        )
    if launch is not None and (not launch or len(launch) > 2048):
        raise LaunchError("the EHR sent an empty or oversized launch parameter")
    iss = normalize_issuer(iss)
    config = smart.discover(iss, http, cache=cache, timeout=settings.http_timeout)
    standalone = launch is None
    if not standalone and not (config.supports("launch-ehr") or not config.capabilities):
        raise LaunchError(f"the EHR at {iss} does not declare support for EHR launches")
    scope = smart.choose_scopes(config, standalone=standalone, override=settings.scopes)
    auth = smart.build_authorize_url(
        config, client_id=settings.client_id, redirect_uri=settings.redirect_uri, scope=scope, launch=launch
    )
    # one session per launch: earlier launches in this browser (other tabs, other patients) keep theirs
    sid, lid = generate_token(48), generate_token(22)
    sessions.put(
        sid,
        LaunchState(
            iss=iss,
            config=config,
            requested_scope=scope,
            standalone=standalone,
            started=clock(),
            state=auth.state,
            lid=lid,
        ),
        ttl=settings.launch_ttl,
    )
    sessions.put_pending(
        auth.state, PendingAuthorization(sid, auth.code_verifier, auth.redirect_uri, lid), ttl=settings.launch_ttl
    )
    log.info("launch: iss=%s mode=%s session=%s", iss, "standalone" if standalone else "ehr", tag(sid))
    response = RedirectResponse(auth.url, status_code=302)
    prune_launch_cookies(request, response, sessions, settings)
    set_cookie(request, response, sid, settings, lid=lid, max_age=settings.launch_ttl)
    return response


def _spend_state(
    sessions: Sessions, cookies: Mapping[str, str], state: str | None
) -> tuple[str, LaunchState, PendingAuthorization]:
    """The launch this ``state`` belongs to, once: it must be this browser's, and only one caller may spend it."""
    if not state:
        raise LaunchError("the EHR's answer has no state parameter, so it cannot be matched to a launch")
    pending = sessions.pending(state)
    sid = cookies.get(cookie_name(pending.lid)) if pending and pending.lid else cookies.get(COOKIE)
    if pending is not None and not any(k == COOKIE or k.startswith(COOKIE + "_") for k in cookies):
        # no cookie of ours at all: the browser blocked it (a third-party frame); the integrator can fix that
        log.warning(
            "callback refused: the browser sent no session cookie; serve the app over https (or on "
            "loopback) so its SameSite=None; Secure; Partitioned cookie is kept in the EHR's frame, "
            "or open it in a new window"
        )
        raise LaunchError(
            "your browser did not keep this app's sign-in cookie, which happens when it blocks "
            "cookies inside the EHR's window; open the app in a new window from the EHR, or ask "
            "your EHR administrator to check the app's set-up (the details are in the app's log)"
        )
    if not sid or pending is None or not hmac.compare_digest(pending.sid, sid):
        log.warning(
            "callback refused: unknown, expired, reused or foreign state (session=%s)", tag(sid) if sid else "none"
        )
        raise LaunchError(
            "this sign-in answer does not belong to a launch started in this browser, or it "
            "was already used; please launch the app again from the EHR"
        )
    if not sessions.take_pending(state):  # single use: a concurrent replay lost the race
        raise LaunchError("this sign-in answer was already used; please launch the app again from the EHR")
    launched = sessions.get(sid)
    if not launched or launched.state != state:
        raise LaunchError("the launch this answer belongs to has expired; please launch the app again")
    return sid, launched, pending


@router.get("/callback", response_class=HTMLResponse, summary="The EHR's redirect back with the authorization code")
def callback(
    request: Request,
    settings: SettingsDep,
    sessions: SessionsDep,
    http: HttpDep,
    clock: ClockDep,
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> Response:
    if error:
        reason = error if error.replace("_", "").isalnum() and len(error) < 64 else "an error"
        raise LaunchError(
            f"the EHR did not authorize the app ({reason}); nothing was read. To try again, open the "
            "app from the patient's chart in your EHR and approve it"
        )
    sid, launched, pending = _spend_state(sessions, request.cookies, state)
    if not code:
        raise LaunchError("the EHR's answer has no authorization code")
    exchange = smart.build_token_request(
        launched.config,
        code=code,
        redirect_uri=pending.redirect_uri,
        code_verifier=pending.code_verifier,
        client_id=settings.client_id,
    )
    try:
        token = smart.send_token_request(exchange, http, timeout=settings.http_timeout, clock=clock)
    except LaunchError:
        sessions.remove(sid)
        raise
    context = smart.parse_launch_context(token)
    if not context.patient:
        sessions.remove(sid)
        raise LaunchError("the EHR did not say which patient the app is for (no patient in the launch context)")
    signed = launched.signed(
        token=token,
        context=context,
        csrf=generate_token(43),
        scopes=smart.granted_scopes(token, launched.requested_scope),
    )
    new_sid = generate_token(48)  # a fresh id once signed in (no session fixation)
    sessions.remove(sid)
    sessions.put(new_sid, signed, ttl=settings.session_ttl)
    log.info(
        "callback: signed in for Patient/%s Encounter/%s session=%s",
        context.patient,
        context.encounter or "-",
        tag(new_sid),
    )
    # the page names its launch, so a reload or a write in this tab stays with this patient
    response = RedirectResponse(f"/review?launch={launched.lid}" if launched.lid else "/review", status_code=303)
    set_cookie(request, response, new_sid, settings, lid=launched.lid)
    return response
