"""Reading a patient's record: reader strategies behind one small protocol.

A reader turns a patient id into a validated ``PatientRecord``, whatever
requests it takes.  ``BatchReader`` asks for the whole record in one batch
round trip; ``PerTypeReader`` reads the Patient and searches each type with
``patient=`` on its own, in parallel (bounded), for servers that take no
batch (Epic, Oracle Health).  Neither relies on ``_revinclude``.  Which one a
server gets is decided in ``_strategies``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ._client import PAGE_SIZE, FhirClient
from ._errors import ServerError
from ._record import PatientRecord, validate_resource
from ._vocab import CLINICAL_TYPES, OBSERVATION_CATEGORIES, OBSERVATION_CATEGORY

__all__ = ["RecordReader", "BatchReader", "PerTypeReader"]

#: requests in flight at once for one patient: the Patient read and one search per type all go out
#: together, so the read costs about one round trip of latency, as the batch does (issue 12)
PARALLEL_SEARCHES = 1 + len(CLINICAL_TYPES)
#: answers that mean "this search needs more parameters" (Epic answers 400 for an Observation search
#: without category; others 403 or 422)
_REFUSED_WITHOUT_CATEGORY = frozenset({400, 403, 422})
#: how many servers the "Observation needs a category" memory holds (least recently used dropped first)
CATEGORY_MEMORY = 64

_needs_category: OrderedDict[str, None] = OrderedDict()
_needs_category_lock = threading.Lock()


def _remembered_needing_category(base_url: str) -> bool:
    with _needs_category_lock:
        if base_url in _needs_category:
            _needs_category.move_to_end(base_url)
            return True
        return False


def _remember_needing_category(base_url: str) -> None:
    """This server refused an Observation search without a category: ask it per category from now on."""
    with _needs_category_lock:
        _needs_category[base_url] = None
        _needs_category.move_to_end(base_url)
        while len(_needs_category) > CATEGORY_MEMORY:
            _needs_category.popitem(last=False)


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
    """GET the Patient and search each clinical type with ``patient=``, ``parallel`` requests at a time.

    An Observation search the server refuses without a category is asked
    again once per category (SPEC §3 reads Observations of every category),
    and the server is remembered (per process, bounded): later patients go
    straight to the per-category searches, with no refused request each.
    """

    def __init__(self, client: FhirClient, *, parallel: int = PARALLEL_SEARCHES) -> None:
        self.client = client
        self.parallel = max(1, parallel)

    def read(self, patient_id: str) -> PatientRecord:
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="fhir-plugin-read") as pool:
            patient = pool.submit(self.client.read, "Patient", patient_id)
            searches = [pool.submit(self._search, rtype, patient_id) for rtype in CLINICAL_TYPES]
            resources = [validate_resource(patient.result())]
            seen: set[tuple[str, str]] = {("Patient", patient_id)}
            for rtype, future in zip(CLINICAL_TYPES, searches, strict=True):
                for found in future.result():
                    key = (str(found.get("resourceType")), str(found.get("id")))
                    if key[0] == rtype and key not in seen:  # skip stray types, and repeats across categories
                        seen.add(key)
                        resources.append(validate_resource(found))
        return PatientRecord(patient_id, tuple(resources))

    def _search(self, resource_type: str, patient_id: str) -> list[dict[str, Any]]:
        params = {"patient": patient_id, "_count": PAGE_SIZE}
        by_category = resource_type == "Observation" and _remembered_needing_category(self.client.base_url)
        if not by_category:
            try:
                return self.client.search(resource_type, params)
            except ServerError as exc:
                if resource_type != "Observation" or exc.status not in _REFUSED_WITHOUT_CATEGORY:
                    raise
            _remember_needing_category(self.client.base_url)
        found: list[dict[str, Any]] = []
        for category in OBSERVATION_CATEGORIES:
            found += self.client.search(resource_type, {**params, "category": f"{OBSERVATION_CATEGORY}|{category}"})
        return found
