"""Where patient records come from: a FHIR server, Bundle files, or the embedded synthetic patients.

The command line, the sync job and the web app all go through here, so a
record is read and validated the same way whatever the way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ._errors import NotFound, UsageError
from ._record import PatientRecord, load_bundle_file, records_from_bundle

__all__ = ["Checkable", "from_files", "from_embedded", "select"]


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
    """The bundled synthetic patients, dated relative to ``today`` (the embedded default)."""
    from .synthetic import generate_cases  # the generator is only needed when no source is given

    items: Iterator[Checkable] = (
        Checkable(records_from_bundle(case.resources)[0], case.encounter_id) for case in generate_cases(today))
    return select(items, patients, "the embedded synthetic patients")


def require_patients(patients: Sequence[str]) -> None:
    if not patients:
        raise UsageError("name the patient to check on the server with --patient ID")
