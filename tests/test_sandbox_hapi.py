"""Integration tests of the sandbox FHIR server (sandbox/hapi) and its run script.

The FHIR tests talk plain HTTP to ``fhir_base_url`` (tests/conftest.py): the sandbox HAPI, or any
R4 server named by FHIR_BASE_URL. Every run uses fresh identifiers, so they also pass against a
shared public server. The script tests need the sandbox itself and are skipped when FHIR_BASE_URL
points elsewhere.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest
import requests
from conftest import run_sandbox_hapi, sandbox_hapi_port

FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
TIMEOUT = 120  # the first $validate loads HAPI's R4 definitions and takes a few seconds
CONDITION_ID_SYSTEM = "https://fhir-plugin.example/test/condition-id"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

needs_sandbox = pytest.mark.skipif(
    bool(os.environ.get("FHIR_BASE_URL")),
    reason="FHIR_BASE_URL names another server; the sandbox/hapi/run tests need the sandbox HAPI",
)


def _condition(subject: str, encounter: str, identifier_value: str) -> dict:
    return {
        "resourceType": "Condition",
        "identifier": [{"system": CONDITION_ID_SYSTEM, "value": identifier_value}],
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": "confirmed",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "problem-list-item",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": ICD10CM,
                    "code": "M62.561",
                    "display": "Muscle wasting and atrophy, not elsewhere classified, right lower leg",
                }
            ]
        },
        "subject": {"reference": subject},
        "encounter": {"reference": encounter},
    }


def _id_from_location(location: str) -> str:
    """'http://x/fhir/Condition/12/_history/1' or 'Condition/12/_history/1' -> '12'."""
    parts = location.split("/")
    if "_history" in parts:
        return parts[parts.index("_history") - 1]
    return parts[-1]


def _conditions_of(base: str, patient_id: str) -> list[dict]:
    r = requests.get(f"{base}/Condition", params={"patient": patient_id}, headers=HEADERS, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


@pytest.mark.server
def test_transaction_search_and_conditional_create(fhir_base_url):
    base = fhir_base_url
    run_id = uuid.uuid4().hex
    patient_urn, encounter_urn, condition_urn, observation_urn = (f"urn:uuid:{uuid.uuid4()}" for _ in range(4))
    condition = _condition(patient_urn, encounter_urn, run_id)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "https://fhir-plugin.example/test/patient-id", "value": run_id}],
                    "name": [{"family": "Sandbox", "given": ["Test"]}],
                    "gender": "female",
                    "birthDate": "1961-04-12",
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": encounter_urn,
                "resource": {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": "AMB",
                    },
                    "subject": {"reference": patient_urn},
                    "period": {"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T09:30:00Z"},
                },
                "request": {"method": "POST", "url": "Encounter"},
            },
            {
                "fullUrl": condition_urn,
                "resource": condition,
                "request": {"method": "POST", "url": "Condition"},
            },
            {
                "fullUrl": observation_urn,
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
                    "subject": {"reference": patient_urn},
                    "encounter": {"reference": encounter_urn},
                    "effectiveDateTime": "2024-03-01T09:10:00Z",
                    "valueQuantity": {
                        "value": 61.5,
                        "unit": "kg",
                        "system": "http://unitsofmeasure.org",
                        "code": "kg",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }

    r = requests.post(base, json=bundle, headers=HEADERS, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    response = r.json()
    assert response["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in response["entry"]]
    assert all(s.startswith("201") for s in statuses), statuses
    patient_id, encounter_id, condition_id, observation_id = (
        _id_from_location(e["response"]["location"]) for e in response["entry"]
    )

    # The urn:uuid references were rewritten to the ids the server assigned.
    found = _conditions_of(base, patient_id)
    assert [c["id"] for c in found] == [condition_id]
    assert found[0]["subject"]["reference"] == f"Patient/{patient_id}"
    assert found[0]["encounter"]["reference"] == f"Encounter/{encounter_id}"
    r = requests.get(f"{base}/Observation/{observation_id}", headers=HEADERS, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["encounter"]["reference"] == f"Encounter/{encounter_id}"

    # Creating the same Condition again with If-None-Exist finds the stored one instead.
    again = _condition(f"Patient/{patient_id}", f"Encounter/{encounter_id}", run_id)
    r = requests.post(
        f"{base}/Condition",
        json=again,
        headers={
            **HEADERS,
            "If-None-Exist": f"identifier={CONDITION_ID_SYSTEM}|{run_id}",
            "Prefer": "return=representation",
        },
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert _id_from_location(r.headers["Location"]) == condition_id
    assert r.json()["id"] == condition_id
    assert [c["id"] for c in _conditions_of(base, patient_id)] == [condition_id]


@pytest.mark.server
def test_validate_a_valid_condition(fhir_base_url):
    condition = _condition("Patient/example", "Encounter/example", uuid.uuid4().hex)
    condition["text"] = {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Muscle wasting and atrophy, right lower leg</div>',
    }
    r = requests.post(f"{fhir_base_url}/Condition/$validate", json=condition, headers=HEADERS, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    problems = [i for i in outcome.get("issue", []) if i["severity"] in ("error", "fatal")]
    assert problems == []


def _one_sentence(result) -> str:
    text = (result.stdout + result.stderr).strip()
    assert len(text.splitlines()) == 1, text
    return text


@needs_sandbox
@pytest.mark.server
def test_run_start_when_already_running_says_so(fhir_base_url):
    port = str(sandbox_hapi_port())
    result = run_sandbox_hapi("start", "--port", port)
    assert result.returncode != 0
    assert "already runs on port " + port in _one_sentence(result)
    assert run_sandbox_hapi("status", "--port", port).returncode == 0


@needs_sandbox
def test_run_start_on_a_taken_port_says_so():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = str(listener.getsockname()[1])
        result = run_sandbox_hapi("start", "--port", port)
    assert result.returncode != 0
    assert f"Port {port} is taken" in _one_sentence(result)


@needs_sandbox
def test_run_stop_and_status_when_nothing_runs():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    stop = run_sandbox_hapi("stop", "--port", port)
    assert stop.returncode == 0, stop.stderr
    assert run_sandbox_hapi("status", "--port", port).returncode == 3
