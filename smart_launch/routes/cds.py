"""CDS Hooks 2.0 service: the documentation check as cards in the EHR's workflow.

    GET  /cds-services                  discovery: patient-view and order-sign per shipped profile
    POST /cds-services/{id}             a hook call: prefetch, else reads through fhirServer; cards back
    POST /cds-services/{id}/feedback    accepted / overridden outcomes, stored for ``fhir-plugin cds-feedback``

Every POST needs the CDS client's signed JWT (``_cds_auth``); a bad one gets
401 and no reason.  The record goes through the same review pipeline as the
app's; the cards are built by the core's pure ``cards_for_review``.  The
``fhirAuthorization`` token is handed only to a ``FhirClient`` on
``fhirServer`` (which refuses any other URL) and never logged.  Errors are
JSON ``{"error": "<one sentence>"}``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import requests
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fhir_plugin import (
    AuthError,
    CardContext,
    DataUnavailable,
    FhirClient,
    InputError,
    PatientRecord,
    PluginError,
    Profile,
    UsageError,
    available_profiles,
    cards_for_review,
    cds_discovery,
    cds_service_id,
    load_profile,
    needs_review,
    order_sign_cards,
    orders_for_code,
    records_from_bundle,
    strategies_for,
)
from fhir_plugin import review as review_record

from .._cds_auth import JwtVerifier
from .._cds_feedback import FeedbackStore
from .._settings import Settings

__all__ = ["router", "CdsServices", "Service"]

log = logging.getLogger("smart_launch.cds")
router = APIRouter(tags=["CDS Hooks"])

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: prefetch key -> the resource type its template searches (fhir_plugin._cards.PREFETCH)
_PREFETCH_TYPES = {
    "patient": "Patient",
    "conditions": "Condition",
    "observations": "Observation",
    "encounters": "Encounter",
    "carePlans": "CarePlan",
}


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    profile: Profile


@dataclass
class CdsServices:
    """What the CDS routes share, built once by ``create_app``."""

    settings: Settings
    services: dict[str, Service]
    discovery: dict[str, Any]
    store: FeedbackStore
    verifier: JwtVerifier
    today: Callable[[], date]
    clock: Callable[[], float]

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        http: requests.Session | None = None,
        today: Callable[[], date] = date.today,
        clock: Callable[[], float] = time.time,
    ) -> CdsServices:
        profiles = [load_profile(code) for code in available_profiles()]
        discovery = cds_discovery(profiles)
        by_code = {p.code: p for p in profiles}
        services = {}
        for entry in discovery["services"]:
            code = next(c for c in by_code if cds_service_id(entry["hook"], c) == entry["id"])
            services[entry["id"]] = Service(entry["id"], entry["hook"], by_code[code])
        store = FeedbackStore(settings.cds_feedback_store, clock=clock)
        verifier = JwtVerifier(settings.cds_clients, store, http=http or requests.Session(), clock=clock)
        return cls(settings, services, discovery, store, verifier, today, clock)

    def audiences(self, request: Request, service_id: str) -> tuple[str, ...]:
        """The ``aud`` a JWT for ``service_id`` may carry: the service's URL (CDS Hooks 2.0)."""
        bases = {str(request.base_url).rstrip("/")}
        if self.settings.cds_base_url:
            bases = {self.settings.cds_base_url.rstrip("/")}
        return tuple(f"{b}/cds-services/{service_id}" for b in sorted(bases))


def _cds(request: Request) -> CdsServices:
    return request.app.state.cds  # type: ignore[no-any-return]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _unauthorized() -> JSONResponse:
    # no detail of why: the reason is in the log (CDS Hooks 2.0 leaves the body to the service)
    return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


@router.get("/cds-services", summary="CDS Hooks discovery: a patient-view and an order-sign service per profile")
def discovery_document(request: Request) -> dict[str, Any]:
    return _cds(request).discovery


