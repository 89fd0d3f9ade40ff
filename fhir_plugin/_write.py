"""Sending the drafts: one transaction, and what the server says it created or already had."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ._errors import ServerError

__all__ = ["WriteResult", "write_drafts", "read_outcome"]


@dataclass(frozen=True)
class WriteResult:
    """Per draft, the server's id; ``created`` were new, ``existing`` matched a conditional create."""

    created: tuple[str, ...]
    existing: tuple[str, ...]

    @property
    def wrote_anything(self) -> bool:
        return bool(self.created)

    def to_json(self) -> dict[str, Any]:
        return {"created": list(self.created), "existing": list(self.existing)}

    def summary(self) -> str:
        if not self.created:
            return "nothing new written; the drafts already exist: " + ", ".join(self.existing)
        text = "created " + ", ".join(self.created)
        return text + (f"; already there: {', '.join(self.existing)}" if self.existing else "")


def _resource_ref(location: str) -> str:
    parts = [p for p in location.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def read_outcome(sent: Mapping[str, Any], response: Mapping[str, Any]) -> WriteResult:
    """Pair the transaction-response entries with what was sent (FHIR keeps their order)."""
    created: list[str] = []
    existing: list[str] = []
    answers = response.get("entry") or []
    if len(answers) != len(sent.get("entry") or []):
        raise ServerError(f"the server answered the transaction with {len(answers)} entries for "
                          f"{len(sent.get('entry') or [])} sent")
    for answer in answers:
        result = answer.get("response") or {}
        status = str(result.get("status", ""))
        ref = _resource_ref(str(result.get("location", "")))
        (created if status.startswith("201") else existing).append(ref)
    return WriteResult(tuple(created), tuple(existing))


def write_drafts(client: Any, bundle: Mapping[str, Any]) -> WriteResult:
    """POST the drafts as one transaction: all of it is written, or none of it (FHIR transaction rules)."""
    response = client.transaction(bundle)
    return read_outcome(bundle, response)
