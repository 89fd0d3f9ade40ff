"""The naive FHIR client: the baseline of the round-trip benchmark, not for use.

It does what a first attempt does: read a record with one GET for the Patient
and one search per resource type, and write a Bundle with one request per
resource, rewriting ``urn:uuid`` references itself to the ids the server
assigned.  DESIGN.md's benchmark runs it beside ``FhirClient`` on the same
server.  It sends through ``FhirClient.request`` and asks for the same page
size, so URL checks, retries, logging, errors and paging are identical: only
the batching differs, and that is what the benchmark measures.

Writing resource by resource is not atomic: a failure half-way leaves the
first resources written.  That is one reason the real client uses a transaction.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ._client import PAGE_SIZE, FhirClient
from ._errors import InputError, UsageError
from ._record import CLINICAL_TYPES, PatientRecord, validate_resource

__all__ = ["NaiveClient"]


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


class NaiveClient:
    """One request per resource type to read, one per resource to write; ``round_trips`` is the inner client's."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client

    @property
    def round_trips(self) -> int:
        return self.client.round_trips

    def read_patient_record(self, patient_id: str, *, types: Sequence[str] = CLINICAL_TYPES) -> PatientRecord:
        """GET the Patient, then search each type separately (1 + len(types) round trips at least)."""
        resources = [validate_resource(self.client.read("Patient", patient_id))]
        for rtype in types:
            found = self.client.search(rtype, {"patient": patient_id, "_count": PAGE_SIZE})
            resources += [validate_resource(r) for r in found if r.get("resourceType") == rtype]
        return PatientRecord(patient_id, tuple(resources))

    def write_bundle(self, bundle: Mapping[str, Any]) -> dict[str, str]:
        """Send each entry of a transaction Bundle on its own, in order; return ``fullUrl`` → ``Type/id``.

        POST entries keep their ``ifNoneExist`` as an ``If-None-Exist`` header
        (conditional create, FHIR http.html#ccreate); PUT entries go to their
        ``request.url``.  An entry may refer only to entries before it.
        """
        assigned: dict[str, str] = {}
        for entry in bundle.get("entry") or []:
            request = entry.get("request") or {}
            method = str(request.get("method", "")).upper()
            resource = _replace_references(entry.get("resource") or {}, assigned)
            pending = _urn_references(resource)
            if pending:
                raise UsageError(f"the naive client writes in Bundle order, and an entry refers to "
                                 f"{sorted(pending)[0]} before it is written")
            headers = {"Prefer": "return=representation"}
            if method == "POST":
                if request.get("ifNoneExist"):
                    headers["If-None-Exist"] = request["ifNoneExist"]
                answer = self.client.request("POST", str(resource.get("resourceType")), body=resource,
                                             headers=headers, safe_to_retry=bool(request.get("ifNoneExist")))
            elif method == "PUT":
                answer = self.client.request("PUT", str(request.get("url")), body=resource, headers=headers,
                                             safe_to_retry=True)
            else:
                raise UsageError(f"the naive client writes only POST and PUT entries, not {method or 'none'}")
            if not answer.get("resourceType") or not answer.get("id"):
                raise InputError("the server did not return the written resource with its id")
            if entry.get("fullUrl"):
                assigned[entry["fullUrl"]] = f"{answer['resourceType']}/{answer['id']}"
        return assigned
