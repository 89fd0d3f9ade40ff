"""Every cross-cutting need of a handler, as an ``Annotated[..., Depends()]`` type it declares.

    SettingsDep     Settings              the app's configuration
    SessionsDep     Sessions              the typed session store (state.py)
    HttpDep         requests.Session      discovery, the token exchange, the EHR's style (no bearer token on it)
    CacheDep        DiscoveryCache        discovered SMART configurations per issuer
    ProfileDep      Profile               the condition profile the app checks
    PagesDep        Pages                 the page / refusal renderer (views.py)
    ClockDep        Callable[[], float]   epoch seconds; tests pass a clock they move instead of sleeping
    Today           date                  "today" for the check
    Now             datetime              now (UTC), from the clock
    MaybeSession    LaunchSession | None  this browser's signed-in session, if any
    CurrentSession  LaunchSession         the signed-in session, else NotLaunched (401)
    Fhir            FhirClient            a client on the session's issuer whose token refreshes and is saved
    FormCsrf        LaunchSession         the session, once the form's ``csrf`` field matched its token
    HeaderCsrf      LaunchSession         the session, once the ``X-CSRF-Token`` header matched its token
    MayWrite        LaunchSession         the session, once its scopes let it create every draft type
    ReviewedDep     Reviewed              the patient's record read and run through the review pipeline

A handler lists them in the order the checks must happen: FastAPI solves a
handler's dependencies in the order of its parameters, and each is solved once
per request (so ``CurrentSession``, ``FormCsrf`` and ``MayWrite`` share one
session).  The app-wide objects live in ``AppServices`` on ``app.state``.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Annotated, Any

import requests
from fastapi import Depends, Form, Header, Request

from fhir_plugin import (
    DraftWriter,
    Existing,
    FhirClient,
    Forbidden,
    NotLaunched,
    PatientRecord,
    Profile,
    Report,
    UsageError,
    available_profiles,
    detected_strategies,
    load_profile,
    server_capabilities,
)
from fhir_plugin import review as review_record

from . import _launch as smart
from ._settings import Settings
from .state import LaunchSession, Sessions
from .views import Pages

__all__ = [
    "AppServices",
    "COOKIE",
    "cookie_name",
    "valid_lid",
    "Reviewed",
    "SettingsDep",
    "SessionsDep",
    "HttpDep",
    "CacheDep",
    "ProfileDep",
    "PagesDep",
    "ClockDep",
    "Today",
    "Now",
    "MaybeSession",
    "CurrentSession",
    "Fhir",
    "FormCsrf",
    "HeaderCsrf",
    "MayWrite",
    "ReviewedDep",
]

#: the session cookie: an opaque random id; everything else stays server-side.  ``fp_sid`` holds the
#: browser's latest launch; ``fp_sid_<launch>`` each launch's own, read when a page names its ``launch``.
COOKIE = "fp_sid"
_LID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def cookie_name(lid: str | None) -> str:
    """The cookie of launch ``lid`` (one session per launch), or the browser's latest launch's."""
    return f"{COOKIE}_{lid}" if lid else COOKIE


def valid_lid(lid: str | None) -> bool:
    return bool(lid) and _LID.fullmatch(lid or "") is not None


@dataclass(frozen=True)
class AppServices:
    """The app-wide objects ``create_app`` builds once; dependencies hand out the piece a handler asks for."""

    settings: Settings
    sessions: Sessions
    http: requests.Session
    cache: smart.DiscoveryCache[smart.SmartConfig]
    profile: Profile
    pages: Pages
    today: Callable[[], date]
    clock: Callable[[], float] = time.time


def services(request: Request) -> AppServices:
    return request.app.state.services  # type: ignore[no-any-return]


Services = Annotated[AppServices, Depends(services)]


def _settings(s: Services) -> Settings:
    return s.settings


def _sessions(s: Services) -> Sessions:
    return s.sessions


def _http(s: Services) -> requests.Session:
    return s.http


def _cache(s: Services) -> smart.DiscoveryCache[smart.SmartConfig]:
    return s.cache


_SHIPPED: dict[str, Profile] = {}


def _profile(s: Services, request: Request) -> Profile:
    """The app's profile, or another that ships when the page asks for it (``?code=``: a mismatch's suggestion)."""
    code = request.query_params.get("code")
    if not code or code == s.profile.code:
        return s.profile
    if code not in available_profiles():
        raise UsageError(f"this app has no profile for {code[:20]}, so it cannot review under that code")
    if code not in _SHIPPED:
        _SHIPPED[code] = load_profile(code)
    return _SHIPPED[code]


def _pages(s: Services) -> Pages:
    return s.pages


def _clock(s: Services) -> Callable[[], float]:
    return s.clock


def _today(s: Services) -> date:
    return s.today()


def _now(s: Services) -> datetime:
    return datetime.fromtimestamp(s.clock(), UTC)


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionsDep = Annotated[Sessions, Depends(_sessions)]
HttpDep = Annotated[requests.Session, Depends(_http)]
CacheDep = Annotated[smart.DiscoveryCache[smart.SmartConfig], Depends(_cache)]
ProfileDep = Annotated[Profile, Depends(_profile)]
PagesDep = Annotated[Pages, Depends(_pages)]
ClockDep = Annotated[Callable[[], float], Depends(_clock)]
Today = Annotated[date, Depends(_today)]
Now = Annotated[datetime, Depends(_now)]


# ---------------------------------------------------------------- the session


def _maybe_session(request: Request, sessions: SessionsDep) -> LaunchSession | None:
    """The launch a page names (``?launch=``) through its own cookie; without one, the browser's latest launch.

    A page of launch A always reads A's session, whatever was launched since in another tab.
    """
    lid = request.query_params.get("launch")
    if lid is not None and not valid_lid(lid):
        return None
    sid = request.cookies.get(cookie_name(lid))
    state = sessions.get(sid)
    if not sid or not state or not state.signed_in or (lid is not None and state.lid != lid):
        return None
    return LaunchSession(sid, state)


MaybeSession = Annotated[LaunchSession | None, Depends(_maybe_session)]


def _current_session(sess: MaybeSession) -> LaunchSession:
    """Every later request reads the patient bound at launch; no route takes a patient id from the browser."""
    if sess is None:
        raise NotLaunched(
            "there is no active launch in this browser (or it has expired); open the app from the EHR again"
        )
    return sess


CurrentSession = Annotated[LaunchSession, Depends(_current_session)]


def _fhir(sess: CurrentSession, s: Services) -> Iterator[FhirClient]:
    """A FHIR client on the session's issuer whose token refreshes itself and is saved back."""

    def save(new_token: dict[str, Any]) -> None:
        latest = s.sessions.get(sess.sid) or sess.state
        s.sessions.put(sess.sid, replace(latest, token=new_token), ttl=s.settings.session_ttl)

    assert sess.state.token is not None  # signed in
    oauth = smart.authorized_session(
        sess.state.token,
        client_id=s.settings.client_id,
        token_endpoint=sess.state.config.token_endpoint,
        on_refresh=save,
        leeway=s.settings.refresh_leeway,
        timeout=s.settings.http_timeout,
        clock=s.clock,
    )
    try:
        yield FhirClient(sess.state.iss, session=oauth, timeout=s.settings.http_timeout, retries=2)
    finally:
        oauth.close()


