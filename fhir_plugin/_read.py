"""Reading a patient's record: reader strategies behind one small protocol.

A reader turns a patient id into a validated ``PatientRecord``, whatever
requests it takes.  ``BatchReader`` asks for the whole record in one batch
round trip; ``PerTypeReader`` reads the Patient and then searches each type on
its own, for servers that take no batch.  Which one a server gets is decided
in ``_strategies``.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._client import PAGE_SIZE, FhirClient
from ._record import CLINICAL_TYPES, PatientRecord, validate_resource

__all__ = ["RecordReader", "BatchReader", "PerTypeReader"]


class RecordReader(Protocol):
    """Reads one patient's record (the Patient and its clinical resources), validated as R4."""

    def read(self, patient_id: str) -> PatientRecord: ...


class BatchReader:
    """The record in one round trip: a batch of the Patient read and one search per type."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client

    def read(self, patient_id: str) -> PatientRecord:
        return self.client.read_patient_record(patient_id)


class PerTypeReader:
    """GET the Patient, then one search per type (1 + len(types) round trips, more for long searchsets)."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client

    def read(self, patient_id: str) -> PatientRecord:
        resources: list[dict[str, Any]] = [validate_resource(self.client.read("Patient", patient_id))]
        for rtype in CLINICAL_TYPES:
            found = self.client.search(rtype, {"patient": patient_id, "_count": PAGE_SIZE})
            resources += [validate_resource(r) for r in found if r.get("resourceType") == rtype]
        return PatientRecord(patient_id, tuple(resources))
