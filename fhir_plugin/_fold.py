"""Folding the drafts into what a server can create (issue 12, writer d).  Pure.

An EHR that cannot create a CarePlan, Goal or Provenance still takes a
clinical note: the phased plan with its goals becomes one preliminary
DocumentReference on the encounter (``docStatus`` preliminary = an unsigned
draft), its HTML readable by a clinician and the CarePlan with its Goals
attached as FHIR JSON, so nothing of the plan is lost.  The Condition goes in
the category the server accepts (a problem-list item where only that is
declared).  What can be written in no form is named, never dropped silently.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._drafts import _validate
from ._vocab import NOTE_PROVENANCE_EXTENSION, PLAN_NOTE_TYPE, URI_IDENTIFIER

__all__ = ["Folded", "fold_drafts", "PROBLEM_LIST_PROFILE", "ENCOUNTER_DIAGNOSIS_PROFILE"]

PROBLEM_LIST_PROFILE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-problems-health-concerns"
ENCOUNTER_DIAGNOSIS_PROFILE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-encounter-diagnosis"
_CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"


@dataclass(frozen=True)
class Folded:
    """The Bundle to send, each draft's form (``draft type -> form``) and what cannot be written (with why)."""

    drafts: dict[str, Any]
    forms: tuple[tuple[str, str], ...]
    not_written: tuple[tuple[str, str], ...]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _identifier_of(resource: Mapping[str, Any]) -> str:
    return str(next(i["value"] for i in resource.get("identifier") or [] if i.get("system") == URI_IDENTIFIER))


def _plan_note(
    careplan: Mapping[str, Any], goals: list[Mapping[str, Any]], full_url: str, provenance_key: str | None
) -> dict[str, Any]:
    """The CarePlan and its Goals as one preliminary note: the plan's HTML, and its FHIR JSON attached.

    ``provenance_key`` names the Provenance written after the note, so a
    reader can tell a complete set from one cut short between the two (SPEC §7.1).
    """
    narrative = str((careplan.get("text") or {}).get("div", ""))
    goal_items = "".join(f"<li>{_escape(str((g.get('description') or {}).get('text', '')))}</li>" for g in goals)
    html = (
        f"<html><body>{narrative}<p><b>Goals</b></p><ul>{goal_items}</ul>"
        "<p>Machine-drafted; needs clinician review.</p></body></html>"
    )
    attached = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": dict(careplan)}] + [{"resource": dict(g)} for g in goals],
    }
    note: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "meta": careplan.get("meta"),
        "identifier": careplan.get("identifier"),
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [dict(PLAN_NOTE_TYPE)], "text": "Plan of care note"},
        "subject": careplan["subject"],
        "date": f"{careplan['created']}",
        "description": str(careplan.get("title", "Draft care plan")),
        "content": [
            {
                "attachment": {
                    "contentType": "text/html",
                    "data": _b64(html),
                    "title": str(careplan.get("title", "Draft care plan")),
                }
            },
            {
                "attachment": {
                    "contentType": "application/fhir+json",
                    "data": _b64(json.dumps(attached)),
                    "title": "The draft CarePlan and Goals (FHIR R4 JSON)",
                }
            },
        ],
    }
    if provenance_key:
        note["extension"] = [{"url": NOTE_PROVENANCE_EXTENSION, "valueString": provenance_key}]
    if careplan.get("encounter"):
        note["context"] = {"encounter": [dict(careplan["encounter"])]}
    _validate(note, name="plan note")
    return {
        "fullUrl": full_url,
        "resource": note,
        "request": {
            "method": "POST",
            "url": "DocumentReference",
            "ifNoneExist": f"identifier={URI_IDENTIFIER}|{_identifier_of(careplan)}"
            f"&subject={careplan['subject']['reference']}",
        },
    }


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fold_drafts(
    drafts: Mapping[str, Any], can_create: Callable[[str], bool], *, condition_category: str | None = None
) -> Folded:
    """The drafts reshaped for a server that creates only what ``can_create`` allows.

    ``condition_category`` (``problem-list-item`` or ``encounter-diagnosis``)
    replaces the drafted Condition's category when the server takes only that.
    """
    entries = [dict(e) for e in drafts.get("entry") or []]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry)
    forms: list[tuple[str, str]] = []
    not_written: list[tuple[str, str]] = []
    out: list[dict[str, Any]] = []
    dropped_urls: set[str] = set()
    fold_plan = not (can_create("CarePlan") and can_create("Goal")) and can_create("DocumentReference")
    provenance_key = next(
        (
            str(t["code"])
            for e in by_type.get("Provenance", [])
            for t in (e["resource"].get("meta") or {}).get("tag") or []
            if t.get("system") == URI_IDENTIFIER
        ),
        None,
    )
    if not can_create("Provenance"):
        provenance_key = None

    for entry in entries:
        resource = entry["resource"]
        rtype = resource["resourceType"]
        if rtype == "Condition":
            if not can_create("Condition"):
                not_written.append(("Condition", "the server creates no Condition"))
                dropped_urls.add(entry["fullUrl"])
                continue
            if condition_category and condition_category != resource["category"][0]["coding"][0]["code"]:
                resource = dict(
                    resource, category=[{"coding": [{"system": _CONDITION_CATEGORY, "code": condition_category}]}]
                )
                entry = dict(entry, resource=resource)
            forms.append(
                (
                    "Condition",
                    f"Condition ({resource['category'][0]['coding'][0]['code']}, "
                    f"{resource['verificationStatus']['coding'][0]['code']})",
                )
            )
            out.append(entry)
        elif rtype in ("Goal", "CarePlan") and fold_plan:
            dropped_urls.add(entry["fullUrl"])
            if rtype == "CarePlan":
                goals = [g["resource"] for g in by_type.get("Goal", [])]
                out.append(_plan_note(resource, goals, entry["fullUrl"], provenance_key))
                forms.append(("CarePlan", "DocumentReference (preliminary plan note, CarePlan JSON attached)"))
                dropped_urls.discard(entry["fullUrl"])  # the note keeps the plan's placeholder
            else:
                forms.append(("Goal", "in the plan note (DocumentReference)"))
        elif rtype in ("Goal", "CarePlan") and not can_create(rtype):
            not_written.append((rtype, f"the server creates no {rtype} and no DocumentReference"))
            dropped_urls.add(entry["fullUrl"])
        elif rtype == "Provenance" and not can_create("Provenance"):
            not_written.append(
                (
                    "Provenance",
                    "the server creates no Provenance; the note and the Condition carry the machine-drafted tag",
                )
            )
        else:
            forms.append((rtype, rtype))
            out.append(entry)

    # a Provenance keeps only targets still written (the note stands in for the plan and its goals)
    for index, entry in enumerate(out):
        if entry["resource"]["resourceType"] == "Provenance":
            targets = [t for t in entry["resource"]["target"] if t["reference"] not in dropped_urls]
            out[index] = dict(entry, resource=dict(entry["resource"], target=targets))
    return Folded({**drafts, "entry": out}, tuple(forms), tuple(not_written))