Fhir = Annotated[FhirClient, Depends(_fhir)]


# ---------------------------------------------------------------- the checks before a write


def _check_csrf(sess: LaunchSession, sent: str | None) -> LaunchSession:
    expected = sess.csrf
    if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden(
            "the form's security token does not match this session; reload the review page "
            "and try again (nothing was written)"
        )
    return sess


def _form_csrf(sess: CurrentSession, csrf: Annotated[str, Form()] = "") -> LaunchSession:
    return _check_csrf(sess, csrf)


def _header_csrf(sess: CurrentSession, x_csrf_token: Annotated[str | None, Header()] = None) -> LaunchSession:
    return _check_csrf(sess, x_csrf_token)


FormCsrf = Annotated[LaunchSession, Depends(_form_csrf)]
HeaderCsrf = Annotated[LaunchSession, Depends(_header_csrf)]


def _write_access(sess: CurrentSession, client: Fhir) -> smart.WriteAccess:
    """What the granted scopes let the writer chosen for this EHR write (issue 12, item 5).

    The server's declared creates come from its CapabilityStatement (cached
    per server); a folded form it takes (the plan as a DocumentReference note)
    counts, so a grant without CarePlan or Goal create can still write there.
    """
    declared = server_capabilities(client)
    can_create = declared.can_create if declared is not None and declared.declared and declared.types else None
    return smart.write_access(sess.scopes, can_create)


WriteAccessDep = Annotated[smart.WriteAccess, Depends(_write_access)]


def _may_write(sess: CurrentSession, access: WriteAccessDep) -> LaunchSession:
    if not access.allowed:
        raise Forbidden(
            "the EHR did not grant this app permission to create "
            + ", ".join(access.missing)
            + " resources, so nothing was written"
        )
    return sess


MayWrite = Annotated[LaunchSession, Depends(_may_write)]


# ---------------------------------------------------------------- the review


@dataclass(frozen=True)
class Reviewed:
    """The session's patient's record and what the review pipeline made of it, with how long each took."""

    record: PatientRecord
    report: Report
    drafts: dict[str, Any] | None
    refused: str | None
    timings: dict[str, float]
    #: what the record already holds (SPEC §7.1) and why nothing new is offered, if so
    existing: Existing = Existing()
    settled: str | None = None
    profile: Profile | None = None

    def server_timing(self) -> str:
        """The Server-Timing header (W3C): the check's own share for the benchmark; durations only, no data."""
        return ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in self.timings.items())


def _reviewed(sess: CurrentSession, client: Fhir, profile: ProfileDep, today: Today, now: Now) -> Reviewed:
    """Read the record (one round trip through the chosen reader) and run the one review pipeline."""
    t0 = time.perf_counter()
    record = detected_strategies(client).reader.read(sess.patient)
    t1 = time.perf_counter()
    result = review_record(record, profile, today=today, now=now, encounter_id=sess.encounter)
    t2 = time.perf_counter()
    return Reviewed(
        record,
        result.report,
        result.drafts,
        result.refused,
        {"read": t1 - t0, "review": t2 - t1},
        result.existing,
        result.settled,
        profile,
    )


ReviewedDep = Annotated[Reviewed, Depends(_reviewed)]


def _writer(client: Fhir, s: Services, access: WriteAccessDep) -> DraftWriter:
    """The writer the EHR's CapabilityStatement calls for (issue 12), unless the settings force one; it creates
    only the types the grant allows and folds (or names) the rest."""
    settings = s.settings
    return detected_strategies(
        client, strategy=settings.write_strategy, ledger=settings.ledger_store, creatable=access.creatable
    ).writer


WriterDep = Annotated[DraftWriter, Depends(_writer)]
