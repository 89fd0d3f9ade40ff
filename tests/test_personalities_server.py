"""Each sandbox EHR personality (issue 12) on the real HAPI behind the proxy: launch, review, write twice.

The app is launched by the sandbox EHR (auto-approve, plain HTTP: no browser
needed for these checks), reads the record, writes the drafts through its API,
and writes again.  What was written is counted on HAPI directly; the requests
the proxy saw are shown on failure.  The report's statuses must be the same on
every personality: they are compared with a check read straight from HAPI.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from urllib.parse import urlsplit

import pytest
import requests

from fhir_plugin import FhirClient, check, load_profile
from fhir_plugin._vocab import DRAFT_TAG
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import (
    READ_ONLY_CLIENT_SCOPES,
    forget_folded_drafts,
    load_fresh_case,
    needing_drafts,
    sandbox_stack,
)

pytestmark = pytest.mark.server

TAG = f"{DRAFT_TAG['system']}|{DRAFT_TAG['code']}"


def _drafts_in_hapi(base: str, patient: str) -> dict[str, list[dict]]:
    found = {}
    with FhirClient(base) as hapi:
        for rtype in ("Condition", "Goal", "CarePlan", "DocumentReference"):
            found[rtype] = hapi.search(rtype, {"patient": patient, "_tag": TAG})
        found["Provenance"] = [
            p for c in found["Condition"] for p in hapi.search("Provenance", {"target": f"Condition/{c['id']}"})
        ]
    return found


def _needing_drafts(today):
    """missing-onset as a record that still needs every draft (SPEC §7.1: no plan, the chart coded M62.56)."""
    chart = next(c for c in generate_cases(today) if c.key == "missing-onset")
    return dataclasses.replace(chart, resources=needing_drafts(chart.resources))


@pytest.mark.parametrize("personality", ["hapi", "epic-like", "oracle-like"])
def test_launch_review_write_twice_on_each_personality(fhir_base_url, tmp_path, personality):
    today = dt.date.today()
    case = load_fresh_case(fhir_base_url, _needing_drafts(today))
    pid = case.patient_id
    encounter = sorted(
        (r for r in case.resources if r["resourceType"] == "Encounter"), key=lambda r: r["period"]["start"]
    )[-1]["id"]
    with FhirClient(fhir_base_url) as hapi:
        expected = check(hapi.read_patient_record(pid), load_profile("M62.561"), today=today, encounter_id=encounter)

    with sandbox_stack(fhir_base_url, personality=personality, ledger_store=str(tmp_path / "ledger.sqlite")) as stack:
        browser = requests.Session()
        page = browser.get(stack.launch_url(pid, encounter), timeout=60)
        assert page.status_code == 200 and urlsplit(page.url).path == "/review", page.text[:300]
        session = browser.get(f"{stack.app_url}/api/session", timeout=30).json()
        report = browser.get(f"{stack.app_url}/api/report", timeout=60).json()
        assert session["write_allowed"], session
        first = browser.post(f"{stack.app_url}/api/write", headers={"X-CSRF-Token": session["csrf"]}, timeout=60)
        assert first.status_code == 200, first.text[:500]
        second = browser.post(f"{stack.app_url}/api/write", headers={"X-CSRF-Token": session["csrf"]}, timeout=60)
        assert second.status_code == 200, second.text[:500]
        seen = list(stack.ehr.proxy.seen)
    first, second = first.json(), second.json()
    written = _drafts_in_hapi(fhir_base_url, pid)
    # the shared HAPI outlives this test: a Provenance about the note would trip other tests' transactions
    forget_folded_drafts(fhir_base_url, pid)
    counts = {t: len(v) for t, v in written.items()}
    print(f"\n{personality}: proxy saw {seen}\nforms {first['forms']}\nnot written {first['not_written']}")

    # the same report on every personality as straight from HAPI
    assert {e["id"]: e["status"] for e in report["elements"]} == {e.id: e.status for e in expected.elements}
    # the second write creates nothing; what HAPI holds is one set
    # (SPEC §7.1: the second answer names the drafts the record now holds, and sends nothing)
    assert second["created"] == [] and set(second["existing"]) <= set(first["created"])
    assert sum(counts.values()) == len(first["created"])
    forms = {f["draft"]: f["form"] for f in first["forms"]}
    if personality == "hapi":
        assert counts == {"Condition": 1, "Goal": 4, "CarePlan": 1, "DocumentReference": 0, "Provenance": 1}
        assert ("POST", "/") in seen  # one transaction
    else:
        assert ("POST", "/") not in seen, seen  # no Bundle request reached the proxy
        assert counts["CarePlan"] == 0 and counts["Goal"] == 0 and counts["DocumentReference"] == 1
        [note] = written["DocumentReference"]
        assert note["docStatus"] == "preliminary"
        assert "Phase 1" in base64.b64decode(note["content"][0]["attachment"]["data"]).decode()
        assert forms["CarePlan"].startswith("DocumentReference (preliminary")
        [condition] = written["Condition"]
        assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"
    if personality == "epic-like":
        assert written["Condition"][0]["category"][0]["coding"][0]["code"] == "problem-list-item"
        assert "problem-list-item" in forms["Condition"]
        assert counts["Provenance"] == 0 and [n["draft"] for n in first["not_written"]] == ["Provenance"]
    if personality == "oracle-like":
        assert counts["Provenance"] == 1 and first["not_written"] == []


@pytest.mark.parametrize("personality", ["hapi", "epic-like", "oracle-like"])
def test_after_a_complete_write_a_new_launch_offers_nothing_and_the_plan_reads_proposed(
    fhir_base_url, tmp_path, personality
):
    """SPEC §7.1 on every personality (issue 12 follow-up): once the drafts are written — on epic-like and
    oracle-like the plan as a note — a new launch reads them back: ``treatment-plan`` is proposed, naming the
    plan (the CarePlan, or the note), and no drafts are offered."""
    today = dt.date.today()
    case = load_fresh_case(fhir_base_url, _needing_drafts(today))
    pid = case.patient_id
    with sandbox_stack(fhir_base_url, personality=personality, ledger_store=str(tmp_path / "ledger.sqlite")) as stack:
        first = requests.Session()
        assert first.get(stack.launch_url(pid), timeout=60).status_code == 200
        before = first.get(f"{stack.app_url}/api/report", timeout=60).json()
        csrf = first.get(f"{stack.app_url}/api/session", timeout=30).json()["csrf"]
        wrote = first.post(f"{stack.app_url}/api/write", headers={"X-CSRF-Token": csrf}, timeout=60)
        assert wrote.status_code == 200, wrote.text[:500]
        rerun = requests.Session()
        page = rerun.get(stack.launch_url(pid), timeout=60)
        report = rerun.get(f"{stack.app_url}/api/report", timeout=60).json()
        drafts = rerun.get(f"{stack.app_url}/api/drafts", timeout=60)
    forget_folded_drafts(fhir_base_url, pid)
    created = wrote.json()["created"]
    print(f"\n{personality}: wrote {created}; rerun drafts {drafts.status_code} {drafts.text[:300]}")

    status = {e["id"]: e for e in report["elements"]}
    assert {e["id"]: e["status"] for e in before["elements"]}["treatment-plan"] == "missing"
    plan = "CarePlan/" if personality == "hapi" else "DocumentReference/"
    assert status["treatment-plan"]["status"] == "proposed"
    assert [r for r in status["treatment-plan"]["evidence"] if r.startswith(plan)] == [
        r for r in created if r.startswith(plan)
    ]
    # nothing new is offered: the drafts answer says why, naming what the record holds
    assert drafts.status_code == 409 and "already in the record" in drafts.json()["error"]
    assert set(drafts.json()["existing"]["written"]) <= set(created)
    assert [r for r in created if r.startswith(plan)][0] in drafts.json()["existing"]["written"]
    assert "already" in page.text or "written" in page.text.lower()


@pytest.mark.parametrize("personality", ["epic-like", "oracle-like"])
def test_fewer_scopes_granted_than_asked_gives_a_working_read_only_review(fhir_base_url, personality):
    """The client is registered read-only, so the EHR grants fewer scopes than the app asks (on epic-like, in
    v1 spelling): the review works, and writing is refused by the app before anything reaches the EHR."""
    today = dt.date.today()
    case = load_fresh_case(fhir_base_url, _needing_drafts(today))
    with sandbox_stack(fhir_base_url, personality=personality, read_only=True) as stack:
        browser = requests.Session()
        page = browser.get(stack.launch_url(case.patient_id), timeout=60)
        assert page.status_code == 200 and urlsplit(page.url).path == "/review", page.text[:300]
        session = browser.get(f"{stack.app_url}/api/session", timeout=30).json()
        report = browser.get(f"{stack.app_url}/api/report", timeout=60).json()
        refused = browser.post(f"{stack.app_url}/api/write", headers={"X-CSRF-Token": session["csrf"]}, timeout=60)
        seen = list(stack.ehr.proxy.seen)
    print(f"\n{personality}: granted {session['scopes']}")
    assert not session["write_allowed"] and session["missing_write_scopes"]
    if personality == "epic-like":
        assert all(".read" in s or "/" not in s for s in session["scopes"])  # v1 spellings, no crash
    assert {e["status"] for e in report["elements"]} and report["patient"].endswith(case.patient_id)
    assert refused.status_code == 403
    assert not any(method == "POST" for method, _ in seen)


def test_a_grant_without_plan_creates_still_writes_the_plan_as_a_note(fhir_base_url, tmp_path):
    """The EHR grants create on Condition and DocumentReference only (not CarePlan, Goal, Provenance): the app
    may still write, in the forms the grant allows — the plan as the note — and names what it could not."""
    today = dt.date.today()
    case = load_fresh_case(fhir_base_url, _needing_drafts(today))
    pid = case.patient_id
    scopes = [*READ_ONLY_CLIENT_SCOPES, "patient/Condition.c", "patient/DocumentReference.c"]
    with sandbox_stack(fhir_base_url, client_scopes=scopes, ledger_store=str(tmp_path / "ledger.sqlite")) as stack:
        browser = requests.Session()
        page = browser.get(stack.launch_url(pid), timeout=60)
        assert page.status_code == 200 and urlsplit(page.url).path == "/review", page.text[:300]
        session = browser.get(f"{stack.app_url}/api/session", timeout=30).json()
        first = browser.post(f"{stack.app_url}/api/write", headers={"X-CSRF-Token": session["csrf"]}, timeout=60)
        second = browser.post(f"{stack.app_url}/api/write", headers={"X-CSRF-Token": session["csrf"]}, timeout=60)
    written = _drafts_in_hapi(fhir_base_url, pid)
    forget_folded_drafts(fhir_base_url, pid)
    print(f"\ngranted {session['scopes']}\nfirst {first.text[:600]}")

    assert not any(s.startswith(("patient/CarePlan.c", "patient/Goal.c")) for s in session["scopes"])
    assert session["write_allowed"] and session["missing_write_scopes"] == []
    assert first.status_code == 200 and second.status_code == 200, (first.text[:300], second.text[:300])
    first, second = first.json(), second.json()
    counts = {t: len(v) for t, v in written.items()}
    assert counts == {"Condition": 1, "Goal": 0, "CarePlan": 0, "DocumentReference": 1, "Provenance": 0}
    forms = {f["draft"]: f["form"] for f in first["forms"]}
    assert forms["CarePlan"].startswith("DocumentReference (preliminary")
    assert [n["draft"] for n in first["not_written"]] == ["Provenance"]
    assert first["not_written"][0]["reason"].startswith("the granted scopes allow no Provenance create")
    assert second["created"] == [] and sorted(second["existing"]) == sorted(first["created"])
