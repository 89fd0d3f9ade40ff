"""A deterministic synthetic population as NDJSON, with each patient's expected report (tests, benchmarks).

Test and benchmark support only: production code never imports it (the import-linter
contracts keep ``fhir_plugin`` from importing ``sandbox``).

Patient ``i`` is synthetic case ``i mod k`` (``fhir_plugin.synthetic.generate_cases``)
under new ids (``fp-p000001-…``), so its expected outcome is that case's hand-derived
one.  Variation beyond the renaming: the resources of one patient are spread over the
per-type files, and the lines of every file are shuffled with a seeded generator, so
a patient's resources are never adjacent and the grouping is really exercised.  The case
checked at an earlier encounter is left out (a population is checked at each patient's
latest encounter, and its expectation is for an earlier one).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir_plugin.synthetic import SyntheticCase, generate_cases, renamed_case

__all__ = ["PopulationPatient", "population", "write_ndjson", "FILE_PATIENTS"]

#: patients per NDJSON file (bulk servers split their output the same way)
FILE_PATIENTS = 1000
_TYPES = ("Patient", "Condition", "Encounter", "Observation", "CarePlan")


@dataclass(frozen=True)
class PopulationPatient:
    patient_id: str
    case_key: str
    expected: dict[str, Any]


def _cases(as_of: dt.date) -> list[SyntheticCase]:
    return [c for c in generate_cases(as_of) if c.encounter_id is None]


def population(
    as_of: dt.date, n: int, *, prefix: str = "p"
) -> Iterator[tuple[PopulationPatient, list[dict[str, Any]]]]:
    """``n`` patients (and their resources), cycling through the synthetic cases. Deterministic."""
    cases = _cases(as_of)
    width = max(6, len(str(n)))
    for i in range(n):
        case = renamed_case(cases[i % len(cases)], f"{prefix}{i + 1:0{width}d}")
        yield PopulationPatient(case.patient_id, case.key, case.expected), case.resources


def write_ndjson(
    folder: str | Path, as_of: dt.date, n: int, *, seed: int = 15, prefix: str = "p", file_patients: int = FILE_PATIENTS
) -> dict[str, PopulationPatient]:
    """Write ``n`` patients as ``<Type>.<k>.ndjson`` files (lines shuffled); return the patients by id."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    patients: dict[str, PopulationPatient] = {}
    chunk: dict[str, list[str]] = {t: [] for t in _TYPES}
    part = 0

    def flush() -> None:
        for rtype, lines in chunk.items():
            if lines:
                rng.shuffle(lines)
                (root / f"{rtype}.{part:04d}.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
            lines.clear()

    for i, (patient, resources) in enumerate(population(as_of, n, prefix=prefix)):
        patients[patient.patient_id] = patient
        for res in resources:
            chunk[res["resourceType"]].append(json.dumps(res, separators=(",", ":")))
        if (i + 1) % file_patients == 0:
            flush()
            part += 1
    flush()
    return patients
