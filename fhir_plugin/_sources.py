"""Where patient records come from: a FHIR server, Bundle files, or the embedded example patients.

The command line, the sync job and the web app all go through here, so a
record is read and validated the same way whatever the way in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from ._errors import NotFound, ServerError, TransportError, UsageError
from ._examples import ExampleCase, cases_bundle, example_cases
from ._record import PatientRecord, load_bundle_file, records_from_bundle

__all__ = ["Checkable", "from_files", "from_embedded", "select", "load_into_server"]


@dataclass(frozen=True)
class Checkable:
    """A record to check and the encounter to check it at (None: the latest)."""

    record: PatientRecord
    encounter_id: str | None = None


def select(items: Iterable[Checkable], patients: Sequence[str], where: str) -> list[Checkable]:
    """Keep the named patients (all when none are named); an unknown name is an error, not an empty result."""
    found = list(items)
    if not patients:
        return found
    by_id = {c.record.patient_id: c for c in found}
    out = []
    for pid in patients:
        pid = pid.split("/")[-1]
        if pid not in by_id:
            raise NotFound(f"Patient/{pid} is not in {where}")
        out.append(by_id[pid])
    return out


def from_files(paths: Sequence[str | Path], patients: Sequence[str] = ()) -> list[Checkable]:
    items: list[Checkable] = []
    for path in paths:
        items.extend(Checkable(r) for r in load_bundle_file(path))
    return select(items, patients, ", ".join(str(p) for p in paths))


def from_embedded(today: date, patients: Sequence[str] = ()) -> list[Checkable]:
    """The example patients shipped beside the default profile, dated relative to ``today`` (the embedded default)."""
    items: Iterator[Checkable] = (
        Checkable(records_from_bundle(case.resources)[0], case.encounter_id) for case in example_cases(today)
    )
    return select(items, patients, "the embedded synthetic patients")


def require_patients(patients: Sequence[str]) -> None:
    if not patients:
        raise UsageError("name the patient to check on the server with --patient ID")


def load_into_server(
    base_url: str, cases: Iterable[ExampleCase], session: Any = None, timeout: float = 120.0
) -> dict[str, Any]:
    """PUT the cases' resources into ``base_url`` as one transaction; return the server's transaction-response."""
    import requests

    http = session or requests.Session()
    try:
        response = http.post(
            base_url.rstrip("/"),
            data=json.dumps(cases_bundle(list(cases))),
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise TransportError(f"could not send the synthetic patients to {base_url}: {exc}") from exc
    if response.status_code >= 400:
        try:
            outcome = response.json()
        except ValueError:
            outcome = None
        raise ServerError(
            f"the server refused the synthetic patients (HTTP {response.status_code})",
            status=response.status_code,
            outcome=outcome,
        )
    answer: dict[str, Any] = response.json()
    return answer
