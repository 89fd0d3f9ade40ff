"""The R4 JSON types of the elements the check reads, checked fast. Pure.

The command line, the app and the sync job validate every resource against the
whole R4 model (``_record.validate_resource``): a record is small and a clear
error about any element is worth its cost.  A population is millions of
resources from an EHR's bulk export, and full validation would be most of the
job's time; what the check needs is that every element it reads (SPEC §3) has
its R4 type, so that a malformed resource is named, not misread.  This module
checks exactly that: the elements below, their JSON kind, their dates' format.
An element the check never reads is not looked at (``population --strict-r4``
validates whole resources, as the command line does).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import date
from typing import Any

__all__ = ["reading_problem", "READ_ELEMENTS"]

# R4 date / dateTime / instant (https://hl7.org/fhir/R4/datatypes.html#dateTime)
_DATE_TIME = re.compile(
    r"-?[0-9]{4}(-(0[1-9]|1[0-2])(-(0[0-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return "an object"


#: a check of one element's value: None when it is well formed, else (where below it, what is wrong)
Check = Callable[[Any], tuple[str, str] | None]


def _string(value: Any) -> tuple[str, str] | None:
    return None if isinstance(value, str) else ("", f"expected a string, got {_kind(value)}")


def _boolean(value: Any) -> tuple[str, str] | None:
    return None if isinstance(value, bool) else ("", f"expected a boolean, got {_kind(value)}")


def _integer(value: Any) -> tuple[str, str] | None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else ("", f"expected an integer, got {_kind(value)}")


def _date_time(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, str):
        return ("", f"expected a date, got {_kind(value)}")
    if not _DATE_TIME.fullmatch(value):
        return ("", f"{value[:40]!r} is not an R4 date or dateTime")
    if len(value) >= 10:
        try:
            date.fromisoformat(value[:10])
        except ValueError:
            return ("", f"{value[:40]!r} is not a calendar date")
    return None


def _object(fields: Mapping[str, Check], name: str) -> Check:
    def check(value: Any) -> tuple[str, str] | None:
        if not isinstance(value, dict):
            return ("", f"expected an object ({name}), got {_kind(value)}")
        for key, inner in fields.items():
            if key in value:
                found = inner(value[key])
                if found:
                    return (f".{key}{found[0]}", found[1])
        return None

    return check


def _list(item: Check) -> Check:
    def check(value: Any) -> tuple[str, str] | None:
        if not isinstance(value, list):
            return ("", f"expected a list, got {_kind(value)}")
        for i, v in enumerate(value):
            found = item(v)
            if found:
                return (f"[{i}]{found[0]}", found[1])
        return None

    return check


_CODING = _object({"system": _string, "code": _string, "display": _string}, "a Coding")
_CONCEPT = _object({"coding": _list(_CODING), "text": _string}, "a CodeableConcept")
_CONCEPTS = _list(_CONCEPT)
_REFERENCE = _object({"reference": _string, "display": _string}, "a Reference")
_REFERENCES = _list(_REFERENCE)
_PERIOD = _object({"start": _date_time, "end": _date_time}, "a Period")
_NOTES = _list(_object({"text": _string}, "an Annotation"))


def _number(value: Any) -> tuple[str, str] | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return None if ok else ("", f"expected a number, got {_kind(value)}")


_QUANTITY = _object({"value": _number, "unit": _string, "system": _string, "code": _string}, "a Quantity")
_VALUES: dict[str, Check] = {
    "valueCodeableConcept": _CONCEPT,
    "valueString": _string,
    "valueBoolean": _boolean,
    "valueInteger": _integer,
    "valueQuantity": _QUANTITY,
}

_COMMON: dict[str, Check] = {
    "id": _string,
    "status": _string,
    "subject": _REFERENCE,
    "patient": _REFERENCE,
    "encounter": _REFERENCE,
    "note": _NOTES,
    "category": _CONCEPTS,
}

#: per resource type the check reads (SPEC §3.1): the elements it reads and their R4 types
READ_ELEMENTS: dict[str, dict[str, Check]] = {
    "Patient": {"id": _string, "birthDate": _date_time, "gender": _string, "name": _list(_object({}, "a HumanName"))},
    "Condition": {
        **_COMMON,
        "code": _CONCEPT,
        "clinicalStatus": _CONCEPT,
        "verificationStatus": _CONCEPT,
        "severity": _CONCEPT,
        "bodySite": _CONCEPTS,
        "onsetDateTime": _date_time,
        "onsetPeriod": _PERIOD,
        "onsetString": _string,
        "abatementDateTime": _date_time,
        "recordedDate": _date_time,
        "evidence": _list(_object({"code": _CONCEPTS, "detail": _REFERENCES}, "a Condition.evidence")),
    },
    "Observation": {
        **_COMMON,
        **_VALUES,
        "code": _CONCEPT,
        "bodySite": _CONCEPT,
        "interpretation": _CONCEPTS,
        "effectiveDateTime": _date_time,
        "effectivePeriod": _PERIOD,
        "effectiveInstant": _date_time,
        "issued": _date_time,
        "component": _list(_object({"code": _CONCEPT, **_VALUES}, "an Observation.component")),
    },
    "Encounter": {
        **_COMMON,
        "class": _CODING,
        "type": _CONCEPTS,
        "period": _PERIOD,
        "reasonCode": _CONCEPTS,
        "reasonReference": _REFERENCES,
        "diagnosis": _list(_object({"condition": _REFERENCE}, "an Encounter.diagnosis")),
    },
    "CarePlan": {
        **_COMMON,
        "title": _string,
        "description": _string,
        "intent": _string,
        "period": _PERIOD,
        "addresses": _REFERENCES,
        "goal": _REFERENCES,
        "activity": _list(
            _object({"detail": _object({"code": _CONCEPT}, "a CarePlan.activity.detail")}, "an activity")
        ),
    },
}


def reading_problem(resource: Mapping[str, Any]) -> str | None:
    """What is wrong with the elements of ``resource`` the check reads, in one sentence; None when nothing is.

    ``resource`` is a JSON object whose ``resourceType`` is one the check reads.
    """
    rtype = resource.get("resourceType")
    elements = READ_ELEMENTS.get(rtype) if isinstance(rtype, str) else None
    if elements is None:
        return f"{rtype!r} is not a resource type the check reads"
    for key, check in elements.items():
        if key in resource:
            found = check(resource[key])
            if found:
                label = f"{rtype}/{resource.get('id', '(no id)')}"
                return f"{label} is not valid FHIR R4 at {key}{found[0]}: {found[1]}"
    return None
