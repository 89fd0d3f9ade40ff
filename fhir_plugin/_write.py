"""Sending the drafts: one transaction, and what the server says it created or already had."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ._client import FhirClient, is_safe_to_repeat
from ._errors import Forbidden, InputError, ServerError

__all__ = ["WriteResult", "write_drafts", "read_outcome", "check_matches"]


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


def _local_ref(reference: Any) -> str:
    """``Type/id`` of a reference, whatever base or ``_history`` suffix it carries."""
    return _resource_ref(reference) if isinstance(reference, str) else ""


def check_matches(sent: Mapping[str, Any], response: Mapping[str, Any]) -> None:
    """Every existing resource a conditional create matched must be this patient's (issue 11, item 3).

    Checked on the representation the server returned with the entry: its
    ``subject`` must be the subject sent, and a Provenance may target only what
    this transaction wrote or matched.  A match for another patient raises
    Forbidden — it is never reported as "already there".  An entry the server
    answered without a representation is accepted on its key, which names the
    patient (``_drafts._entry``).
    """
    entries = sent.get("entry") or []
    answers = response.get("entry") or []
    placed = {e.get("fullUrl"): _local_ref((a.get("response") or {}).get("location"))
              for e, a in zip(entries, answers, strict=False) if isinstance(a, Mapping)}
    for entry, answer in zip(entries, answers, strict=False):
        if not isinstance(answer, Mapping) or str((answer.get("response") or {}).get("status", "")).startswith("201"):
            continue
        found = answer.get("resource")
        if not isinstance(found, Mapping):
            continue
        mine = entry["resource"]
        rtype = mine["resourceType"]
        if "subject" in mine:
            theirs = _local_ref((found.get("subject") or {}).get("reference"))
            if theirs != _local_ref(mine["subject"]["reference"]):
                where = _local_ref((answer.get("response") or {}).get("location"))
                raise Forbidden(f"the server matched the draft {rtype} to {where}, which belongs to another patient; "
                                "nothing was taken as already there")
        elif rtype == "Provenance":
            allowed = {placed.get(t["reference"], t["reference"]) for t in mine.get("target") or []}
            targets = {_local_ref(t.get("reference")) for t in found.get("target") or [] if isinstance(t, Mapping)}
            if not targets or not targets <= allowed:
                raise Forbidden("the server matched the draft Provenance to one about other resources; "
                                "nothing was taken as already there")


def write_drafts(client: Any, bundle: Mapping[str, Any]) -> WriteResult:
    """POST the drafts as one transaction: all of it is written, or none of it (FHIR transaction rules).

    The server is asked for the representation of every entry, so an existing
    match can be checked to be this patient's before it is reported."""
    if isinstance(client, FhirClient):
        response = client.request("POST", "", body=dict(bundle), headers={"Prefer": "return=representation"},
                                  safe_to_retry=is_safe_to_repeat(bundle))
        if response.get("resourceType") != "Bundle":
            raise InputError(f"the server answered a transaction with a {response.get('resourceType')}, "
                             "not a Bundle")
    else:
        response = client.transaction(bundle)
    outcome = read_outcome(bundle, response)
    check_matches(bundle, response)
    return outcome
