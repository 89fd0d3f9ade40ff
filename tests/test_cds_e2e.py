"""End to end in headless Chromium: the sandbox EHR opens a patient, calls the CDS service (signed JWT,
prefetch), shows the cards; a card's SMART link launches the app for that patient and encounter; accepting
the card's suggestion creates the provisional Condition once on HAPI, and a second accept creates nothing.

Servers: HAPI from the ``fhir_base_url`` fixture; the sandbox EHR (as CDS client) and the app in this
process.  Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
import requests
from test_smart_e2e import ARTIFACTS, DRAFT_TAG, browser  # noqa: F401  (the shared Chromium fixture)

from fhir_plugin import CardContext, FhirClient, cards_for_review, load_profile, review
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import load_fresh_case, needing_drafts, sandbox_stack

REPO = Path(__file__).resolve().parent.parent


def _count(base: str, rtype: str, patient: str) -> int:
    bundle = requests.get(
        f"{base}/{rtype}",
        params={"patient": patient, "_tag": DRAFT_TAG, "_summary": "count"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    return int(bundle.get("total", 0))


@pytest.mark.server
@pytest.mark.browser
def test_ehr_patient_page_shows_cards_launches_the_app_and_applies_the_suggestion_once(fhir_base_url, browser):  # noqa: F811
    ARTIFACTS.mkdir(exist_ok=True)
    today = dt.date.today()
    # a record that still needs its drafts (SPEC §7.1: no clinician plan, the chart coded M62.56)
    chart = next(c for c in generate_cases(today) if c.key == "missing-onset")
    case = load_fresh_case(fhir_base_url, dataclasses.replace(chart, resources=needing_drafts(chart.resources)))
    pid = case.patient_id
    encounter = max(
        (r for r in case.resources if r["resourceType"] == "Encounter"), key=lambda r: r["period"]["start"]
    )["id"]
    profile = load_profile("M62.561")
    with FhirClient(fhir_base_url) as hapi:
        record = hapi.read_patient_record(pid)
    result = review(record, profile, today=today, now=dt.datetime.now(dt.UTC), encounter_id=encounter)
    expected = cards_for_review(result, profile, CardContext("s", "h", "x", "y"), record.resources)
    assert expected and all("suggestions" in c for c in expected)

    with sandbox_stack(fhir_base_url, cds=True) as stack:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        patient_page = f"{stack.ehr.base_url}/ehr/patient/{pid}?encounter={encounter}"

        # 1. opening the patient calls the service; the cards are what the review of the record says
        page.goto(patient_page)
        page.wait_for_selector("section.card")
        page.screenshot(path=str(ARTIFACTS / "cds-patient-cards.png"), full_page=True)
        cards = page.locator("section.card")
        shown = [
            (cards.nth(i).get_attribute("data-indicator"), cards.nth(i).locator(".summary").inner_text())
            for i in range(cards.count())
        ]
        assert shown == [(c["indicator"], c["summary"]) for c in expected]

        # 2. the card's SMART link launches the app for this patient and encounter
        page.locator("section.card a.smart-link").first.click()
        page.wait_for_selector("#summary")
        assert page.url.startswith(f"{stack.app_url}/review?launch=")  # each launch its own session (issue 13)
        session = page.evaluate("fetch('/api/session' + location.search).then(r => r.json())")
        assert session["patient"] == f"Patient/{pid}" and session["encounter"] == f"Encounter/{encounter}"
        page.screenshot(path=str(ARTIFACTS / "cds-launched-app.png"))

        # 3. accepting the suggestion creates the provisional Condition (and the draft plan) through the proxy
        page.goto(patient_page)
        page.wait_for_selector("section.card button.accept")
        action = page.locator("section.card form[action$='/accept']").first.get_attribute("action")
        assert _count(fhir_base_url, "Condition", pid) == 0
        page.locator("section.card button.accept").first.click()
        page.wait_for_selector("p.applied")
        page.screenshot(path=str(ARTIFACTS / "cds-accepted.png"), full_page=True)
        assert "Condition created" in page.locator("p.applied").all_inner_texts()
        assert _count(fhir_base_url, "Condition", pid) == 1
        assert _count(fhir_base_url, "CarePlan", pid) == 1
        # the cards now offer nothing more to create: the drafts are in the record
        assert page.locator("section.card button.accept").count() == 0

        # 4. a second accept of the same card creates nothing new
        again = page.request.post(f"{stack.ehr.base_url}{action}", form={"encounter": encounter})
        assert again.status == 200
        assert "Condition already in the record: nothing new created" in again.text()
        assert _count(fhir_base_url, "Condition", pid) == 1
        assert _count(fhir_base_url, "CarePlan", pid) == 1
        context.close()
