"""The example patients of a profile: data files beside it, dated back from any "today".

Each ``profiles/<code>/examples/<key>.json`` holds one small FHIR R4 record
(a Patient and the Conditions, Encounters, Observations and CarePlans a
clinician would leave behind), the check's expected outcome for it, worked out
by hand from SPEC.md, and the day the file is dated as of (``as_of``).
``example_cases(today)`` moves every date of every record by the same number
of days, so each case keeps its shape — "onset 34 days ago", "a follow-up two
weeks later" — whatever day it is checked on.  These are the embedded
default of the command line and the oracle of the tests.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from ._errors import ProfileError
from ._profile import DEFAULT_PROFILE, profiles_root

__all__ = ["ExampleCase", "example_cases", "shift_dates", "case_bundle", "cases_bundle", "save_cases"]

# FHIR date, dateTime and instant (datatypes.html): the calendar part moves, the time and zone stay
_FHIR_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})((?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)")


@dataclass(frozen=True)
class ExampleCase:
    """One example patient: its resources and what the check must say about them."""

    key: str
    title: str
    patient_id: str
    resources: list[dict[str, Any]]
    encounter_id: str | None
    expected: dict[str, Any]


def shift_dates(value: Any, as_of: date, today: date) -> Any:
    """A copy of ``value`` dated as of ``today`` instead of ``as_of``.

    Every whole-string FHIR date, dateTime or instant moves by the days between
    the two; a ``birthDate`` keeps its day of the year and moves by whole years,
    so the patient is as old on ``today`` as on ``as_of``.
    """
    days = (today - as_of).days
    if isinstance(value, dict):
        return {
            key: (_same_age(item, as_of, today) if key == "birthDate" else shift_dates(item, as_of, today))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [shift_dates(item, as_of, today) for item in value]
    if isinstance(value, str) and days:
        match = _FHIR_DATE.fullmatch(value)
        if match:
            moved = date.fromisoformat(match.group(1)) + timedelta(days=days)
            return moved.isoformat() + match.group(2)
    return value


def _same_age(value: Any, as_of: date, today: date) -> Any:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return value
    born = date.fromisoformat(value)
    age = as_of.year - born.year - ((as_of.month, as_of.day) < (born.month, born.day))
    year = today.year - age - ((born.month, born.day) > (today.month, today.day))
    try:
        return born.replace(year=year).isoformat()
    except ValueError:  # 29 February in a year without one
        return born.replace(year=year, day=28).isoformat()


@lru_cache(maxsize=8)
def _read_examples(folder: str) -> tuple[tuple[date, dict[str, Any]], ...]:
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            found.append((date.fromisoformat(data["as_of"]), data))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProfileError(f"the example patient file is malformed ({type(exc).__name__})", path=str(path)) from exc
    found.sort(key=lambda item: int(item[1].get("order", 0)))
    return tuple(found)


def example_cases(today: date, profile_code: str = DEFAULT_PROFILE) -> list[ExampleCase]:
    """The profile's example patients, every date moved so the files' ``as_of`` falls on ``today``."""
    if isinstance(today, datetime):
        today = today.date()
    folder = profiles_root() / profile_code / "examples"
    cases = []
    for as_of, data in _read_examples(str(folder)):
        cases.append(
            ExampleCase(
                data["key"],
                data["title"],
                data["patient_id"],
                shift_dates(data["resources"], as_of, today),
                data.get("encounter_id"),
                copy.deepcopy(data["expected"]),
            )
        )
    return cases


def _entries_in_order(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"Patient": 0, "Condition": 1, "Encounter": 2, "Observation": 3, "CarePlan": 4}
    return sorted(resources, key=lambda r: order.get(r["resourceType"], 9))  # stable within a type


def cases_bundle(cases: list[ExampleCase]) -> dict[str, Any]:
    """One R4 transaction Bundle that PUTs every resource at ``Type/id`` (loading it twice changes nothing)."""
    entries = []
    for case in cases:
        for res in _entries_in_order(case.resources):
            entries.append(
                {
                    "resource": copy.deepcopy(res),
                    "request": {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"},
                }
            )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def case_bundle(case: ExampleCase) -> dict[str, Any]:
    """One case as an R4 collection Bundle (what ``save_cases`` writes)."""
    return {
        "resourceType": "Bundle",
        "id": f"{case.patient_id}-bundle",
        "type": "collection",
        "entry": [{"resource": copy.deepcopy(r)} for r in _entries_in_order(case.resources)],
    }


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def save_cases(cases: list[ExampleCase], directory: str | Path) -> list[Path]:
    """Write ``<key>.json`` (a collection Bundle) per case and ``expected.json``; return the paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    expected: dict[str, Any] = {}
    for case in cases:
        path = folder / f"{case.key}.json"
        path.write_text(_dump(case_bundle(case)), encoding="utf-8")
        written.append(path)
        expected[case.key] = {
            "title": case.title,
            "patient_id": case.patient_id,
            "encounter_id": case.encounter_id,
            "expected": case.expected,
        }
    path = folder / "expected.json"
    path.write_text(_dump(expected), encoding="utf-8")
    written.append(path)
    return written
