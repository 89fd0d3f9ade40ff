"""One NDJSON line keyed by its patient, and one patient's worklist row. Pure: no I/O, no Spark.

The Spark job (``_job``) only carries these functions: it calls ``key_line`` on every
line and ``patient_row`` on every patient's group, so the population's rows come from
the same review pipeline (``fhir_plugin.review``) as the command line's reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from .._drafts import is_plan_note
from .._errors import InputError
from .._profile import Profile
from .._record import PatientRecord, subject_patient_id, validate_resource
from .._review import review
from .._shape import reading_problem

__all__ = ["Keyed", "key_line", "patient_row", "problem_row", "ROW_COLUMNS", "READ_TYPES"]

#: the resource types a record is made of (SPEC §3; Patient for the banner; DocumentReference for the
#: plugin's own plan notes only, SPEC §7.1); others are skipped
READ_TYPES = frozenset({"Patient", "Condition", "Observation", "Encounter", "CarePlan", "DocumentReference"})

#: one row per patient: the worklist's columns, in order (``_job`` gives their Spark types)
ROW_COLUMNS = (
    "patient",
    "encounter",
    "complete",
    "code_fit",
    "suggested",
    "gaps",
    "red_flags",
    "referral",
    "drafts_allowed",
    "refused",
    "statuses",
    "flag_statuses",
    "problem",
    "drafts",
)


@dataclass(frozen=True)
class Keyed:
    """A line's patient and resource type, or the problem that keeps it out (``patient`` None)."""

    patient: str | None
    type: str | None
    problem: str | None = None


def key_line(text: str) -> Keyed | None:
    """Which patient an NDJSON line belongs to; None for a blank line or a type the check does not read.

    A line that is not a JSON object, or a clinical resource with no ``subject``/``patient``
    Patient reference, is a problem: its file and line are reported and the rest goes on.
    """
    if not text.strip():
        return None
    try:
        resource = json.loads(text)
    except ValueError as exc:
        return Keyed(None, None, f"not valid JSON ({exc})")
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return Keyed(None, None, "not a FHIR resource (a JSON object with a resourceType)")
    rtype = resource["resourceType"]
    if rtype not in READ_TYPES:
        return None
    pid = subject_patient_id(resource)
    if not pid and rtype == "DocumentReference":
        return None  # a note is no evidence: only the plugin's own, which name their patient, are read
    if not pid:
        label = f"{rtype}/{resource.get('id', '(no id)')}"
        return Keyed(None, rtype, f"{label} has no subject Patient reference, so it belongs to no record")
    return Keyed(pid, rtype)


def _empty_row(patient: str) -> dict[str, Any]:
    return {
        "patient": patient,
        "encounter": None,
        "complete": False,
        "code_fit": None,
        "suggested": [],
        "gaps": [],
        "red_flags": [],
        "referral": False,
        "drafts_allowed": False,
        "refused": None,
        "statuses": None,
        "flag_statuses": None,
        "problem": None,
        "drafts": None,
    }


def problem_row(patient: str, problem: str) -> dict[str, Any]:
    """The row of a patient whose record could not be checked: the problem, nothing else."""
    row = _empty_row(patient)
    row["problem"] = problem
    return row


def patient_row(
    patient: str,
    lines: Iterable[tuple[str, int, str]],
    profile: Profile,
    *,
    today: date,
    now: datetime,
    keep_drafts: bool = False,
    strict_r4: bool = False,
) -> dict[str, Any]:
    """Review one patient's resources (``(file, line, json)``) and return the worklist row.

    A resource whose elements the check reads are not valid R4 (``_shape``; with
    ``strict_r4`` any element, against the whole R4 model) makes the row a problem
    row naming its file and line: the patient is not judged on part of the record
    (SPEC §6 needs the whole record).  The drafts are built only for write-back
    (``keep_drafts``); the row says whether they are allowed either way.
    """
    resources: list[dict[str, Any]] = []
    for file, lineno, text in lines:
        try:
            resource = json.loads(text)
            if isinstance(resource, dict) and resource.get("resourceType") == "DocumentReference":
                # only the plugin's own plan notes, as the sync job's reader keeps them: a note is never
                # evidence, but a plan written as one is the drafted plan (SPEC §7.1)
                if not is_plan_note(resource):
                    continue
                validate_resource(resource)
            elif strict_r4:
                validate_resource(resource)
            elif not isinstance(resource, dict):
                raise InputError(f"expected a FHIR resource (a JSON object), got {type(resource).__name__}")
            else:
                problem = reading_problem(resource)
                if problem:
                    raise InputError(problem)
        except (InputError, ValueError) as exc:
            return problem_row(patient, f"{file} line {lineno}: {exc}")
        if subject_patient_id(resource) != patient:  # keyed by key_line, so only a caller's mistake
            return problem_row(patient, f"{file} line {lineno}: belongs to another patient")
        resources.append(resource)
    # validated above, line by line (so a problem names its line): the record is made directly,
    # as records_from_bundle would make it, without validating every resource twice
    result = review(PatientRecord(patient, tuple(resources)), profile, today=today, now=now, draft=keep_drafts)
    report = result.report
    row = _empty_row(patient)
    row.update(
        {
            "encounter": report.encounter,
            "complete": report.complete,
            "code_fit": report.code_fit.status,
            "suggested": sorted(s.code for s in report.code_fit.suggested),
            "gaps": [e.id for e in report.gaps()],
            "red_flags": [f.id for f in report.red_flags if f.status == "present"],
            "referral": report.referral_recommended,
            "drafts_allowed": result.drafts_allowed,
            "refused": result.refused,
            "statuses": json.dumps({e.id: e.status for e in report.elements}, sort_keys=True),
            "flag_statuses": json.dumps({f.id: f.status for f in report.red_flags}, sort_keys=True),
            "drafts": json.dumps(result.drafts) if keep_drafts and result.drafts is not None else None,
        }
    )
    return row


def row_from_report(report_json: Mapping[str, Any]) -> dict[str, Any]:
    """The comparable part of a row, from SPEC §6's report JSON (what ``check --format json`` prints)."""
    return {
        "patient": report_json["patient"],
        "encounter": report_json["encounter"],
        "complete": report_json["complete"],
        "code_fit": report_json["code_fit"]["status"],
        "suggested": sorted(s["code"] for s in report_json["code_fit"]["suggested"]),
        "referral": report_json["referral_recommended"],
        "statuses": {e["id"]: e["status"] for e in report_json["elements"]},
        "flag_statuses": {f["id"]: f["status"] for f in report_json["red_flags"]},
    }
