"""The web app: SMART launch routes, the review page, and the JSON API over the same data.

A thin shell: the launch steps are ``_launch``'s free functions, the check,
the drafts and the write are the core library's public API.  What this module
adds is the session (an opaque random id in an HttpOnly cookie, everything
else server-side in a ``SessionStore``), the pages, and the security headers.

Sessions and launches (SMART App Launch 2.x, app-launch.html):

- ``/launch`` refuses any ``iss`` not on the allow-list before it sends or
  redirects anywhere; it clears this browser's previous session, mints a new
  one, and keeps the ``state`` and PKCE verifier under ``state:<state>``
  bound to that session id.
- ``/callback`` takes the ``state`` once (the store's ``unset`` decides who
  wins), exchanges the code, stores the token, rotates the session id, and
  redirects to ``/review``.  A replayed callback finds no state.
- Every later request reads the patient bound to the session at its launch;
  no route takes a patient id from the browser.

Logs carry issuer URLs, resource ids and a short hash of the session id —
never a token, a code, a verifier or the session id itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import requests
from fastapi import FastAPI, Form, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from authlib.common.security import generate_token

from fhir_plugin import (AuthError, DraftsRefused, FhirClient, Forbidden, LaunchError, NotLaunched, PluginError,
                         TransportError, UsageError, __version__, build_drafts, check, load_profile,
                         phases_of, write_drafts)

from fhir_plugin._urls import origin, safe_url
from . import _launch as smart
from ._settings import Settings, normalize_issuer, origin_of
from ._store import SessionStore, open_store

__all__ = ["create_app", "COOKIE"]

log = logging.getLogger("smart_launch.app")
access = logging.getLogger("smart_launch.access")

COOKIE = "fp_sid"
_HERE = Path(__file__).parent
_VIEWABLE = ("Patient", "Condition", "Observation", "Encounter", "CarePlan", "Goal", "Provenance")
_GROUPS = (("conflict", "Conflicts"), ("missing", "Missing"), ("not-yet-due", "Not yet due"),
           ("proposed", "Proposed"), ("met", "Met"))



def _tag(sid: str) -> str:
    """What logs show for a session: a short hash, since the id itself is a credential."""
    return hashlib.sha256(sid.encode()).hexdigest()[:10]


@dataclass
class Session:
    """One browser's launch, as stored under ``sid:<id>``."""

    sid: str
    data: dict[str, Any]

    @property
    def patient(self) -> str:
        return self.data["context"]["patient"]

    @property
    def encounter(self) -> str | None:
        return self.data["context"].get("encounter")

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.data.get("scopes") or ())

    @property
    def write_allowed(self) -> bool:
        return smart.can_write_drafts(self.scopes)


# ---------------------------------------------------------------- pure helpers for the views

