"""The CDS Hooks service (smart_launch/routes/cds.py), written from the CDS Hooks 2.0 specification:
discovery, a hook call with the prefetch, reads through ``fhirServer`` for what the prefetch lacks or
sends as null, 412 when the service has neither, the order-sign hook, feedback, and the report of it.

The app runs in this process (uvicorn on a free port); the EHR side is a signer with a key made here.
Tests marked ``server`` read through the sandbox HAPI (``FHIR_BASE_URL``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
import uuid

import pytest
import requests

from fhir_plugin import CardContext, PatientRecord, cards_for_review, load_profile, needs_review, review
from fhir_plugin.synthetic import generate_cases
from sandbox.ehr._cds_client import CdsSigner
from sandbox.testing import live_server, load_fresh_case, needing_drafts
from smart_launch._app import create_app
from smart_launch._cds_auth import CdsClientTrust
from smart_launch._settings import Settings

TODAY = dt.date.today()
CASES = generate_cases(TODAY)
ISS = "https://ehr.example.test"
PV = "patient-view-m62-561"


@pytest.fixture(scope="module")
def signer():
    return CdsSigner(ISS)


@pytest.fixture(scope="module")
def service(signer, tmp_path_factory):
    store = tmp_path_factory.mktemp("cds") / "feedback.sqlite"
    settings = Settings(
        allowed_issuers=("https://ehr.example.test/fhir",),
        session_store="memory",
        redirect_uri="https://app.example.test/callback",
        cds_feedback_store=str(store),
        cds_clients=(CdsClientTrust(ISS, jwks=signer.jwks()),),
    )
    with live_server(create_app(settings)) as server:
        server.store_path = store
        yield server


def _bundle(resources, rtype):
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in resources if r["resourceType"] == rtype],
    }


def prefetch_of(case):
    res = case.resources
    return {
        "patient": next(r for r in res if r["resourceType"] == "Patient"),
        "conditions": _bundle(res, "Condition"),
        "observations": _bundle(res, "Observation"),
        "encounters": _bundle(res, "Encounter"),
        "carePlans": _bundle(res, "CarePlan"),
    }


def call(service, signer, service_id, *, patient, prefetch=None, hook="patient-view", **extra):
    url = f"{service.url}/cds-services/{service_id}"
    body = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": patient, **extra.pop("context", {})},
        **extra,
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return requests.post(url, json=body, headers={"Authorization": f"Bearer {signer.sign(url)}"}, timeout=60)


def test_discovery_shape(service):
    answer = requests.get(f"{service.url}/cds-services", timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    services = answer.json()["services"]
    assert {s["hook"] for s in services} == {"patient-view", "order-sign"}
    for s in services:
        assert set(s) >= {"hook", "id", "title", "description", "prefetch"}
        assert all("{{context.patientId}}" in t for t in s["prefetch"].values())


def test_openapi_lists_the_hooks(service):
    paths = requests.get(f"{service.url}/openapi.json", timeout=10).json()["paths"]
    assert {"/cds-services", "/cds-services/{service_id}", "/cds-services/{service_id}/feedback"} <= set(paths)


@pytest.mark.parametrize("key", ["missing-onset", "flag-fever", "clinical-example", "complete"])
def test_a_hook_call_with_the_full_prefetch_answers_the_cards_of_the_review(service, signer, key):
    case = next(c for c in CASES if c.key == key)
    answer = call(service, signer, PV, patient=case.patient_id, prefetch=prefetch_of(case))
    assert answer.status_code == 200, answer.text
    cards = answer.json()["cards"]
    profile = load_profile("M62.561")
    result = review(
        PatientRecord(case.patient_id, tuple(case.resources)), profile, today=TODAY, now=dt.datetime.now(dt.UTC)
    )
    expected = cards_for_review(
        result,
        profile,
        CardContext(PV, "x", "https://app.example.test/launch", "https://app.example.test/"),
        case.resources,
    )
    assert [(c["indicator"], c["summary"]) for c in cards] == [(c["indicator"], c["summary"]) for c in expected]
    assert "check;dur=" in answer.headers["Server-Timing"]
    for card in cards:
        assert card["links"][0]["url"] == "https://app.example.test/launch"


def test_without_prefetch_or_fhir_server_the_answer_is_412(service, signer):
    case = next(c for c in CASES if c.key == "missing-onset")
    assert call(service, signer, PV, patient=case.patient_id).status_code == 412
    # conditions alone show the code under review; the rest cannot be read anywhere
    partial = {"conditions": prefetch_of(case)["conditions"], "observations": None}
    answer = call(service, signer, PV, patient=case.patient_id, prefetch=partial)
    assert answer.status_code == 412 and "error" in answer.json()


def test_no_card_when_the_code_is_not_under_review_and_nothing_more_is_read(service, signer):
    """The fast path: the Conditions show M62.830 is not under review, so the (dead) fhirServer is never asked."""
    profile = load_profile("M62.830")
    quiet = [c for c in CASES if not needs_review(c.resources, profile)]
    assert quiet
    for case in quiet:
        answer = call(
            service,
            signer,
            "patient-view-m62-830",
            patient=case.patient_id,
            prefetch={"conditions": prefetch_of(case)["conditions"]},
            fhirServer="http://127.0.0.1:9/fhir",
            fhirAuthorization={"access_token": "x", "token_type": "Bearer"},
        )
        assert answer.status_code == 200 and answer.json() == {"cards": []}


def test_order_sign_card_for_an_order_whose_reason_is_the_code(service, signer):
    case = next(c for c in CASES if c.key == "missing-onset")
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-pt",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{case.patient_id}"},
        "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M62.561"}]}],
    }
    orders = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}
    answer = call(
        service,
        signer,
        "order-sign-m62-561",
        hook="order-sign",
        patient=case.patient_id,
        prefetch=prefetch_of(case),
        context={"draftOrders": orders},
    )
    (card,) = answer.json()["cards"]
    assert card["indicator"] == "warning" and "ServiceRequest/draft-pt" in card["detail"]
    unrelated = dict(
        order, reasonCode=[{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.50"}]}]
    )
    answer = call(
        service,
        signer,
        "order-sign-m62-561",
        hook="order-sign",
        patient=case.patient_id,
        context={"draftOrders": dict(orders, entry=[{"resource": unrelated}])},
    )
    assert answer.status_code == 200 and answer.json() == {"cards": []}  # no prefetch needed: nothing read


def test_unknown_service_is_404(service, signer):
    assert call(service, signer, "no-such-service", patient="x").status_code == 404


def test_feedback_is_stored_and_counted_by_the_cli(service, signer):
    case = next(c for c in CASES if c.key == "flag-fever")
    # a record that still needs drafts (SPEC §7.1), so its card carries a suggestion to accept
    case = dataclasses.replace(case, resources=needing_drafts(case.resources))
    cards = call(service, signer, PV, patient=case.patient_id, prefetch=prefetch_of(case)).json()["cards"]
    card = next(c for c in cards if c["source"]["topic"]["code"] == "red-flags")
    url = f"{service.url}/cds-services/{PV}"

    def send(body):
        return requests.post(
            url + "/feedback", json=body, headers={"Authorization": f"Bearer {signer.sign(url)}"}, timeout=10
        )

    accepted = {
        "card": card["uuid"],
        "outcome": "accepted",
        "outcomeTimestamp": "2026-11-26T10:00:00Z",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
    }
    reason = card["overrideReasons"][1]
    overridden = {
        "card": card["uuid"],
        "outcome": "overridden",
        "outcomeTimestamp": "2026-11-26T10:01:00Z",
        "overrideReason": {"reason": reason, "userComment": "seen by neurology"},
    }
    assert send({"feedback": [accepted]}).status_code == 200
    assert send({"feedback": [overridden]}).status_code == 200
    assert send({"feedback": [{"card": card["uuid"], "outcome": "maybe"}]}).status_code == 400
    assert send({"nothing": []}).status_code == 400
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_plugin._cli",
            "cds-feedback",
            "--store",
            str(service.store_path),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    row = counts["services"][PV]["red-flags"]
    assert row["accepted"] >= 1 and row["overridden"] >= 1 and row["issued"] >= 1
    assert counts["override_reasons"][reason["code"]] >= 1
    text = subprocess.run(
        [sys.executable, "-m", "fhir_plugin._cli", "cds-feedback", "--store", str(service.store_path)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert PV in text and reason["code"] in text


# ---------------------------------------------------------------- reading through fhirServer


@pytest.mark.server
def test_without_prefetch_the_record_is_read_through_fhir_server(service, signer, fhir_base_url):
    case = load_fresh_case(fhir_base_url, next(c for c in CASES if c.key == "missing-onset"))
    with_prefetch = call(service, signer, PV, patient=case.patient_id, prefetch=prefetch_of(case)).json()["cards"]
    answer = call(
        service,
        signer,
        PV,
        patient=case.patient_id,
        fhirServer=fhir_base_url,
        fhirAuthorization={
            "access_token": "opaque-token-for-hapi",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.rs",
            "subject": "ehr",
        },
    )
    assert answer.status_code == 200, answer.text
    read = answer.json()["cards"]
    assert [(c["indicator"], c["summary"]) for c in read] == [(c["indicator"], c["summary"]) for c in with_prefetch]
    # null prefetch values mean "read it yourself": the same cards again
    nulls = dict(prefetch_of(case), observations=None, carePlans=None)
    mixed = call(service, signer, PV, patient=case.patient_id, prefetch=nulls, fhirServer=fhir_base_url).json()
    assert [c["summary"] for c in mixed["cards"]] == [c["summary"] for c in with_prefetch]


def test_a_fhir_server_that_cannot_be_read_is_412(service, signer):
    answer = call(
        service,
        signer,
        PV,
        patient="fp-missing-onset",
        fhirServer="http://127.0.0.1:9/fhir",
        fhirAuthorization={"access_token": "x", "token_type": "Bearer"},
    )
    assert answer.status_code == 412


def test_fhir_plugin_serve_answers_the_hooks_on_the_apps_port(signer, tmp_path):
    """``fhir-plugin serve``: discovery and a hook call beside the app, trust from the CDS_CLIENTS file."""
    import os
    import time

    from sandbox.testing import free_port

    clients = tmp_path / "cds-clients.json"
    clients.write_text(json.dumps([{"iss": ISS, "jwks": signer.jwks()}]))
    port = free_port()
    env = dict(
        os.environ,
        SMART_ALLOWED_ISSUERS="https://ehr.example.test/fhir",
        SMART_SESSION_STORE="memory",
        CDS_CLIENTS=str(clients),
        CDS_FEEDBACK_STORE=str(tmp_path / "fb.sqlite"),
        CDS_BASE_URL=f"http://127.0.0.1:{port}",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_plugin._cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                discovery = requests.get(f"{base}/cds-services", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "fhir-plugin serve did not start"
                time.sleep(0.2)
        assert {s["id"] for s in discovery.json()["services"]} >= {PV, "order-sign-m62-561"}
        case = next(c for c in CASES if c.key == "flag-fever")
        server = type("S", (), {"url": base})
        answer = call(server, signer, PV, patient=case.patient_id, prefetch=prefetch_of(case))
        assert answer.status_code == 200 and answer.json()["cards"][0]["indicator"] == "critical"
        assert "/cds-services" in requests.get(f"{base}/openapi.json", timeout=5).json()["paths"]
    finally:
        proc.terminate()
        proc.wait(30)
