"""The one review pipeline: a patient's record in, the report and the drafts (or why not) out. Pure.

Every way in — the command line, the sync job, the SMART app, and the jobs
to come — calls ``review`` and decides only what to do with its answer: show
it, write the drafts through a writer strategy, or both.  So a record is
judged, and drafts are refused, the same way whatever the way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from ._check import check
from ._drafts import Existing, build_drafts, drafts_refusal, existing_in
from ._errors import DraftsRefused
from ._profile import Profile
from ._record import PatientRecord
from ._report import Report

__all__ = ["Review", "review"]


@dataclass(frozen=True)
class Review:
    """The report of one patient, and either the draft transaction Bundle or the sentence saying why none."""

    report: Report
    drafts: dict[str, Any] | None
    refused: str | None = None
    #: what the record already holds that the drafts build on (SPEC §7.1)
    existing: Existing = Existing()
    #: why nothing new is offered although the code fits: the drafts are written, or a plan exists (SPEC §7.1)
    settled: str | None = None

    @property
    def written(self) -> bool:
        """The plugin's drafts for this record are already on the server (SPEC §7.1, after a write)."""
        return bool(self.existing.written)

    #: drafts may be made, though not built here (``review(..., draft=False)``: a worklist needs only the answer)
    allowed_unbuilt: bool = False

    @property
    def drafts_allowed(self) -> bool:
        return self.drafts is not None or self.allowed_unbuilt


def review(
    record: PatientRecord,
    profile: Profile,
    *,
    today: date,
    now: datetime,
    encounter_id: str | None = None,
    draft: bool = True,
) -> Review:
    """Check ``record`` against ``profile`` at ``today`` and draft what SPEC §7 writes back, dated ``now``.

    A code mismatch refuses the drafts (SPEC §5, §7): the refusal is part of
    the answer, not an error, since the report is still worth showing.  With
    ``draft=False`` the answer (allowed or refused, and why) is the same but the
    drafts are not built: a population's worklist needs the answer for every
    patient and the drafts only when they are written.
    """
    report = check(record, profile, today=today, encounter_id=encounter_id)
    existing = existing_in(record, profile)
    if report.code_fit.status != "mismatch":
        # SPEC §7.1: after a write, or with a diagnosis and a plan in the chart, nothing new is offered
        if existing.written:
            return Review(
                report,
                None,
                None,
                existing,
                "the drafts are already in the record (" + ", ".join(existing.written) + ")",
            )
        if existing.condition and existing.careplan:
            return Review(
                report,
                None,
                None,
                existing,
                f"an active plan exists: {existing.careplan} addresses {existing.condition}",
            )
    if not draft:
        refused = drafts_refusal(report, profile)
        return Review(report, None, refused, existing, allowed_unbuilt=refused is None)
    try:
        return Review(report, build_drafts(report, profile, now=now, existing=existing), existing=existing)
    except DraftsRefused as exc:
        return Review(report, None, str(exc), existing)
