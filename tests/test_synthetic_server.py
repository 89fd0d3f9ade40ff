"""The synthetic patients on a real FHIR R4 server: loaded by one transaction, read back whole, idempotent.

``fhir_base_url`` comes from tests/conftest.py (the sandbox HAPI, or FHIR_BASE_URL).
"""

from __future__ import annotations

import datetime as dt

import pytest
import requests
from fresh import fresh_cases

from fhir_plugin.synthetic import generate_cases, load_into_server

pytestmark = pytest.mark.server

AS_OF = dt.date(2026, 11, 26)
CLINICAL_TYPES = ("Condition", "Observation", "Encounter", "CarePlan")
# HAPI reuses a search's results for a minute unless told not to
_NO_CACHE = {"Accept": "application/fhir+json", "Cache-Control": "no-cache"}


def _count(session: requests.Session, base: str, rtype: str, params: dict[str, str]) -> int:
    url, query, total = f"{base}/{rtype}", dict(params, _count="1000"), 0
    while url:
        response = session.get(url, params=query, headers=_NO_CACHE, timeout=60)
        response.raise_for_status()
        page = response.json()
        total += sum(1 for e in page.get("entry", []) if e.get("search", {}).get("mode", "match") == "match")
        url = next((link["url"] for link in page.get("link", []) if link.get("relation") == "next"), None)
        query = None  # the next link carries its own query
    return total


def _server_counts(session: requests.Session, base: str, patient_id: str) -> dict[str, int]:
    counts = {"Patient": _count(session, base, "Patient", {"_id": patient_id})}
    for rtype in CLINICAL_TYPES:
        counts[rtype] = _count(session, base, rtype, {"patient": patient_id})
    return {k: v for k, v in counts.items() if v}


def _case_counts(case) -> dict[str, int]:
    counts: dict[str, int] = {}
    for res in case.resources:
        counts[res["resourceType"]] = counts.get(res["resourceType"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def loaded(fhir_base_url):
    base = fhir_base_url.rstrip("/")
    # fresh ids: other tests (sync --all, the app) write drafts for the shared fp- patients
    cases = fresh_cases(generate_cases(AS_OF))
    answer = load_into_server(base, cases)
    return base, cases, answer


def test_transaction_accepts_every_resource(loaded):
    _, cases, answer = loaded
    assert answer["type"] == "transaction-response"
    assert len(answer["entry"]) == sum(len(c.resources) for c in cases)
    assert all(e["response"]["status"].startswith(("200", "201")) for e in answer["entry"])


def test_each_patient_reads_back_whole(loaded):
    base, cases, _ = loaded
    with requests.Session() as session:
        for case in cases:
            assert _server_counts(session, base, case.patient_id) == _case_counts(case), case.key


def test_loading_twice_changes_nothing(loaded):
    base, cases, _ = loaded
    again = load_into_server(base, cases)
    # every PUT of an unchanged resource is an update of what is there, never a create
    assert all(e["response"]["status"].startswith("200") for e in again["entry"])
    with requests.Session() as session:
        for case in cases:
            assert _server_counts(session, base, case.patient_id) == _case_counts(case), case.key
