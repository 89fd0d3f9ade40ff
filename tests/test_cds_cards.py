"""The CDS cards (fhir_plugin._cards) against the report of the same record, for every synthetic patient.

Written from the CDS Hooks 2.0 specification's Card attributes: ``summary`` under 140 characters,
``indicator`` one of info / warning / critical, ``source.label``, ``uuid`` for feedback,
``links`` of type ``smart`` with a string ``appContext``, ``suggestions`` with a ``uuid`` and
``create`` actions, and ``selectionBehavior`` present (``any``, Epic's only one) when there are suggestions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from fhir_plugin import (
    CardContext,
    PatientRecord,
    cards_for_review,
    cds_discovery,
    load_profile,
    order_sign_cards,
    orders_for_code,
    review,
)
from fhir_plugin._cards import PREFETCH, SUMMARY_LIMIT, gap_phrase
from fhir_plugin._vocab import URI_IDENTIFIER
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import needing_drafts

TODAY = dt.date(2026, 11, 26)
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
CASES = generate_cases(TODAY)
CTX = CardContext(
    service_id="patient-view-m62-561",
    hook_instance="hook-1",
    app_launch_url="https://app.test/launch",
    source_url="https://app.test/",
)


def _cards(case, code="M62.561"):
    profile = load_profile(code)
    result = review(PatientRecord(case.patient_id, tuple(case.resources)), profile, today=TODAY, now=NOW)
    return profile, result, cards_for_review(result, profile, CTX, case.resources)


def _needing_drafts(key):
    """A case whose record still needs every draft (SPEC §7.1: no clinician plan, the chart coded M62.56)."""
    case = next(c for c in CASES if c.key == key)
    return dataclasses.replace(case, resources=needing_drafts(case.resources))


def test_discovery_lists_patient_view_and_order_sign_per_profile_with_prefetch_templates():
    profiles = [load_profile("M62.561"), load_profile("M62.830")]
    services = cds_discovery(profiles)["services"]
    assert {(s["hook"], s["id"]) for s in services} == {
        ("patient-view", "patient-view-m62-561"),
        ("order-sign", "order-sign-m62-561"),
        ("patient-view", "patient-view-m62-830"),
        ("order-sign", "order-sign-m62-830"),
    }
    for service in services:
        assert service["title"] and service["description"]  # required by the Discovery response
        assert set(service["prefetch"].values()) == {
            "Patient/{{context.patientId}}",
            "Condition?patient={{context.patientId}}",
            "Observation?patient={{context.patientId}}",
            "Encounter?patient={{context.patientId}}",
            "CarePlan?patient={{context.patientId}}",
        }
    assert PREFETCH["conditions"] == "Condition?patient={{context.patientId}}"


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_every_synthetic_patients_cards_agree_with_its_report(case):
    profile, result, cards = _cards(case)
    report = result.report
    by_kind = {c["source"]["topic"]["code"]: c for c in cards}
    # a card per condition present, none otherwise
    assert ("red-flags" in by_kind) == report.referral_recommended
    assert ("code-mismatch" in by_kind) == (report.code_fit.status == "mismatch")
    open_gaps = [e for e in report.elements if e.required and e.status in ("missing", "conflict")]
    reminders = [e for e in report.elements if e.required and e.status in ("not-yet-due", "proposed")]
    assert ("documentation-gaps" in by_kind) == bool(open_gaps or reminders)
    if report.referral_recommended:
        card = by_kind["red-flags"]
        assert card["indicator"] == "critical"
        assert "Referral recommended" in card["summary"]
        for flag in report.red_flags:
            if flag.status == "present":
                assert flag.title.lower() in card["detail"]
    if report.code_fit.status == "mismatch":
        card = by_kind["code-mismatch"]
        assert card["indicator"] == "warning"
        for suggestion in report.code_fit.suggested:
            assert suggestion.code in card["summary"] and suggestion.display in card["detail"]
    if "documentation-gaps" in by_kind:
        card = by_kind["documentation-gaps"]
        assert card["indicator"] == ("warning" if open_gaps else "info")
        count = len(open_gaps) + len(reminders)
        assert card["summary"].startswith(f"{count} documentation gap")
        first = (
            ([e for e in open_gaps if e.status == "conflict"] + [e for e in open_gaps if e.status == "missing"])
            or reminders
        )[0]
        assert gap_phrase(first, profile) in card["summary"]
    for card in cards:
        assert len(card["summary"]) < SUMMARY_LIMIT
        assert card["indicator"] in ("info", "warning", "critical")
        assert card["uuid"] and card["source"]["label"]
        link = card["links"][0]
        assert link["type"] == "smart" and link["url"] == "https://app.test/launch"
        assert json.loads(link["appContext"])["encounter"] == report.encounter
        if result.drafts is None:
            assert "suggestions" not in card
        else:
            assert card["selectionBehavior"] == "any"
            (suggestion,) = card["suggestions"]
            assert suggestion["uuid"] and suggestion["label"]
            types = [a["resource"]["resourceType"] for a in suggestion["actions"]]
            # what the drafts hold (SPEC §7.1: an existing diagnosis is not drafted again)
            assert types == [
                e["resource"]["resourceType"]
                for e in result.drafts["entry"]
                if e["resource"]["resourceType"] in ("Condition", "CarePlan")
            ]
            assert all(a["type"] == "create" for a in suggestion["actions"])
    assert len({c["uuid"] for c in cards}) == len(cards)


def test_a_complete_record_without_red_flags_gets_no_card():
    case = next(c for c in CASES if c.key == "complete")
    assert _cards(case)[2] == []


def test_the_suggestion_creates_the_provisional_condition_with_the_plugins_identifier():
    case = _needing_drafts("missing-onset")
    _profile, result, cards = _cards(case)
    (card,) = cards
    condition, careplan = (a["resource"] for a in card["suggestions"][0]["actions"])
    assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"
    assert condition["subject"] == {"reference": f"Patient/{case.patient_id}"}
    ident = condition["identifier"][0]
    assert ident["system"] == URI_IDENTIFIER
    drafted = next(e["resource"] for e in result.drafts["entry"] if e["resource"]["resourceType"] == "Condition")
    assert drafted["identifier"] == condition["identifier"]
    # the plan addresses the Condition by that identifier: the transaction's urn:uuid links do not survive
    assert careplan["addresses"] == [{"identifier": ident}]
    assert "goal" not in careplan and all("goal" not in a["detail"] for a in careplan["activity"])


def test_a_draft_already_in_the_record_is_not_suggested_again():
    case = _needing_drafts("missing-onset")
    profile, result, _cards_ = _cards(case)
    held = [
        dict(e["resource"], id=f"held-{i}")
        for i, e in enumerate(result.drafts["entry"])
        if e["resource"]["resourceType"] in ("Condition", "CarePlan")
    ]
    cards = cards_for_review(result, profile, CTX, [*case.resources, *held])
    assert all("suggestions" not in c for c in cards)


def test_order_sign_card_only_for_an_order_whose_reason_is_the_code_and_documentation_missing():
    case = _needing_drafts("missing-onset")
    profile, result, _ = _cards(case)
    order = {
        "resourceType": "ServiceRequest",
        "id": "pt-referral",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{case.patient_id}"},
        "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M62561"}]}],
    }
    other = dict(order, reasonCode=[{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.50"}]}])
    bundle = {"resourceType": "Bundle", "entry": [{"resource": order}]}
    assert orders_for_code(bundle, profile) == ["ServiceRequest/pt-referral"]
    assert orders_for_code({"resourceType": "Bundle", "entry": [{"resource": other}]}, profile) == []
    (card,) = order_sign_cards(result, profile, CTX, ["ServiceRequest/pt-referral"], case.resources)
    assert card["indicator"] == "warning" and "ServiceRequest/pt-referral" in card["detail"]
    assert gap_phrase(result.report.element("onset"), profile) in card["summary"]
    assert len(card["summary"]) < SUMMARY_LIMIT
    complete = next(c for c in CASES if c.key == "complete")
    _p, done, _c = _cards(complete)
    assert order_sign_cards(done, profile, CTX, ["ServiceRequest/pt-referral"]) == []


def test_gap_words_come_from_the_profiles_action_when_it_has_one():
    case = next(c for c in CASES if c.key == "missing-onset")
    profile, result, _ = _cards(case)
    onset = result.report.element("onset")
    without = dataclasses.replace(
        profile, elements=tuple({k: v for k, v in e.items() if k != "action"} for e in profile.elements)
    )
    assert gap_phrase(onset, without) == "document onset"  # no action in the profile: words from the title
    elements = tuple(
        dict(e, action="record when the symptoms began") if e["id"] == "onset" else e for e in profile.elements
    )
    with_action = dataclasses.replace(profile, elements=elements)
    assert gap_phrase(onset, with_action) == "record when the symptoms began"
