"""Small hand-built R4 records for the rule tests: a right-calf M62.561 patient and what a test adds."""

from __future__ import annotations

from datetime import date
from typing import Any

import simple_icd_10_cm as cm

from fhir_plugin import check, load_profile, records_from_bundle

TODAY = date(2026, 11, 26)
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"
LNC = "http://loinc.org"
PID = "p1"
RIGHT_LOWER_LEG = {"coding": [{"system": SCT, "code": "32696007", "display": "Structure of right lower leg"}]}
LEFT_LOWER_LEG = {"coding": [{"system": SCT, "code": "48979004", "display": "Structure of left lower leg"}]}


def condition(
    cid: str,
    code: str | None = "M62.561",
    *,
    clinical: str | None = "active",
    verification: str = "confirmed",
    body: dict | None = None,
    text: str | None = None,
    notes: tuple[str, ...] = (),
    onset: str | None = "2026-11-01",
    encounter: str | None = None,
    extra_codings: tuple[dict, ...] = (),
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{PID}"},
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]
        },
    }
    if clinical:
        res["clinicalStatus"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": clinical}]
        }
    codings = ([{"system": ICD, "code": code, "display": cm.get_description(code)}] if code else []) + list(
        extra_codings
    )
    res["code"] = {"coding": codings} if codings else {}
    if text:
        res["code"]["text"] = text
    if body:
        res["bodySite"] = [body]
    if onset:
        res["onsetDateTime"] = onset
    if encounter:
        res["encounter"] = {"reference": f"Encounter/{encounter}"}
    if notes:
        res["note"] = [{"text": n} for n in notes]
    return res


def observation(
    oid: str,
    text: str | None = None,
    *,
    value: dict | None = None,
    body: dict | None = None,
    category: str | None = None,
    encounter: str | None = None,
    when: str | None = "2026-11-20",
    status: str = "final",
    code: dict | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": code or {"text": text},
        "subject": {"reference": f"Patient/{PID}"},
    }
    if category:
        res["category"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}
        ]
    if encounter:
        res["encounter"] = {"reference": f"Encounter/{encounter}"}
    if when:
        res["effectiveDateTime"] = when
    if value:
        res.update(value)
    if body:
        res["bodySite"] = body
    if note:
        res["note"] = [{"text": note}]
    return res


def encounter(
    eid: str,
    start: str,
    *,
    status: str = "finished",
    reasons: tuple[str, ...] = ("c1",),
    reason_code: str | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{PID}"},
        "period": {"start": start},
    }
    if reasons:
        res["reasonReference"] = [{"reference": f"Condition/{c}"} for c in reasons]
    if reason_code:
        res["reasonCode"] = [{"coding": [{"system": ICD, "code": reason_code}]}]
    return res


def patient() -> dict[str, Any]:
    return {"resourceType": "Patient", "id": PID}


def right_calf_atrophy(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    """An M62.561 Condition on the right lower leg with atrophy in its note, one visit, and ``extra``."""
    return [
        patient(),
        condition("c1", body=RIGHT_LOWER_LEG, notes=("Disuse atrophy of the right calf.",)),
        encounter("e1", "2026-11-20T09:00:00Z"),
        *extra,
    ]


def report(
    resources: list[dict[str, Any]], code: str = "M62.561", *, encounter_id: str | None = None, today: date = TODAY
) -> dict[str, Any]:
    [record] = [r for r in records_from_bundle(resources) if r.patient_id == PID]
    return check(record, load_profile(code), today=today, encounter_id=encounter_id).to_json()


def element(rep: dict[str, Any], eid: str) -> str:
    return next(e["status"] for e in rep["elements"] if e["id"] == eid)


def flag(rep: dict[str, Any], fid: str) -> str:
    return next(f["status"] for f in rep["red_flags"] if f["id"] == fid)
