"""Drafting: a report and its profile in, one FHIR R4 transaction Bundle out (SPEC §7). Pure.

Every entry is a conditional create keyed on an identifier derived from
patient + encounter + code AND on the patient itself (``subject=``; the
Provenance on the Condition it targets), so sending the same drafts twice
writes nothing new, and a resource planted for another patient with a
computed identifier never matches (issue 11, item 3).  The CarePlan carries
the profile's PlanDefinition phases in order, one activity per protocol
activity, each tagged with its phase; ``phases_of`` reads them back from a
CarePlan as the server returns it.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ._errors import DraftsRefused, InputError, UsageError
from ._profile import Profile
from ._record import PatientRecord
from ._report import Report
from ._version import __version__
from ._vocab import (
    DRAFT_TAG,
    ICD10CM,
    NOTE_PROVENANCE_EXTENSION,
    PHASE_EXTENSION,
    PLAN_NOTE_TYPE,
    PLUGIN_NAME,
    SNOMED,
    URI_IDENTIFIER,
    is_plugin_draft,
)

__all__ = [
    "build_drafts",
    "is_plan_note",
    "drafts_refusal",
    "draft_identifiers",
    "phases_of",
    "Phase",
    "DraftsRefused",
    "Existing",
    "existing_in",
    "drafted_plans",
    "DraftedPlan",
]

_NAMESPACE = uuid.UUID("6f1d8a52-3c0e-5b7e-9a51-2f4c8e1d0b37")
_CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_CAREPLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"
_WEEK_DAYS = {"wk": 7, "d": 1, "mo": 30}
# SPEC §7.1: which existing Conditions and CarePlans count
_VOID_VERIFICATION = frozenset({"entered-in-error", "refuted"})
_ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})
_CLOSED_PLAN = frozenset({"entered-in-error", "revoked", "completed"})
#: the largest attached plan decoded from a note (base64 characters): the plugin's own is a few tens of kB
_MAX_ATTACHED = 2_000_000


@dataclass(frozen=True)
class Existing:
    """What the record already holds that the drafts must build on instead of repeating (SPEC §7.1)."""

    #: a clinician's Condition with the profile's code, in use: no Condition is drafted, the plan addresses it
    condition: str | None = None
    #: a clinician's open CarePlan for a matching Condition: no CarePlan, Goals or Provenance are drafted
    careplan: str | None = None
    #: the plugin's own drafts already on the server (after a write): nothing new is offered
    written: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"condition": self.condition, "careplan": self.careplan, "written": list(self.written)}


def _code(resource: Mapping[str, Any], name: str) -> str | None:
    codings = (resource.get(name) or {}).get("coding") or []
    return codings[0].get("code") if codings else None


def _has_code(condition: Mapping[str, Any], code: str) -> bool:
    return any(
        c.get("code") == code and c.get("system") in (ICD10CM, None)
        for c in (condition.get("code") or {}).get("coding") or []
    )


def _ref(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource.get('id')}"


def existing_in(record: PatientRecord, profile: Profile) -> Existing:
    """The Condition, the plan and the plugin's own drafts ``record`` already holds (SPEC §7.1). Pure."""
    conditions = [
        r
        for r in record.of_type("Condition")
        if _has_code(r, profile.code) and _code(r, "verificationStatus") not in _VOID_VERIFICATION
    ]
    clinician = [r for r in conditions if not is_plugin_draft(r) and _code(r, "clinicalStatus") in _ACTIVE_CLINICAL]
    # a confirmed diagnosis first, then the earliest recorded: the one the chart already relies on
    clinician.sort(
        key=lambda r: (
            _code(r, "verificationStatus") != "confirmed",
            str(r.get("recordedDate") or ""),
            str(r.get("id")),
        )
    )
    matching = {_ref(r) for r in conditions}
    plans = [
        r
        for r in record.of_type("CarePlan")
        if r.get("status") not in _CLOSED_PLAN and {a.get("reference") for a in r.get("addresses") or []} & matching
    ]
    own_plans = [r for r in plans if is_plugin_draft(r)]
    written: list[str] = []
    for plan in own_plans:
        written.append(_ref(plan))
        written += [
            a["reference"]
            for a in plan.get("addresses") or []
            if a.get("reference") in matching
            and any(is_plugin_draft(c) and _ref(c) == a["reference"] for c in conditions)
        ]
        written += [g["reference"] for g in plan.get("goal") or [] if g.get("reference")]
        written += [
            _ref(p)
            for p in record.of_type("Provenance")
            if is_plugin_draft(p) and _ref(plan) in {t.get("reference") for t in p.get("target") or []}
        ]
    # SPEC §7.1 on a server without CarePlan create: the plan went as a note; its set is written once the
    # Provenance that follows the note (where one is written) is there too
    for noted in drafted_plans(record):
        addressed = {a.get("reference") for a in noted.careplan.get("addresses") or []}
        if not addressed & matching or not noted.complete:
            continue
        written.append(noted.ref)
        written += sorted(_ref(c) for c in conditions if is_plugin_draft(c) and _ref(c) in addressed)
        written += [_ref(p) for p in noted.provenances]
    other_plans = sorted(_ref(r) for r in plans if not is_plugin_draft(r))
    return Existing(
        condition=_ref(clinician[0]) if clinician else None,
        careplan=other_plans[0] if other_plans else None,
        written=tuple(dict.fromkeys(written)),
    )