async def _authorized_body(
    request: Request, cds: CdsServices, service_id: str, extra_aud: tuple[str, ...] = ()
) -> tuple[dict[str, Any] | None, Response | None]:
    """The JSON body once the JWT checks out (checked before the body is even parsed)."""
    audiences = cds.audiences(request, service_id) + extra_aud
    try:
        await run_in_threadpool(cds.verifier.verify, request.headers.get("authorization"), audiences)
    except AuthError:
        return None, _unauthorized()
    try:
        body = await request.json()
    except ValueError:
        return None, _error(400, "the request body is not JSON")
    if not isinstance(body, dict):
        return None, _error(400, "the request body must be a JSON object")
    return body, None


@router.post("/cds-services/{service_id}", summary="Call a CDS service (a hook): cards for the patient in context")
async def cds_call(service_id: str, request: Request) -> Response:
    cds = _cds(request)
    service = cds.services.get(service_id)
    if service is None:
        return _error(404, f"no CDS service {service_id!r}; GET /cds-services lists them")
    body, failure = await _authorized_body(request, cds, service_id)
    if failure is not None:
        return failure
    assert body is not None
    try:
        answer, timings = await run_in_threadpool(_answer, cds, service, body)
    except PluginError as exc:
        status = exc.http_status if isinstance(exc, (UsageError, DataUnavailable)) else 502
        if isinstance(exc, InputError):
            status = 400
        return _error(status, str(exc))
    response = JSONResponse(answer)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timings.items())
    return response


@router.post("/cds-services/{service_id}/feedback", summary="Feedback on cards: accepted or overridden")
async def cds_feedback(service_id: str, request: Request) -> Response:
    cds = _cds(request)
    if service_id not in cds.services:
        return _error(404, f"no CDS service {service_id!r}")
    feedback_aud = tuple(a + "/feedback" for a in cds.audiences(request, service_id))
    body, failure = await _authorized_body(request, cds, service_id, feedback_aud)
    if failure is not None:
        return failure
    try:
        stored = await run_in_threadpool(cds.store.add_feedback, service_id, body)
    except UsageError as exc:
        return _error(400, str(exc))
    log.info("cds feedback: %s, %d entries", service_id, stored)
    return JSONResponse({})


# ---------------------------------------------------------------- the hook call, off the event loop


def _resources(value: Any, rtype: str) -> list[dict[str, Any]]:
    """A prefetch value's resources of ``rtype``: a searchset Bundle's entries, or the one resource."""
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        return [
            e["resource"]
            for e in value.get("entry") or []
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == rtype
        ]
    if isinstance(value, dict) and value.get("resourceType") == rtype:
        return [value]
    return []


