"""The example patients for tests and benchmarks: renamed copies, many patients, a large record.

The cases themselves are data, ``profiles/M62.561/examples/`` (see its
README for how each expected report was worked out), read by
``fhir_plugin._examples``.  This module adds what only tests and benchmarks
need; production code never imports it (an import-linter contract holds that).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator
from typing import Any

from ._examples import ExampleCase, case_bundle, cases_bundle, example_cases, save_cases
from ._sources import load_into_server

__all__ = [
    "SyntheticCase",
    "generate_cases",
    "large_record",
    "many_patients",
    "cases_bundle",
    "case_bundle",
    "save_cases",
    "load_into_server",
    "renamed_case",
]

#: the examples' record type, under the name the tests have always used
SyntheticCase = ExampleCase

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def generate_cases(as_of: dt.date) -> list[ExampleCase]:
    """Every example case of M62.561, dated back from ``as_of``; the same ``as_of`` gives the same output."""
    return example_cases(as_of)


def _renamed(resources: Iterable[dict[str, Any]], old: str, new: str) -> list[dict[str, Any]]:
    """Copies of ``resources`` with every id and reference starting ``old`` moved to ``new``."""

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k == "reference" and isinstance(v, str):
                    rtype, _, rid = v.partition("/")
                    out[k] = f"{rtype}/{new}{rid[len(old) :]}" if rid.startswith(old) else v
                else:
                    out[k] = fix(v)
            return out
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    renamed = []
    for res in resources:
        copy_ = fix(res)
        if copy_["id"].startswith(old):
            copy_["id"] = new + copy_["id"][len(old) :]
        renamed.append(copy_)
    return renamed


def renamed_case(case: ExampleCase, tag: str) -> ExampleCase:
    """The case under new ids (``fp-x`` -> ``fp-<tag>-x``), for a writer that must not touch the original."""

    def move(value: str | None) -> str | None:
        return value.replace("fp-", f"fp-{tag}-", 1) if value else value

    return dataclasses.replace(
        case,
        patient_id=move(case.patient_id) or case.patient_id,
        encounter_id=move(case.encounter_id),
        resources=_renamed(case.resources, "fp-", f"fp-{tag}-"),
    )


def many_patients(as_of: dt.date, n: int) -> Iterator[list[dict[str, Any]]]:
    """``n`` distinct patients' resources, cycling through the cases (ids like ``fp-0001-complete``)."""
    cases = generate_cases(as_of)
    width = max(4, len(str(n)))
    for i in range(n):
        case = cases[i % len(cases)]
        yield _renamed(case.resources, "fp-", f"fp-{i + 1:0{width}d}-")


def _vital_sign(
    oid: str, pid: str, when: dt.date, code: str, display: str, value: float, minute: int
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"system": _OBS_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": f"{when.isoformat()}T09:{minute:02d}:00Z",
        "valueQuantity": {"value": value, "unit": "/min", "system": UCUM, "code": "/min"},
    }


def large_record(as_of: dt.date, n_observations: int = 2000) -> ExampleCase:
    """The complete case padded with vital signs to ``n_observations`` Observations in all.

    The padding (heart and respiratory rates over the past two years) is read by no element
    or red flag, so the expected outcome is the complete case's.
    """
    if isinstance(as_of, dt.datetime):
        as_of = as_of.date()
    complete = next(c for c in generate_cases(as_of) if c.key == "complete")
    case = renamed_case(complete, "large")
    pid = case.patient_id
    resources = list(case.resources)
    base = sum(1 for r in resources if r["resourceType"] == "Observation")
    if n_observations < base:
        raise ValueError(f"a large record needs at least {base} Observations, got {n_observations}")
    for i in range(n_observations - base):
        when = as_of - dt.timedelta(days=1 + (i // 3) % 730)
        minute = (i % 3) * 10 + 20
        if i % 2 == 0:
            obs = _vital_sign(
                f"{pid}-vs{i + 1:05d}", pid, when, "8867-4", "Heart rate", float(58 + (i * 7) % 40), minute
            )
        else:
            obs = _vital_sign(
                f"{pid}-vs{i + 1:05d}", pid, when, "9279-1", "Respiratory rate", float(12 + (i * 5) % 8), minute
            )
        resources.append(obs)
    return dataclasses.replace(
        case,
        key="large",
        title=f"Complete case with {n_observations} Observations",
        resources=resources,
        encounter_id=None,
    )