@dataclass(frozen=True)
class DraftedPlan:
    """The plugin's plan as a server without CarePlan create holds it: a preliminary note, the CarePlan attached."""

    #: the note (``DocumentReference/id``): what the report names as the proposed plan
    ref: str
    #: the attached CarePlan, its placeholders of drafts now on the server replaced by their ids
    careplan: dict[str, Any]
    #: the plugin's Provenances in the record about the note
    provenances: tuple[dict[str, Any], ...]
    #: every draft of the note's set is on the server (the Provenance the note names, if it names one)
    complete: bool


def _attached_plan(note: Mapping[str, Any]) -> dict[str, Any] | None:
    """The CarePlan attached to a plan note as FHIR JSON (``_fold``), or None when there is none readable."""
    for content in note.get("content") or []:
        attachment = content.get("attachment") or {}
        data = attachment.get("data")
        if attachment.get("contentType") != "application/fhir+json" or not isinstance(data, str):
            continue
        if len(data) > _MAX_ATTACHED:
            return None
        try:
            bundle = json.loads(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            return None
        entries = bundle.get("entry") if isinstance(bundle, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "CarePlan":
                return resource
    return None


def is_plan_note(resource: Mapping[str, Any]) -> bool:
    """A plan-of-care note the plugin wrote and did not withdraw: where its plan is on an EHR without CarePlan create."""
    codings = (resource.get("type") or {}).get("coding") or []
    return (
        resource.get("resourceType") == "DocumentReference"
        and is_plugin_draft(resource)
        and resource.get("status") != "entered-in-error"
        and resource.get("docStatus") != "entered-in-error"
        and any(
            c.get("system") == PLAN_NOTE_TYPE["system"] and c.get("code") == PLAN_NOTE_TYPE["code"] for c in codings
        )
    )


def _identifier_values(resource: Mapping[str, Any]) -> set[str]:
    return {str(i.get("value")) for i in resource.get("identifier") or [] if i.get("system") == URI_IDENTIFIER}


def _local(reference: Any) -> str:
    """``Type/id`` of a reference, whatever base or ``_history`` suffix it carries."""
    parts = [p for p in str(reference or "").split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def _placeholder(identifier: str) -> str:
    """The ``fullUrl`` a draft with ``identifier`` had in the transaction Bundle (``build_drafts``)."""
    return f"urn:uuid:{_uuid(identifier, 'fullUrl')}"


def drafted_plans(record: PatientRecord) -> list[DraftedPlan]:
    """The plugin's plan notes in ``record`` as the plans they carry (issue 12, writer d; SPEC §7.1). Pure.

    Only a note the plugin drafted counts, and only with its own CarePlan
    attached (the same identifier, the same patient): its phases are the
    plugin's, so it stands for the draft CarePlan — a proposed plan, never
    evidence.  The plan's placeholders for drafts written beside it (the
    Condition it addresses) become those drafts' ids.
    """
    placed = {
        _placeholder(value): _ref(r)
        for r in record.resources
        if is_plugin_draft(r) and r.get("id")
        for value in _identifier_values(r)
    }
    provenances = [p for p in record.of_type("Provenance") if is_plugin_draft(p)]
    out: list[DraftedPlan] = []
    for note in record.of_type("DocumentReference"):
        if not is_plan_note(note) or not note.get("id"):
            continue
        plan = _attached_plan(note)
        subject = (note.get("subject") or {}).get("reference")
        if (
            plan is None
            or not is_plugin_draft(plan)
            or not _identifier_values(plan) & _identifier_values(note)
            or (plan.get("subject") or {}).get("reference") != subject
        ):
            continue
        ref = _ref(note)
        plan = dict(
            plan,
            addresses=[
                {**a, "reference": placed.get(str(a.get("reference")), a.get("reference"))}
                for a in plan.get("addresses") or []
                if isinstance(a, dict)
            ],
        )
        about = tuple(p for p in provenances if ref in {_local(t.get("reference")) for t in p.get("target") or []})
        expected = {
            str(e.get("valueString")) for e in note.get("extension") or [] if e.get("url") == NOTE_PROVENANCE_EXTENSION
        }
        tags = {
            str(t.get("code"))
            for p in about
            for t in (p.get("meta") or {}).get("tag") or []
            if t.get("system") == URI_IDENTIFIER
        }
        out.append(DraftedPlan(ref, plan, about, expected <= tags))
    return out


@dataclass(frozen=True)
class Phase:
    """One protocol phase as read back from a CarePlan."""

    number: int
    title: str
    goals: tuple[str, ...]
    activities: tuple[str, ...]
    start: str | None
    end: str | None


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "|".join(parts)))


def draft_identifiers(report: Report, profile: Profile) -> dict[str, str]:
    """The stable identifier value of every draft, keyed by draft name (condition, careplan, goal ids, provenance)."""
    base = (report.patient, report.encounter or "-", profile.code)
    names = ["condition", "careplan", "provenance"] + [g["id"] for g in profile.plan_definition.get("goal", [])]
    return {name: f"urn:uuid:{_uuid(*base, name)}" for name in names}


def _identifier(value: str) -> list[dict[str, str]]:
    return [{"system": URI_IDENTIFIER, "value": value}]


def _meta() -> dict[str, Any]:
    return {"tag": [dict(DRAFT_TAG)]}


def _entry(resource: dict[str, Any], full_url: str, identifier: str) -> dict[str, Any]:
    # The identifiers are computable by anyone, so the match is bound to the patient too (issue 11, item 3).
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={URI_IDENTIFIER}|{identifier}&subject={resource['subject']['reference']}",
        },
    }