def _subject_of(resource: Mapping[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    ref = (resource.get("subject") or resource.get("patient") or {}).get("reference")
    if isinstance(ref, str) and ref.split("/")[-2:-1] == ["Patient"]:
        return ref.split("/")[-1]
    return None


def _human_name(patient: Mapping[str, Any] | None) -> str:
    for name in (patient or {}).get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = list(name.get("given") or []) + ([name["family"]] if name.get("family") else [])
        if parts:
            return " ".join(parts)
    return "(no name recorded)"


def _banner(patient: Mapping[str, Any] | None, patient_id: str) -> dict[str, str]:
    patient = patient or {}
    return {"name": _human_name(patient), "gender": str(patient.get("gender") or "unknown"),
            "birth_date": str(patient.get("birthDate") or "unknown"), "id": patient_id}


def _draft_view(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """What the preview shows of the drafts: the Condition, the phases of the CarePlan, the counts."""
    entries = bundle.get("entry") or []
    by_url = {e.get("fullUrl"): e.get("resource") or {} for e in entries}
    condition = next((e["resource"] for e in entries if e["resource"]["resourceType"] == "Condition"), {})
    careplan = next((e["resource"] for e in entries if e["resource"]["resourceType"] == "CarePlan"), {})
    codings = (condition.get("code") or {}).get("coding") or []

    def goal_text(ref: str) -> str:
        return ((by_url.get(ref) or {}).get("description") or {}).get("text") or ref

    phases = [{"number": p.number, "title": p.title, "start": p.start, "end": p.end,
               "goals": [goal_text(g) for g in p.goals], "activities": list(p.activities)}
              for p in phases_of(careplan)]
    extra = [(a.get("detail") or {}) for a in careplan.get("activity") or [] if not a.get("extension")]
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["resource"]["resourceType"]] = counts.get(e["resource"]["resourceType"], 0) + 1
    return {
        "condition": {
            "codes": [{"system": c.get("system", ""), "code": c.get("code", ""), "display": c.get("display", "")}
                      for c in codings],
            "clinical_status": ((condition.get("clinicalStatus") or {}).get("coding") or [{}])[0].get("code"),
            "verification_status": ((condition.get("verificationStatus") or {}).get("coding") or [{}])[0].get("code"),
            "body_site": ", ".join(b.get("text", "") for b in condition.get("bodySite") or []),
            "onset": condition.get("onsetDateTime"),
            "note": " ".join(n.get("text", "") for n in condition.get("note") or []),
            "evidence": [d.get("reference") for ev in condition.get("evidence") or [] for d in ev.get("detail") or []],
        },
        "careplan": {"title": careplan.get("title"), "status": careplan.get("status"),
                     "intent": careplan.get("intent"), "phases": phases,
                     "other_activities": [{"title": (d.get("code") or {}).get("text", ""),
                                           "description": d.get("description", "")} for d in extra]},
        "counts": counts,
    }


_COLOUR = re.compile(r"#[0-9A-Fa-f]{3,8}|rgba?\([0-9., %]{5,40}\)")
_FONT = re.compile(r"[A-Za-z0-9 ,\-\"']{1,120}")
#: SMART style keys (scopes-and-launch-context.html, "Styling") -> our CSS variables
_STYLE_VARS = {"color_background": "--bg", "color_text": "--text", "color_highlight": "--accent",
               "color_modal_backdrop": None, "color_error": "--bad", "color_success": "--ok",
               "dim_border": "--line", "font_family": "font-family"}


def _fetch_style(http: requests.Session, url: str | None, iss: str) -> dict[str, str]:
    """The style document's safe values, or {} (it is optional: any problem means our own look)."""
    if not url:
        return {}
    try:
        # the parser requests connects with, so a backslash or userinfo trick cannot reach another host
        if origin(safe_url(url, what="smart_style_url")) != origin(safe_url(iss, what="issuer")):
            return {}
    except PluginError:
        return {}
    try:
        answer = http.get(url, timeout=3, allow_redirects=False, headers={"Accept": "application/json"})
        doc = answer.json() if answer.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return {}
    out = {}
    for key, var in _STYLE_VARS.items():
        value = doc.get(key) if isinstance(doc, dict) else None
        if var and isinstance(value, str):
            pattern = _FONT if key == "font_family" else _COLOUR
            if pattern.fullmatch(value.strip()):
                out[var] = value.strip()
    return out


def _style_css(style: Mapping[str, str]) -> str:
    variables = "".join(f"{k}: {v}; " for k, v in style.items() if k.startswith("--"))
    css = f":root {{ {variables}}}\n" if variables else ""
    if style.get("font-family"):
        css += f"body {{ font-family: {style['font-family']}; }}\n"
    return css


def _evidence_link(ref: str) -> str | None:
    parts = ref.split("/")
    if len(parts) == 2 and parts[0] in _VIEWABLE:
        return f"/resource/{parts[0]}/{parts[1]}"
    return None


# ---------------------------------------------------------------- the app

def create_app(settings: Settings, *, store: SessionStore | None = None, http: requests.Session | None = None,
               discovery_cache: smart.DiscoveryCache | None = None,
               today: Callable[[], date] = date.today) -> FastAPI:
    """The FastAPI app for ``settings``.

    ``store`` defaults to ``settings.session_store``; ``http`` is the
    ``requests`` session used for discovery and the token exchange (FHIR calls
    get their own, token-bearing session per request).
    """
    store = store if store is not None else open_store(settings.session_store)
    http = http if http is not None else requests.Session()
    cache = discovery_cache if discovery_cache is not None else smart.DiscoveryCache(settings.discovery_ttl)
    profile = load_profile(settings.profile_code)
    templates = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(default=True))
    templates.globals.update(app_version=__version__, profile_code=profile.code, profile_display=profile.display,
                             evidence_link=_evidence_link)
    csp = "; ".join([
        "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
        "connect-src 'self'", "object-src 'none'", "base-uri 'none'", "form-action 'self'",
        "frame-ancestors " + (" ".join(settings.frame_ancestors()) or "'none'"),
    ])

    app = FastAPI(title="fhir-plugin SMART app", version=__version__,
                  description=f"Checks a patient's record for the documentation {profile.code} needs and "
                              "writes back a draft Condition and phased CarePlan after clinician confirmation.",
                  docs_url=None, redoc_url=None)  # the interactive docs need inline script, which the CSP forbids
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    app.state.settings = settings
    app.state.store = store

    # -- plumbing

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: one sentence for the user, the type in the log, never a traceback page
            log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            response = refusal(request, 500, "Something went wrong",
                               "The app hit an internal error; the details are in the server log.")
        response.headers["Content-Security-Policy"] = csp
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"  # pages and API answers carry patient data
            response.headers["Pragma"] = "no-cache"
        # our access log: the path without its query (a callback's query holds the authorization code)
        access.info("%s %s %d %.1f ms", request.method, request.url.path, response.status_code,
                    (time.perf_counter() - started) * 1000)
        return response

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(request=request, **context)
        return HTMLResponse(html, status_code=status)

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def refusal(request: Request, status: int, title: str, message: str) -> Response:
        if is_api(request):
            return JSONResponse({"error": message}, status_code=status)
        return page(request, "error.html", status, title=title, message=message)

    @app.exception_handler(PluginError)
    async def plugin_error(request: Request, exc: PluginError) -> Response:
        message = str(exc).rstrip(".") + "."
        message = message[0].upper() + message[1:]
        status, title = exc.http_status, exc.title
        if isinstance(exc, LaunchError) and isinstance(exc.__cause__, (requests.RequestException, TransportError)):
            status = 502  # the EHR's server failed us, not the browser
        if isinstance(exc, AuthError) and exc.status == 403:  # the token is fine but does not reach that far
            status, title = 403, "The EHR refused this request"
        elif isinstance(exc, AuthError):
            message += " Please launch the app again from the EHR."
        return refusal(request, status, title, message)

    def set_cookie(request: Request, response: Response, sid: str) -> None:
        secure = request.url.scheme == "https" or settings.redirect_uri.startswith("https://")
        # SameSite=Lax: the EHR's redirect back to /callback is a top-level GET, which Lax lets through
        response.set_cookie(COOKIE, sid, httponly=True, samesite="lax", secure=secure, path="/",
                            max_age=int(settings.session_ttl))

    def drop_session(sid: str | None) -> None:
        if not sid:
            return
        old = store.get(f"sid:{sid}")
        if old and old.get("state"):
            store.unset(f"state:{old['state']}")
        store.unset(f"sid:{sid}")

    def current(request: Request) -> Session:
        sid = request.cookies.get(COOKIE)
        data = store.get(f"sid:{sid}") if sid else None
        if not sid or not data or not data.get("token"):
            raise NotLaunched("there is no active launch in this browser (or it has expired); "
                              "open the app from the EHR again")
        return Session(sid, data)

    @contextlib.contextmanager
    def fhir(sess: Session) -> Iterator[FhirClient]:
        """A FHIR client on the session's issuer whose token refreshes itself and is saved back."""
        def save(new_token: dict[str, Any]) -> None:
            sess.data["token"] = new_token
            store.set(f"sid:{sess.sid}", sess.data, ttl=settings.session_ttl)

        oauth = smart.authorized_session(sess.data["token"], client_id=settings.client_id,
                                         token_endpoint=sess.data["config"]["token_endpoint"], on_refresh=save,
                                         leeway=settings.refresh_leeway, timeout=settings.http_timeout)
        try:
            yield FhirClient(sess.data["iss"], session=oauth, timeout=settings.http_timeout, retries=2)
        finally:
            oauth.close()

    def check_csrf(sess: Session, sent: str | None) -> None:
        expected = sess.data.get("csrf") or ""
        if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise Forbidden("the form's security token does not match this session; reload the review page "
                            "and try again (nothing was written)")

    def require_write(sess: Session) -> None:
        missing = smart.missing_write_scopes(sess.scopes)
        if missing:
            raise Forbidden("the EHR did not grant this app permission to create " + ", ".join(missing)
                            + " resources, so nothing was written")

    @dataclass
    class Loaded:
        record: Any
        report: Any
        drafts: dict[str, Any] | None
        refused: str | None
        timings: dict[str, float]

    def load(sess: Session) -> Loaded:
        """Read the session's patient's record, check it, and draft (one read round trip)."""
        t0 = time.perf_counter()
        with fhir(sess) as client:
            record = client.read_patient_record(sess.patient)
        t1 = time.perf_counter()
        report = check(record, profile, today=today(), encounter_id=sess.encounter)
        t2 = time.perf_counter()
        drafts, refused = None, None
        try:
            drafts = build_drafts(report, profile, now=datetime.now(timezone.utc))
        except DraftsRefused as exc:
            refused = str(exc)
        t3 = time.perf_counter()
        return Loaded(record, report, drafts, refused, {"read": t1 - t0, "check": t2 - t1, "drafts": t3 - t2})

    def timing_header(response: Response, timings: Mapping[str, float]) -> None:
        # Server-Timing (W3C): lets the benchmark see the check's own share; durations only, no data
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timings.items())

    # -- the launch

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request) -> Response:
        return page(request, "home.html")

    @app.get("/launch", response_class=HTMLResponse, summary="Start an EHR launch (iss + launch) or a standalone one")
    def launch(request: Request, iss: str | None = None, launch: str | None = None) -> Response:
        # The allow-list is checked before anything else: no discovery request, no redirect (SMART's
        # app-launch.html tells apps to verify iss; an open redirector would leak the launch).
        if not iss or not settings.allows(iss):
            log.warning("launch refused: issuer not on the allow-list")
            shown = (iss or "(none)")[:200]
            return refusal(request, 400, "Launch refused",
                           f"This app is not configured to trust the EHR at {shown}, so it did not contact it. "
                           "Ask your administrator to add it to SMART_ALLOWED_ISSUERS.")
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
        drop_session(request.cookies.get(COOKIE))  # a new launch clears the old state
        sid = generate_token(48)
        store.set(f"sid:{sid}", {"iss": iss, "config": config.to_json(), "state": auth.state,
                                 "requested_scope": scope, "standalone": standalone, "started": time.time()},
                  ttl=settings.launch_ttl)
        store.set(f"state:{auth.state}", {"sid": sid, "code_verifier": auth.code_verifier,
                                          "redirect_uri": auth.redirect_uri}, ttl=settings.launch_ttl)
        log.info("launch: iss=%s mode=%s session=%s", iss, "standalone" if standalone else "ehr", _tag(sid))
        response = RedirectResponse(auth.url, status_code=302)
        set_cookie(request, response, sid)
        return response

    @app.get("/callback", response_class=HTMLResponse, summary="The EHR's redirect back with the authorization code")
    def callback(request: Request, code: str | None = None, state: str | None = None, error: str | None = None,
                 error_description: str | None = None) -> Response:
        sid = request.cookies.get(COOKIE)
        if error:
            reason = error if error.replace("_", "").isalnum() and len(error) < 64 else "an error"
            raise LaunchError(f"the EHR did not authorize the app ({reason})")
        if not state:
            raise LaunchError("the EHR's answer has no state parameter, so it cannot be matched to a launch")
        pending = store.get(f"state:{state}")
        if not sid or pending is None or not hmac.compare_digest(str(pending.get("sid")), sid):
            log.warning("callback refused: unknown, expired, reused or foreign state (session=%s)",
                        _tag(sid) if sid else "none")
            raise LaunchError("this sign-in answer does not belong to a launch started in this browser, or it "
                              "was already used; please launch the app again from the EHR")
        if not store.unset(f"state:{state}"):  # single use: a concurrent replay lost the race
            raise LaunchError("this sign-in answer was already used; please launch the app again from the EHR")
        data = store.get(f"sid:{sid}")
        if not data or data.get("state") != state:
            raise LaunchError("the launch this answer belongs to has expired; please launch the app again")
        if not code:
            raise LaunchError("the EHR's answer has no authorization code")
        config = smart.SmartConfig.from_json(data["config"])
        request_ = smart.build_token_request(config, code=code, redirect_uri=pending["redirect_uri"],
                                             code_verifier=pending["code_verifier"], client_id=settings.client_id)
        try:
            token = smart.send_token_request(request_, http, timeout=settings.http_timeout)
        except LaunchError:
            store.unset(f"sid:{sid}")
            raise
        context = smart.parse_launch_context(token)
        if not context.patient:
            store.unset(f"sid:{sid}")
            raise LaunchError("the EHR did not say which patient the app is for (no patient in the launch context)")
        data.pop("state", None)
        data.update(token=dict(token), context=context.to_json(), csrf=generate_token(43),
                    scopes=list(smart.granted_scopes(token, data["requested_scope"])))
        new_sid = generate_token(48)  # a fresh id once signed in (no session fixation)
        store.unset(f"sid:{sid}")
        store.set(f"sid:{new_sid}", data, ttl=settings.session_ttl)
        log.info("callback: signed in for Patient/%s Encounter/%s session=%s", context.patient,
                 context.encounter or "-", _tag(new_sid))
        response = RedirectResponse("/review", status_code=303)
        set_cookie(request, response, new_sid)
        return response

    # -- the review page and the write

    def review_context(sess: Session, loaded: Loaded) -> dict[str, Any]:
        report = loaded.report
        groups = [(status, title, [e for e in report.elements if e.status == status]) for status, title in _GROUPS]
        return {
            "sess": sess, "report": report, "groups": groups,
            "banner": _banner(loaded.record.patient, sess.patient) if sess.data["context"].get(
                "need_patient_banner") else None,
            "drafts": _draft_view(loaded.drafts) if loaded.drafts else None, "refused": loaded.refused,
            "write_allowed": sess.write_allowed, "missing_write": smart.missing_write_scopes(sess.scopes),
            "csrf": sess.data["csrf"], "ehr_style": bool(sess.data["context"].get("smart_style_url")),
        }

    @app.get("/review", response_class=HTMLResponse, summary="The review page for the launched patient")
    def review(request: Request) -> Response:
        sess = current(request)
        loaded = load(sess)
        response = page(request, "review.html", **review_context(sess, loaded))
        timing_header(response, loaded.timings)
        return response

    @app.post("/write", response_class=HTMLResponse, summary="Confirm, then write the drafts (form, CSRF token)")
    def write(request: Request, csrf: str = Form(""), confirmed: str = Form("")) -> Response:
        sess = current(request)
        check_csrf(sess, csrf)
        require_write(sess)
        loaded = load(sess)
        if loaded.drafts is None:
            return page(request, "error.html", 409, title="No drafts to write", message=loaded.refused or "")
        if confirmed != "yes":
            return page(request, "confirm.html", drafts=_draft_view(loaded.drafts), csrf=sess.data["csrf"],
                        report=loaded.report)
        with fhir(sess) as client:
            result = write_drafts(client, loaded.drafts)
        log.info("write: Patient/%s created %d, existing %d", sess.patient, len(result.created), len(result.existing))
        return page(request, "written.html", result=result, report=loaded.report)

    @app.get("/resource/{resource_type}/{resource_id}", response_class=HTMLResponse,
             summary="A small viewer for one evidence resource of the launched patient")
    def resource(request: Request, resource_type: str, resource_id: str) -> Response:
        sess = current(request)
        if resource_type not in _VIEWABLE:
            raise UsageError(f"{resource_type} resources are not shown here")
        with fhir(sess) as client:
            found = client.read(resource_type, resource_id)
        if _subject_of(found) != sess.patient:
            # the token may be broader than this launch; the session still only sees its own patient
            raise Forbidden("that resource does not belong to the patient this app was launched for")
        return page(request, "resource.html", ref=f"{resource_type}/{resource_id}",
                    text=json.dumps(found, indent=2, ensure_ascii=False))

    # -- the JSON API (same data; session cookie, and the CSRF header on POST)

    @app.get("/api/session", summary="The launch this session is bound to, and its CSRF token")
    def api_session(request: Request) -> dict[str, Any]:
        sess = current(request)
        return {"patient": f"Patient/{sess.patient}",
                "encounter": f"Encounter/{sess.encounter}" if sess.encounter else None,
                "scopes": list(sess.scopes), "write_allowed": sess.write_allowed,
                "missing_write_scopes": smart.missing_write_scopes(sess.scopes), "csrf": sess.data["csrf"],
                "need_patient_banner": bool(sess.data["context"].get("need_patient_banner"))}

    @app.get("/api/report", summary="The documentation report (SPEC §6) for the launched patient")
    def api_report(request: Request) -> Response:
        sess = current(request)
        loaded = load(sess)
        response = JSONResponse(loaded.report.to_json())
        timing_header(response, loaded.timings)
        return response

    @app.get("/api/drafts", summary="The draft transaction Bundle (SPEC §7) and its phases, or why it was refused")
    def api_drafts(request: Request) -> Response:
        sess = current(request)
        loaded = load(sess)
        if loaded.drafts is None:
            return JSONResponse({"error": loaded.refused, "refused": True}, status_code=409)
        view = _draft_view(loaded.drafts)
        return JSONResponse({"drafts": loaded.drafts, "phases": view["careplan"]["phases"],
                             "write_allowed": sess.write_allowed})

    @app.post("/api/write", summary="Write the drafts as one transaction (needs the X-CSRF-Token header)")
    def api_write(request: Request, x_csrf_token: str | None = Header(None)) -> Response:
        sess = current(request)
        check_csrf(sess, x_csrf_token)
        require_write(sess)
        loaded = load(sess)
        if loaded.drafts is None:
            return JSONResponse({"error": loaded.refused, "refused": True}, status_code=409)
        with fhir(sess) as client:
            result = write_drafts(client, loaded.drafts)
        log.info("write: Patient/%s created %d, existing %d", sess.patient, len(result.created), len(result.existing))
        return JSONResponse({**result.to_json(), "summary": result.summary()})

    @app.get("/style.css", include_in_schema=False)
    def style(request: Request) -> Response:
        """The EHR's look (SMART ``smart_style_url``), as CSS variables over our stylesheet.

        Fetched once per session, server-side, only from the issuer's own origin; only values that
        are plainly colours or font names are kept, so the EHR's document cannot inject CSS.
        """
        sid = request.cookies.get(COOKIE)
        data = store.get(f"sid:{sid}") if sid else None
        css = ""
        if data and data.get("token"):
            if "style" not in data:
                data["style"] = _fetch_style(http, (data.get("context") or {}).get("smart_style_url"), data["iss"])
                store.set(f"sid:{sid}", data, ttl=settings.session_ttl)
            css = _style_css(data["style"])
        return Response(css, media_type="text/css")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
