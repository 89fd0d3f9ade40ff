"""Fresh copies of the synthetic patients, so tests that write to a shared server never see each other's drafts."""

from __future__ import annotations

import dataclasses
import json
import uuid

from fhir_plugin.synthetic import SyntheticCase


def fresh_cases(cases: list[SyntheticCase], tag: str | None = None) -> list[SyntheticCase]:
    """The same cases with every ``fp-`` id (and reference to it) renamed ``fp-<tag>-``."""
    tag = tag or uuid.uuid4().hex[:8]

    def rename(value: str | None) -> str | None:
        return value.replace("fp-", f"fp-{tag}-", 1) if value else value

    out = []
    for case in cases:
        text = json.dumps(case.resources).replace('"fp-', f'"fp-{tag}-').replace("/fp-", f"/fp-{tag}-")
        out.append(dataclasses.replace(case, patient_id=rename(case.patient_id),
                                       encounter_id=rename(case.encounter_id), resources=json.loads(text)))
    return out