class _Source:
    """The record of one hook call: the prefetch where it was sent, ``fhirServer`` for the rest."""

    def __init__(self, body: Mapping[str, Any], patient_id: str, timeout: float) -> None:
        self.patient_id = patient_id
        prefetch = body.get("prefetch")
        self.prefetch = prefetch if isinstance(prefetch, dict) else {}
        self.server = body.get("fhirServer") if isinstance(body.get("fhirServer"), str) else None
        auth = body.get("fhirAuthorization")
        self.token = auth.get("access_token") if isinstance(auth, dict) else None
        self.timeout = timeout
        self.reads = 0

    def sent(self, key: str) -> bool:
        return self.prefetch.get(key) is not None  # CDS Hooks: a null prefetch value means "fetch it yourself"

    def _client(self) -> FhirClient:
        if not self.server:
            raise DataUnavailable("the hook call has neither the prefetch nor a fhirServer to read the record from")
        return FhirClient(self.server, token=self.token, timeout=self.timeout, retries=1)

    def _read(self, what: Callable[[FhirClient], Any]) -> Any:
        try:
            with self._client() as client:
                self.reads += 1
                return what(client)
        except PluginError as exc:
            if isinstance(exc, DataUnavailable):
                raise
            raise DataUnavailable(f"the record could not be read from fhirServer ({type(exc).__name__})") from exc

    def conditions(self) -> list[dict[str, Any]]:
        if self.sent("conditions"):
            return _resources(self.prefetch["conditions"], "Condition")
        found: list[dict[str, Any]] = self._read(
            lambda c: c.search("Condition", {"patient": self.patient_id, "_count": 500})
        )
        return [r for r in found if r.get("resourceType") == "Condition"]

    def record(self, conditions: list[dict[str, Any]]) -> PatientRecord:
        by_type: dict[str, list[dict[str, Any]]] = {"Condition": conditions}
        missing = [k for k in _PREFETCH_TYPES if k != "conditions" and not self.sent(k)]
        for key, rtype in _PREFETCH_TYPES.items():
            if key != "conditions" and self.sent(key):
                by_type[rtype] = _resources(self.prefetch[key], rtype)
        if missing:  # the same reader strategy as the app: one round trip on a server that takes a batch
            full: PatientRecord = self._read(lambda c: strategies_for(c).reader.read(self.patient_id))
            for key in missing:
                by_type[_PREFETCH_TYPES[key]] = full.of_type(_PREFETCH_TYPES[key])
        resources = [r for items in by_type.values() for r in items]
        if not resources:
            return PatientRecord(self.patient_id)
        records = {r.patient_id: r for r in records_from_bundle(resources)} if resources else {}
        return records.get(self.patient_id) or PatientRecord(self.patient_id)


def _answer(cds: CdsServices, service: Service, body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    started = time.perf_counter()
    if body.get("hook") not in (None, service.hook):
        raise UsageError(f"service {service.id} answers the {service.hook} hook, not {body.get('hook')!r}")
    context: dict[str, Any] = body["context"] if isinstance(body.get("context"), dict) else {}
    patient_id = str(context.get("patientId") or "")
    if not _ID.fullmatch(patient_id):
        raise UsageError("context.patientId must be a FHIR id")
    encounter_id = context.get("encounterId")
    encounter_id = str(encounter_id).split("/")[-1] if encounter_id else None
    profile = service.profile
    orders: list[str] = []
    if service.hook == "order-sign":  # fast path: no order for this code, nothing to read
        orders = orders_for_code(context.get("draftOrders"), profile)
        if not orders:
            return {"cards": []}, {"total": time.perf_counter() - started}
    source = _Source(body, patient_id, cds.settings.http_timeout)
    conditions = source.conditions()
    if not needs_review(conditions, profile):  # fast path: the code is not under review, no card
        return {"cards": []}, {"read": time.perf_counter() - started, "total": time.perf_counter() - started}
    record = source.record(conditions)
    read_done = time.perf_counter()
    encounters = {r.get("id") for r in record.of_type("Encounter")}
    now = datetime.fromtimestamp(cds.clock(), UTC)
    result = review_record(
        record, profile, today=cds.today(), now=now, encounter_id=encounter_id if encounter_id in encounters else None
    )
    check_done = time.perf_counter()
    base = cds.settings.cds_base_url or ""
    ctx = CardContext(
        service_id=service.id,
        hook_instance=str(body.get("hookInstance") or ""),
        app_launch_url=cds.settings.app_launch_url,
        source_url=(base or cds.settings.app_launch_url.rsplit("/", 1)[0]) + "/",
        encounter=f"Encounter/{encounter_id}" if encounter_id else None,
    )
    if service.hook == "order-sign":
        cards = order_sign_cards(result, profile, ctx, orders, record.resources)
    else:
        cards = cards_for_review(result, profile, ctx, record.resources)
    cds.store.issued(service.id, cards)
    done = time.perf_counter()
    log.info("cds %s: Patient/%s, %d card(s), %d server read(s)", service.id, patient_id, len(cards), source.reads)
    return {"cards": cards}, {
        "read": read_done - started,
        "check": check_done - read_done,
        "cards": done - check_done,
        "total": done - started,
    }