def _offset(start: date, quantity: Mapping[str, Any] | None) -> date | None:
    if not quantity or not isinstance(quantity.get("value"), (int, float)):
        return None
    days = _WEEK_DAYS.get(str(quantity.get("code") or quantity.get("unit")), 7)
    return start + timedelta(days=int(quantity["value"] * days))


def _narrative(title: str, lines: list[str]) -> dict[str, str]:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p><b>{html.escape(title)}</b></p><ul>{items}</ul></div>',
    }


def _gap_note(report: Report) -> str:
    gaps = report.gaps()
    if not gaps:
        return "Machine-drafted for clinician review. The documentation check found no gaps."
    listed = "; ".join(f"{g.id} ({g.status}: {g.detail})" for g in gaps)
    return f"Machine-drafted for clinician review. Documentation gaps: {listed}."


def _validate(resource: Mapping[str, Any], *, name: str | None = None) -> Any:
    """The R4 model of ``resource``; a failure is a bug in drafting or in a profile, never the user's input."""
    try:
        return get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "root")
        raise InputError(
            f"the drafted {name or resource['resourceType']} is not valid R4 at {where}: {first.get('msg')}"
        ) from exc


def drafts_refusal(report: Report, profile: Profile) -> str | None:
    """Why no drafts may be made for this report (SPEC §5, §7: a code mismatch), or None when they may."""
    if report.code_fit.status != "mismatch":
        return None
    first = report.code_fit.suggested[0] if report.code_fit.suggested else None
    why = first.reason if first else report.code_fit.detail
    codes = ", ".join(s.code for s in report.code_fit.suggested) or "another code"
    return (
        f"no drafts were made: {report.patient}'s documentation does not support "
        f"{profile.code} ({why}); suggested {codes}"
    )


