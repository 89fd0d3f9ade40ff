"""Writing the drafts: writer strategies behind one small protocol, and what each created or found.

A writer takes the draft transaction Bundle (SPEC §7) and returns one
``WriteResult``, whatever way it sends it.  ``TransactionWriter`` sends one
transaction of conditional creates (all or nothing); ``PerResourceWriter``
sends one conditional create per resource in Bundle order, for servers
without transactions.  Both are idempotent: sending twice creates nothing new.
Which one a server gets is decided in ``_strategies``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from ._errors import InputError, ServerError, UsageError

__all__ = ["WriteResult", "DraftWriter", "TransactionWriter", "PerResourceWriter", "read_outcome"]


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


class DraftWriter(Protocol):
    """Sends a draft transaction Bundle to a server in some form; running it twice creates nothing new."""

    def write(self, drafts: Mapping[str, Any]) -> WriteResult: ...


class TransactionWriter:
    """The drafts as ONE transaction of conditional creates: all of it is written, or none (FHIR transaction rules)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def write(self, drafts: Mapping[str, Any]) -> WriteResult:
        return read_outcome(drafts, self.client.transaction(drafts))


def _replace_references(value: Any, assigned: Mapping[str, str]) -> Any:
    """A copy of ``value`` with every ``reference`` to a known ``urn:uuid`` replaced by ``Type/id``."""
    if isinstance(value, dict):
        return {key: (assigned.get(item, item) if key == "reference" and isinstance(item, str)
                      else _replace_references(item, assigned))
                for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_references(item, assigned) for item in value]
    return value


def _urn_references(value: Any) -> set[str]:
    """Every ``reference`` in ``value`` that is still a ``urn:uuid``."""
    if isinstance(value, dict):
        found = {value["reference"]} if str(value.get("reference", "")).startswith("urn:uuid:") else set()
        return found.union(*(_urn_references(item) for key, item in value.items() if key != "reference"))
    if isinstance(value, list):
        return set().union(*(_urn_references(item) for item in value))
    return set()


class PerResourceWriter:
    """One request per draft, in Bundle order, for servers that take no transaction.

    POST entries keep their ``ifNoneExist`` as an ``If-None-Exist`` header
    (conditional create, FHIR http.html#ccreate), so a rerun finds what the
    first run created; ``urn:uuid`` references are rewritten to the ids just
    assigned, so an entry may refer only to entries before it.  Not atomic: a
    failure part-way leaves the first drafts written, and a rerun completes
    the rest.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def write(self, drafts: Mapping[str, Any]) -> WriteResult:
        assigned: dict[str, str] = {}
        created: list[str] = []
        existing: list[str] = []
        for entry in drafts.get("entry") or []:
            request = entry.get("request") or {}
            method = str(request.get("method", "")).upper()
            resource = _replace_references(entry.get("resource") or {}, assigned)
            pending = _urn_references(resource)
            if pending:
                raise UsageError(f"drafts are written in Bundle order, and an entry refers to "
                                 f"{sorted(pending)[0]} before it is written")
            headers = {"Prefer": "return=representation"}
            if method == "POST":
                if request.get("ifNoneExist"):
                    headers["If-None-Exist"] = request["ifNoneExist"]
                status, answer = self.client.send_resource(
                    "POST", str(resource.get("resourceType")), resource, headers=headers,
                    safe_to_retry=bool(request.get("ifNoneExist")))
            elif method == "PUT":
                status, answer = self.client.send_resource("PUT", str(request.get("url")), resource,
                                                           headers=headers, safe_to_retry=True)
            else:
                raise UsageError(f"drafts are written with POST and PUT entries only, not {method or 'none'}")
            if not answer.get("resourceType") or not answer.get("id"):
                raise InputError("the server did not return the written resource with its id")
            ref = f"{answer['resourceType']}/{answer['id']}"
            (created if status == 201 else existing).append(ref)
            if entry.get("fullUrl"):
                assigned[entry["fullUrl"]] = ref
        return WriteResult(tuple(created), tuple(existing))
