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

from ._client import PAGE_SIZE, PLAN_NOTE_SEARCH, FhirClient, own_plan_notes
from ._errors import ServerError
from ._record import PatientRecord, validate_resource
from ._vocab import (
    CLINICAL_TYPES,
    NOTE_PROVENANCE_EXTENSION,
    OBSERVATION_CATEGORIES,
    OBSERVATION_CATEGORY,
    URI_IDENTIFIER,
    is_plugin_draft,
)

__all__ = ["RecordReader", "BatchReader", "PerTypeReader", "NOTE_TYPES"]

#: what every reader searches beside the review's types: the plugin's plan notes, and the Provenance
#: about such a note (SPEC §7.1: a rerun reads a folded plan as drafted); a token needs search on both
NOTE_TYPES = ("DocumentReference", "Provenance")

#: requests in flight at once for one patient: the Patient read, one search per type and the plan-note
#: search all go out together, so the read costs about one round trip of latency, as the batch does (issue 12)
PARALLEL_SEARCHES = 2 + len(CLINICAL_TYPES)
#: plan notes whose Provenance is looked for, at most (one per encounter the plugin drafted for)
MAX_NOTES_FOLLOWED = 10
#: answers that mean "this search needs more parameters" (Epic answers 400 for an Observation search
#: without category; others 403 or 422)
_REFUSED_WITHOUT_CATEGORY = frozenset({400, 403, 422})
#: how many servers the "Observation needs a category" memory holds (least recently used dropped first)
CATEGORY_MEMORY = 64

_needs_category: OrderedDict[str, None] = OrderedDict()
#: servers that refused a record batch for its plan-note search: their batches go without it
_notes_refused: OrderedDict[str, None] = OrderedDict()
_memory_lock = threading.Lock()


def _remembered(memory: OrderedDict[str, None], base_url: str) -> bool:
    with _memory_lock:
        if base_url in memory:
            memory.move_to_end(base_url)
            return True
        return False


def _remember(memory: OrderedDict[str, None], base_url: str) -> None:
    """Remember ``base_url`` in ``memory`` (per process, the least recently used dropped past CATEGORY_MEMORY)."""
    with _memory_lock:
        memory[base_url] = None
        memory.move_to_end(base_url)
        while len(memory) > CATEGORY_MEMORY:
            memory.popitem(last=False)


def _remembered_needing_category(base_url: str) -> bool:
    return _remembered(_needs_category, base_url)


def _remember_needing_category(base_url: str) -> None:
    """This server refused an Observation search without a category: ask it per category from now on."""
    _remember(_needs_category, base_url)


def _refused(exc: ServerError) -> bool:
    """A search the server (or the token's scopes) will not answer: the record is read without it."""
    return exc.status != 401


def _plan_notes(client: FhirClient, patient_id: str) -> list[dict[str, Any]]:
    """The plugin's plan notes (one page of plan-of-care notes, filtered here); none when the search is refused."""
    try:
        page = client.request("GET", "DocumentReference", params={"patient": patient_id, **PLAN_NOTE_SEARCH})
    except ServerError as exc:
        if not _refused(exc):
            raise
        return []
    return own_plan_notes(page) if page.get("resourceType") == "Bundle" else []


def _with_note_provenances(client: FhirClient, record: PatientRecord) -> PatientRecord:
    """``record`` with the plugin's Provenances about its plan notes that name one (SPEC §7.1).

    A note names the Provenance written after it (``_fold``); whether that one
    is there tells a complete set from a write cut short, so a rerun offers
    only what is missing.  One search per such note, only after a folded write
    on a server that creates Provenance; a refused search adds nothing.
    """
    notes = [
        n
        for n in record.of_type("DocumentReference")
        if any(e.get("url") == NOTE_PROVENANCE_EXTENSION for e in n.get("extension") or [])
    ][:MAX_NOTES_FOLLOWED]
    found: dict[str, dict[str, Any]] = {}
    for note in notes:
        try:
            answer = client.search("Provenance", {"target": f"DocumentReference/{note['id']}"})
        except ServerError as exc:
            if not _refused(exc):
                raise
            continue
        for provenance in answer:
            tagged = any(t.get("system") == URI_IDENTIFIER for t in (provenance.get("meta") or {}).get("tag") or [])
            if provenance.get("resourceType") == "Provenance" and is_plugin_draft(provenance) and tagged:
                found[str(provenance.get("id"))] = provenance
    if not found:
        return record
    return PatientRecord(record.patient_id, record.resources + tuple(validate_resource(p) for p in found.values()))


class RecordReader(Protocol):
    """Reads one patient's record (the Patient and its clinical resources), validated as R4."""

    def read(self, patient_id: str) -> PatientRecord: ...


class BatchReader:
    """The record in one round trip: a batch of the Patient read and one search per type."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client

    def read(self, patient_id: str) -> PatientRecord:
        # the plugin's plan notes ride in the same batch: one round trip still (SPEC §7.1)
        base = self.client.base_url
        if _remembered(_notes_refused, base):
            return self.client.read_patient_record(patient_id)
        try:
            record = self.client.read_patient_record(patient_id, plan_notes=True)
        except ServerError as exc:
            # a gateway that refuses the whole batch for its note search (a token without DocumentReference
            # read): read without notes, and from now on for this server, if that is what it takes
            if exc.status not in _REFUSED_WITHOUT_CATEGORY:
                raise
            record = self.client.read_patient_record(patient_id)
            _remember(_notes_refused, base)
            return record
        return _with_note_provenances(self.client, record)


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
            notes = pool.submit(_plan_notes, self.client, patient_id)
            resources = [validate_resource(patient.result())]
            seen: set[tuple[str, str]] = {("Patient", patient_id)}
            for rtype, future in zip(CLINICAL_TYPES, searches, strict=True):
                for found in future.result():
                    key = (str(found.get("resourceType")), str(found.get("id")))
                    if key[0] == rtype and key not in seen:  # skip stray types, and repeats across categories
                        seen.add(key)
                        resources.append(validate_resource(found))
            for note in notes.result():
                key = ("DocumentReference", str(note.get("id")))
                if key not in seen:
                    seen.add(key)
                    resources.append(validate_resource(note))
        return _with_note_provenances(self.client, PatientRecord(patient_id, tuple(resources)))

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
