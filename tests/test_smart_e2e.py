"""End to end in headless Chromium: the sandbox EHR launches the app for a patient with gaps, the
review page shows what ``check()`` says about the same record, the clinician writes the drafts, HAPI
holds them, and a second launch and write creates nothing new.

Servers: HAPI from the ``fhir_base_url`` fixture; the sandbox EHR and this app in this process on
free ports.  Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_plugin import FhirClient, check, load_profile, review
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import APP_CLIENT_SCOPES, CHROMIUM, free_port, headless_chromium, load_fresh_case, sandbox_stack

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
DRAFT_TAG = "urn:fhir-plugin:tag|machine-drafted"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    with headless_chromium() as chromium:
        yield chromium


def _statuses(page) -> dict[str, str]:
    rows = page.locator("tr.element")
    return {
        rows.nth(i).get_attribute("data-element"): rows.nth(i).get_attribute("data-status") for i in range(rows.count())
    }


def _drafts_in_hapi(base: str, patient: str) -> dict[str, int]:
    counts = {}
    for rtype in ("Condition", "Goal", "CarePlan"):
        # no-cache: HAPI reuses an identical search's results for a minute otherwise
        bundle = requests.get(
            f"{base}/{rtype}",
            params={"patient": patient, "_tag": DRAFT_TAG, "_summary": "count"},
            headers={"Cache-Control": "no-cache"},
            timeout=30,
        ).json()
        counts[rtype] = bundle.get("total", 0)
    return counts


@pytest.mark.server
@pytest.mark.browser
def test_ehr_launch_review_write_and_second_launch_in_chromium(fhir_base_url, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    today = dt.date.today()
    case = next(c for c in generate_cases(today) if c.key == "missing-treatment-plan")
    case = load_fresh_case(fhir_base_url, case)
    pid, resources = case.patient_id, case.resources
    encounters = sorted((r for r in resources if r["resourceType"] == "Encounter"), key=lambda r: r["period"]["start"])
    encounter = encounters[-1]["id"]
    profile = load_profile("M62.561")
    with FhirClient(fhir_base_url) as hapi:
        record = hapi.read_patient_record(pid)
    expected = check(record, profile, today=today, encounter_id=encounter)
    # SPEC §7.1: the record's confirmed Condition is built on, so the drafts hold no Condition
    entries = len(
        review(record, profile, today=today, now=dt.datetime.now(dt.UTC), encounter_id=encounter).drafts["entry"]
    )
    assert {e.id: e.status for e in expected.elements}["treatment-plan"] == "missing"

    with sandbox_stack(fhir_base_url) as stack:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        # 1. the EHR launches the app for the patient and encounter; the review page shows the check
        page.goto(stack.launch_url(pid, encounter))
        page.wait_for_selector("#summary")
        assert page.url.startswith(f"{stack.app_url}/review?launch=")  # one session per launch (issue 13)
        page.screenshot(path=str(ARTIFACTS / "smart-review.png"), full_page=True)
        page.screenshot(path=str(ARTIFACTS / "smart-review-top.png"))
        page.locator("#drafts").screenshot(path=str(ARTIFACTS / "smart-review-drafts.png"))
        assert _statuses(page) == {e.id: e.status for e in expected.elements}
        banner = page.locator("#patient-banner").inner_text()
        patient = next(r for r in resources if r["resourceType"] == "Patient")
        assert patient["name"][0]["family"] in banner and patient["birthDate"] in banner
        assert page.locator("#code-fit .fit").inner_text() == expected.code_fit.status
        assert page.locator("li.phase").count() == 4
        flags = page.locator("tr.flag")
        assert {
            flags.nth(i).get_attribute("data-flag"): flags.nth(i).get_attribute("data-status")
            for i in range(flags.count())
        } == {f.id: f.status for f in expected.red_flags}

        # evidence links open our JSON viewer on the patient's own resource
        page.click("#group-met > summary")  # met elements are folded away under the gaps
        link = page.locator("#group-met a.ev").first
        ref = link.get_attribute("title")  # issue 13: the link reads date and value; the id is its title
        link.click()
        page.click("details.raw > summary")  # readable facts first, the raw JSON one click away
        page.wait_for_selector("pre.json")
        assert f'"id": "{ref.split("/")[1]}"' in page.locator("pre.json").inner_text()
        page.screenshot(path=str(ARTIFACTS / "smart-evidence.png"))
        page.go_back()
        page.wait_for_selector("#write-button")

        # 2. write: a confirmation step, then one transaction
        page.click("#write-button")
        page.wait_for_selector("#confirm-write")
        page.screenshot(path=str(ARTIFACTS / "smart-confirm.png"))
        assert _drafts_in_hapi(fhir_base_url, pid) == {"Condition": 0, "Goal": 0, "CarePlan": 0}
        page.click("#confirm-write")
        page.wait_for_selector("#write-result")
        page.screenshot(path=str(ARTIFACTS / "smart-written.png"))
        assert page.locator("#created li").count() == entries
        after_first = _drafts_in_hapi(fhir_base_url, pid)
        assert after_first == {"Condition": 0, "Goal": entries - 2, "CarePlan": 1}  # SPEC §7.1: no 2nd Condition

        # 3. a second launch and write creates nothing new (conditional creates match the first drafts)
        page.goto(stack.launch_url(pid, encounter))
        page.wait_for_selector("#summary")
        page.screenshot(path=str(ARTIFACTS / "smart-review-again.png"), full_page=True)
        # the record now holds the plugin's draft plan, read at once (no cached search): proposed
        assert _statuses(page)["treatment-plan"] == "proposed"
        # SPEC §7.1 after a write: the page lists what was written and offers no second write
        assert page.locator("#write-button").count() == 0
        assert page.locator("#already-written").count() == 1
        # the record reader does not read Provenance back: the plan and its goals are what is listed
        assert page.locator("#write ul.written-list li").count() == after_first["CarePlan"] + after_first["Goal"]
        assert _drafts_in_hapi(fhir_base_url, pid) == after_first
        assert errors == []  # no CSP violation or script error in the console
        context.close()


@pytest.mark.server
@pytest.mark.browser
def test_refusals_render_in_chromium(fhir_base_url, browser):
    """What a user sees for an untrusted EHR, a mismatch, and a read-only grant (screenshots)."""
    ARTIFACTS.mkdir(exist_ok=True)
    today = dt.date.today()
    case = next(c for c in generate_cases(today) if c.key == "spasm-calf")
    case = load_fresh_case(fhir_base_url, case)
    pid = case.patient_id
    with sandbox_stack(fhir_base_url, read_only=True) as stack:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        response = page.goto(f"{stack.app_url}/launch?iss=https://evil.example/fhir&launch=x")
        assert response.status == 400
        page.screenshot(path=str(ARTIFACTS / "smart-untrusted-iss.png"))
        page.goto(stack.launch_url(pid))
        page.wait_for_selector("#summary")
        page.screenshot(path=str(ARTIFACTS / "smart-mismatch-readonly.png"), full_page=True)
        assert page.locator("#drafts-refused").count() == 1 and page.locator("#write-button").count() == 0
        context.close()


def _access_pids(log_text: str) -> set[str]:
    """The process ids of the app workers that wrote access-log lines."""
    return set(re.findall(r"\[(\d+)\] INFO smart_launch.access", log_text))


@pytest.mark.server
def test_fhir_plugin_serve_with_two_workers_shares_sessions_and_logs_no_secret(fhir_base_url, tmp_path):
    """``fhir-plugin serve --workers 2``: a launch started on one worker finishes on the other
    (state and tokens in the SQLite store), and the log holds no token, code or session id."""
    from sandbox.ehr import Client, running_ehr

    case = next(c for c in generate_cases(dt.date.today()) if c.key == "complete")
    case = load_fresh_case(fhir_base_url, case)
    pid = case.patient_id
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    store = tmp_path / "sessions.sqlite"
    with running_ehr(fhir_base_url, auto_approve=True) as ehr:
        ehr.clients.register(
            Client(
                "fhir-plugin",
                redirect_uris=[f"{app_url}/callback"],
                launch_url=f"{app_url}/launch",
                scope=list(APP_CLIENT_SCOPES),
            )
        )
        env = {
            **os.environ,
            "SMART_ALLOWED_ISSUERS": ehr.fhir_base_url,
            "SMART_REDIRECT_URI": f"{app_url}/callback",
            "SMART_SESSION_STORE": str(store),
            "SMART_CLIENT_ID": "fhir-plugin",
            "SMART_LOG_LEVEL": "DEBUG",
        }
        log_path = tmp_path / "serve.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fhir_plugin._cli", "serve", "--port", str(port), "--workers", "2"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if requests.get(f"{app_url}/healthz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.3)
            launch = f"{ehr.base_url}/ehr/launch?patient={pid}&client_id=fhir-plugin"
            cookies = []
            crossed = 0  # launches whose requests were answered by both workers
            # The kernel gives each new connection to whichever worker accepts first, so on a quiet
            # machine one worker may take several launches in a row: launch until one has crossed.
            for attempt in range(40):
                if attempt >= 6 and crossed:
                    break
                before = len(log_path.read_text())
                browser = requests.Session()
                browser.headers["Connection"] = "close"  # a new connection per request: either worker may answer
                page = browser.get(launch)
                assert page.status_code == 200 and page.url.startswith(f"{app_url}/review?launch="), page.text[:300]
                assert f"Patient/{pid}" in page.text
                cookies.append(browser.cookies["fp_sid"])
                time.sleep(0.2)  # let the access-log lines reach the file
                crossed += len(_access_pids(log_path.read_text()[before:])) == 2
            with sqlite3.connect(store) as db:
                tokens = [v for (v,) in db.execute("SELECT value FROM smart_state WHERE key LIKE 'sid:%'")]
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    import json

    secrets = cookies + [json.loads(v)["token"][k] for v in tokens for k in ("access_token", "refresh_token")]
    output = log_path.read_text()
    assert output.count("Started server process") == 2, output[-2000:]
    assert "callback: signed in" in output and "GET /callback 303" in output
    assert "code=" not in output
    # at least one launch was started by one worker and finished by the other
    assert crossed and len(_access_pids(output)) == 2, output[-2000:]
    for secret in secrets:
        assert secret not in output