def build_drafts(
    report: Report, profile: Profile, *, now: datetime, existing: Existing | None = None
) -> dict[str, Any]:
    """The transaction Bundle of SPEC §7 for one checked patient, around what ``existing`` names (§7.1).

    Refuses (DraftsRefused) when the code fit is a mismatch: the record then
    supports another code, and a draft of this one would put a wrong code in
    the chart.  With an existing Condition none is drafted and the plan
    addresses it; with an existing plan no CarePlan, Goals or Provenance are.
    """
    refused = drafts_refusal(report, profile)
    if refused:
        raise DraftsRefused(refused)
    existing = existing or Existing()
    if existing.condition and existing.careplan:
        raise UsageError(f"nothing to draft: {existing.careplan} already addresses {existing.condition}")
    ids = draft_identifiers(report, profile)
    urls = {name: f"urn:uuid:{_uuid(value, 'fullUrl')}" for name, value in ids.items()}
    subject = {"reference": report.patient}
    encounter = {"reference": report.encounter} if report.encounter else None
    start = date.fromisoformat(report.reference_date) if report.reference_date else now.date()
    recorded = now.isoformat(timespec="seconds")

    evidence = sorted({ref for e in report.elements if e.status == "met" for ref in e.evidence})
    condition: dict[str, Any] = {
        "resourceType": "Condition",
        "meta": _meta(),
        "identifier": _identifier(ids["condition"]),
        "clinicalStatus": {"coding": [{"system": _CONDITION_CLINICAL, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": _CONDITION_VERIFICATION, "code": "provisional"}]},
        "category": [
            {
                "coding": [
                    {"system": _CONDITION_CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": ICD10CM, "code": profile.code, "display": profile.display},
                {"system": SNOMED, **profile.raw["snomed"]},
            ],
            "text": profile.display,
        },
        "bodySite": [
            {
                "coding": [dict(profile.raw["site"]["draft_body_site"])],
                "text": profile.raw["site"]["draft_body_site"]["display"],
            }
        ],
        "subject": subject,
        "recordedDate": recorded,
        "note": [{"text": _gap_note(report)}],
    }
    if encounter:
        condition["encounter"] = encounter
    if report.onset_date:
        condition["onsetDateTime"] = report.onset_date
    if evidence:
        condition["evidence"] = [{"detail": [{"reference": ref} for ref in evidence]}]

    # SPEC §7.1: the plan addresses the chart's own diagnosis when there is one
    addressed = existing.condition or urls["condition"]
    plan = profile.plan_definition
    goals: list[tuple[str, dict[str, Any]]] = []
    goal_urls: dict[str, str] = {}
    for goal in plan.get("goal", []):
        gid = goal["id"]
        goal_urls[gid] = urls[gid]
        resource = {
            "resourceType": "Goal",
            "meta": _meta(),
            "identifier": _identifier(ids[gid]),
            "lifecycleStatus": "proposed",
            "description": dict(goal["description"]),
            "subject": subject,
            "addresses": [{"reference": addressed}],
            "startDate": start.isoformat(),
            "note": [{"text": f"{(goal.get('category') or {}).get('text', gid)}. Drafted for clinician review."}],
        }
        if goal.get("target"):
            resource["target"] = [dict(t) for t in goal["target"]]
        goals.append((gid, resource))

    activities: list[dict[str, Any]] = []
    lines: list[str] = []
    # the referral's rule and wording are profile data (SPEC §4, §7.1: it leads the plan)
    present = [f.id for f in report.red_flags if f.status == "present"]
    referral = profile.referral
    held = referral.applies(present)
    if held:
        activities.append(
            {
                "detail": {
                    "kind": "ServiceRequest",
                    "code": {"text": referral.activity},
                    "status": "not-started",
                    "description": referral.text(referral.description, present),
                    "scheduledPeriod": {"start": start.isoformat()},
                }
            }
        )
        lines.append(referral.text(referral.narrative, present))
    for index, phase in enumerate(plan.get("action", []), start=1):
        number = int(phase.get("prefix") or index)
        phase_start = _offset(start, (phase.get("timingRange") or {}).get("low")) or start
        phase_end = _offset(start, (phase.get("timingRange") or {}).get("high"))
        period = {"start": phase_start.isoformat(), **({"end": phase_end.isoformat()} if phase_end else {})}
        phase_goals = [{"reference": goal_urls[g]} for g in phase.get("goalId", []) if g in goal_urls]
        if held:  # SPEC §7.1: red flags hold the protocol until the evaluation
            phase_status: dict[str, Any] = {
                "status": "on-hold",
                "statusReason": {"text": referral.text(referral.hold_reason, present)},
            }
        else:
            phase_status = {"status": "not-started"}
        lines.append(
            f"Phase {number}: {phase['title']} ({period['start']} to {period.get('end', 'open')}) - "
            + "; ".join(a["title"] for a in phase.get("action", []))
        )
        for act in phase.get("action", []):
            source = "; ".join(d.get("display", "") for d in act.get("documentation", []) if d.get("display"))
            extension = [{"url": "number", "valueInteger": number}, {"url": "title", "valueString": phase["title"]}]
            if source:
                extension.append({"url": "source", "valueString": source})
            detail: dict[str, Any] = {"code": {"text": act["title"]}, **phase_status, "scheduledPeriod": dict(period)}
            if act.get("description"):
                detail["description"] = act["description"]
            if phase_goals:
                detail["goal"] = phase_goals
            activities.append({"extension": [{"url": PHASE_EXTENSION, "extension": extension}], "detail": detail})

    if held:
        lines.insert(1, referral.hold_narrative)
    title = f"Draft care plan: {profile.display}"
    careplan: dict[str, Any] = {
        "resourceType": "CarePlan",
        "meta": _meta(),
        "identifier": _identifier(ids["careplan"]),
        "text": _narrative(title + " (needs clinician review)", lines),
        "instantiatesCanonical": [f"{plan['url']}|{plan['version']}" if plan.get("version") else plan["url"]],
        "status": "draft",
        "intent": "proposal",
        "category": [{"coding": [{"system": _CAREPLAN_CATEGORY, "code": "assess-plan"}]}],
        "title": title,
        "description": "Phased treatment drafted by the documentation plugin from the condition profile; "
        "it needs clinician review before use.",
        "subject": subject,
        "period": {"start": start.isoformat()},
        "created": recorded,
        "addresses": [{"reference": addressed}],
        "goal": [{"reference": goal_urls[gid]} for gid, _ in goals],
        "activity": activities,
        "note": [
            {
                "text": "Machine-drafted; needs clinician review."
                + (f" It addresses the existing {existing.condition}." if existing.condition else "")
            }
        ],
    }
    if encounter:
        careplan["encounter"] = encounter

    targets = (
        ([] if existing.condition else [urls["condition"]]) + [urls["careplan"]] + [goal_urls[gid] for gid, _ in goals]
    )
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "meta": {"tag": [dict(DRAFT_TAG), {"system": URI_IDENTIFIER, "code": ids["provenance"]}]},
        "target": [{"reference": t} for t in targets],
        "recorded": recorded,
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": {"display": f"{PLUGIN_NAME} {__version__}"},
            }
        ],
        "entity": [{"role": "source", "what": {"reference": ref}} for ref in evidence],
    }
    if not provenance["entity"]:
        del provenance["entity"]

    entries = [] if existing.condition else [_entry(condition, urls["condition"], ids["condition"])]
    if existing.careplan:  # SPEC §7.1: an active plan exists, so only the missing diagnosis is drafted
        return _bundle(entries)
    entries += [_entry(resource, goal_urls[gid], ids[gid]) for gid, resource in goals]
    entries.append(_entry(careplan, urls["careplan"], ids["careplan"]))
    # Provenance has no identifier element in R4: its conditional create keys on a tag instead, and
    # on its target CarePlan (the server resolves the urn:uuid placeholder to the patient's CarePlan)
    entries.append(
        {
            "fullUrl": urls["provenance"],
            "resource": provenance,
            "request": {
                "method": "POST",
                "url": "Provenance",
                "ifNoneExist": f"_tag={URI_IDENTIFIER}|{ids['provenance']}&target={urls['careplan']}",
            },
        }
    )
    return _bundle(entries)


def _bundle(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The transaction Bundle of ``entries``, every resource validated as R4."""
    models = [_validate(entry["resource"]) for entry in entries]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    # The envelope is checked around the models just made: validating the plain Bundle would
    # check every resource a second time (half of drafting's CPU).
    _validate(
        dict(bundle, entry=[dict(e, resource=m) for e, m in zip(entries, models, strict=True)]),
        name="transaction Bundle",
    )
    return bundle


def phases_of(careplan: Mapping[str, Any]) -> list[Phase]:
    """Read the protocol phases back from a CarePlan, in order (the inverse of the drafting)."""
    phases: dict[int, dict[str, Any]] = {}
    for activity in careplan.get("activity") or []:
        ext = next((e for e in activity.get("extension") or [] if e.get("url") == PHASE_EXTENSION), None)
        if ext is None:
            continue
        parts = {e.get("url"): e for e in ext.get("extension") or []}
        number = int(parts["number"]["valueInteger"])
        detail = activity.get("detail") or {}
        phase = phases.setdefault(
            number,
            {
                "title": parts.get("title", {}).get("valueString", ""),
                "goals": [],
                "activities": [],
                "period": detail.get("scheduledPeriod") or {},
            },
        )
        phase["activities"].append((detail.get("code") or {}).get("text", ""))
        for goal in detail.get("goal") or []:
            if goal.get("reference") not in phase["goals"]:
                phase["goals"].append(goal.get("reference"))
    return [
        Phase(
            n, p["title"], tuple(p["goals"]), tuple(p["activities"]), p["period"].get("start"), p["period"].get("end")
        )
        for n, p in sorted(phases.items())
    ]
