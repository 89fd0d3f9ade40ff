"""The report of one check (SPEC §6): plain frozen data with a JSON form.

The JSON keys are a contract with users and tests; the human table in the
command line and the review page in the web app render these same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ElementResult", "RedFlagResult", "Suggestion", "CodeFit", "Report", "ELEMENT_STATUSES", "FLAG_STATUSES"]

ElementStatus = Literal["met", "missing", "conflict", "not-yet-due", "proposed"]
FlagStatus = Literal["present", "absent", "not-documented"]
FitStatus = Literal["fits", "mismatch", "insufficient"]
ELEMENT_STATUSES = ("met", "missing", "conflict", "not-yet-due", "proposed")
FLAG_STATUSES = ("present", "absent", "not-documented")


@dataclass(frozen=True)
class ElementResult:
    id: str
    title: str
    required: bool
    status: ElementStatus
    evidence: tuple[str, ...] = ()
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "required": self.required,
            "status": self.status,
            "evidence": list(self.evidence),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class RedFlagResult:
    id: str
    title: str
    status: FlagStatus
    evidence: tuple[str, ...] = ()
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "evidence": list(self.evidence),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Suggestion:
    code: str
    display: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "display": self.display, "reason": self.reason}


@dataclass(frozen=True)
class CodeFit:
    status: FitStatus
    suggested: tuple[Suggestion, ...] = ()
    detail: str = ""
    site: tuple[str, ...] = ()
    side: str | None = None
    finding: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "suggested": [s.to_json() for s in self.suggested],
            "detail": self.detail,
            "documented": {"site": list(self.site), "side": self.side, "finding": list(self.finding)},
        }


@dataclass(frozen=True)
class Report:
    patient: str
    encounter: str | None
    profile_code: str
    profile_display: str
    icd10cm_release: str
    reference_date: str | None
    elements: tuple[ElementResult, ...]
    red_flags: tuple[RedFlagResult, ...]
    code_fit: CodeFit
    onset_date: str | None = None

    @property
    def complete(self) -> bool:
        """SPEC §6: every required element met (or not yet due) and the code fits."""
        return self.code_fit.status == "fits" and all(
            e.status in ("met", "not-yet-due") for e in self.elements if e.required
        )

    @property
    def referral_recommended(self) -> bool:
        return any(f.status == "present" for f in self.red_flags)

    def element(self, element_id: str) -> ElementResult:
        for e in self.elements:
            if e.id == element_id:
                return e
        raise KeyError(element_id)

    def gaps(self) -> list[ElementResult]:
        """Required elements that still need documentation (what the draft's note lists)."""
        return [e for e in self.elements if e.required and e.status in ("missing", "conflict")]

    def to_json(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "encounter": self.encounter,
            "reference_date": self.reference_date,
            "profile": {
                "code": self.profile_code,
                "system": "http://hl7.org/fhir/sid/icd-10-cm",
                "display": self.profile_display,
                "icd10cm_release": self.icd10cm_release,
            },
            "elements": [e.to_json() for e in self.elements],
            "red_flags": [f.to_json() for f in self.red_flags],
            "code_fit": self.code_fit.to_json(),
            "complete": self.complete,
            "referral_recommended": self.referral_recommended,
        }
