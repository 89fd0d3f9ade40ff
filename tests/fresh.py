"""Fresh copies of the synthetic patients, so tests that write to a shared server never see each other's drafts."""

from __future__ import annotations

import uuid

from fhir_plugin.synthetic import SyntheticCase, renamed_case


def fresh_cases(cases: list[SyntheticCase], tag: str | None = None) -> list[SyntheticCase]:
    """The same cases with every ``fp-`` id (and reference to it) renamed ``fp-<tag>-``."""
    tag = tag or uuid.uuid4().hex[:8]
    return [renamed_case(case, tag) for case in cases]
