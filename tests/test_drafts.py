"""Drafting is pure: same report, same Bundle; every entry a conditional create (SPEC §7)."""

from datetime import UTC, datetime

import pytest
from test_check_cases import CASES, TODAY

from fhir_plugin import DraftsRefused, build_drafts, check, load_profile, phases_of, records_from_bundle
from fhir_plugin._vocab import DRAFT_TAG

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
PROFILE = load_profile("M62.561")


def _report(key):
    case = next(c for c in CASES if c.key == key)
    [record] = records_from_bundle(case.resources)
    return check(record, PROFILE, today=TODAY, encounter_id=case.encounter_id)


def _by_type(bundle):
    out = {}
    for entry in bundle["entry"]:
        out.setdefault(entry["resource"]["resourceType"], []).append(entry)
    return out


def test_one_transaction_of_conditional_creates_with_urn_references():
    bundle = build_drafts(_report("missing-onset"), PROFILE, now=NOW)
    assert bundle["type"] == "transaction"
    kinds = _by_type(bundle)
    assert {k: len(v) for k, v in kinds.items()} == {"Condition": 1, "Goal": 4, "CarePlan": 1, "Provenance": 1}
    for entry in bundle["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")
        assert entry["request"]["method"] == "POST" and entry["request"]["ifNoneExist"]
        assert DRAFT_TAG["code"] in [t["code"] for t in entry["resource"]["meta"]["tag"]]
    condition_url = kinds["Condition"][0]["fullUrl"]
    plan = kinds["CarePlan"][0]["resource"]
    assert plan["addresses"] == [{"reference": condition_url}]
    assert (plan["status"], plan["intent"]) == ("draft", "proposal")
    assert plan["instantiatesCanonical"] == ["urn:fhir-plugin:PlanDefinition:M62.561|1.0.0"]
    assert {g["reference"] for g in plan["goal"]} == {e["fullUrl"] for e in kinds["Goal"]}
    assert set(kinds["Provenance"][0]["resource"]["target"][0].values()) == {condition_url}


def test_condition_is_provisional_coded_from_the_code_set_and_notes_the_gaps():
    condition = _by_type(build_drafts(_report("missing-onset"), PROFILE, now=NOW))["Condition"][0]["resource"]
    assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"
    assert condition["clinicalStatus"]["coding"][0]["code"] == "active"
    assert condition["category"][0]["coding"][0]["code"] == "encounter-diagnosis"
    icd = condition["code"]["coding"][0]
    assert icd["code"] == "M62.561" and icd["display"] == PROFILE.display
    assert {"system": "http://snomed.info/sct", "code": "88092000"}.items() <= condition["code"]["coding"][1].items()
    assert "onset" in condition["note"][0]["text"]
    assert condition["encounter"]["reference"].startswith("Encounter/")
    assert all(d["reference"].count("/") == 1 for d in condition["evidence"][0]["detail"])


def test_same_report_gives_the_same_identifiers_and_a_new_encounter_new_ones():
    first = build_drafts(_report("missing-onset"), PROFILE, now=NOW)
    again = build_drafts(_report("missing-onset"), PROFILE, now=datetime(2027, 1, 1, tzinfo=UTC))
    assert [e["request"]["ifNoneExist"] for e in first["entry"]] == [
        e["request"]["ifNoneExist"] for e in again["entry"]
    ]
    other = build_drafts(_report("complete"), PROFILE, now=NOW)
    assert not {e["request"]["ifNoneExist"] for e in first["entry"]} & {
        e["request"]["ifNoneExist"] for e in other["entry"]
    }


def test_the_four_phases_read_back_in_order():
    plan = _by_type(build_drafts(_report("missing-onset"), PROFILE, now=NOW))["CarePlan"][0]["resource"]
    phases = phases_of(plan)
    assert [(p.number, p.title) for p in phases] == [
        (1, "Acute management"),
        (2, "Recovery"),
        (3, "Strengthening"),
        (4, "Functional"),
    ]
    assert "Isometric calf contractions and ankle pumps" in phases[0].activities
    assert "Seated heel raises" in phases[1].activities
    assert all(len(p.goals) == 1 for p in phases)
    assert [p.start for p in phases] == sorted(p.start for p in phases)
    assert "needs clinician review" in plan["text"]["div"]


def test_a_present_red_flag_adds_a_referral_activity():
    report = _report("flag-fever")
    assert report.referral_recommended
    plan = _by_type(build_drafts(report, PROFILE, now=NOW))["CarePlan"][0]["resource"]
    referral = plan["activity"][0]["detail"]
    assert referral["kind"] == "ServiceRequest" and "fever" in referral["description"]
    assert len(phases_of(plan)) == 4


@pytest.mark.parametrize(
    "key, code", [("clinical-example", "M62.830"), ("left-lower-leg", "M62.562"), ("excludes1", "M62.84")]
)
def test_a_record_that_supports_another_code_gets_no_drafts(key, code):
    with pytest.raises(DraftsRefused, match=code):
        build_drafts(_report(key), PROFILE, now=NOW)


def test_a_profile_that_drafts_invalid_r4_is_refused_before_anything_is_sent():
    import copy

    from fhir_plugin import InputError

    broken = copy.deepcopy(PROFILE)
    broken.plan_definition["goal"][0]["target"] = [{"measure": "not a CodeableConcept"}]
    with pytest.raises(InputError, match=r"drafted Goal is not valid R4 at target\.0\.measure"):
        build_drafts(_report("missing-onset"), broken, now=NOW)


# ---------------------------------------------------------------- SPEC §7.1: what already exists, red flags


def _case(key):
    case = next(c for c in CASES if c.key == key)
    [record] = records_from_bundle(case.resources)
    return case, record


def _without(record, predicate):
    from fhir_plugin import PatientRecord

    return PatientRecord(record.patient_id, tuple(r for r in record.resources if not predicate(r)))


def test_an_existing_confirmed_condition_is_not_drafted_again_and_the_plan_addresses_it():
    from fhir_plugin import existing_in, review

    case, record = _case("missing-treatment-plan")  # a confirmed M62.561 Condition; its CarePlan entered in error
    existing = existing_in(record, PROFILE)
    condition = next(r for r in record.of_type("Condition") if r["code"]["coding"][0]["code"] == "M62.561")
    assert existing.condition == f"Condition/{condition['id']}" and existing.careplan is None
    result = review(record, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)
    kinds = _by_type(result.drafts)
    assert "Condition" not in kinds
    plan = kinds["CarePlan"][0]["resource"]
    assert plan["addresses"] == [{"reference": existing.condition}]
    assert all(g["resource"]["addresses"] == [{"reference": existing.condition}] for g in kinds["Goal"])
    assert existing.condition in plan["note"][0]["text"]  # the drafts say which Condition they build on
    assert {"reference": existing.condition} not in kinds["Provenance"][0]["resource"]["target"]


def test_a_refuted_or_resolved_condition_does_not_count_as_existing():
    from fhir_plugin import existing_in

    _, record = _case("missing-treatment-plan")
    for field, code in (("verificationStatus", "refuted"), ("clinicalStatus", "resolved")):
        changed = [
            dict(r, **{field: {"coding": [{"code": code}]}}) if r["resourceType"] == "Condition" else r
            for r in record.resources
        ]
        from fhir_plugin import PatientRecord

        assert existing_in(PatientRecord(record.patient_id, tuple(changed)), PROFILE).condition is None


def test_an_active_plan_means_no_plan_drafts_and_the_review_names_it():
    from fhir_plugin import existing_in, review

    case, record = _case("complete")  # a confirmed Condition and an active CarePlan addressing it
    existing = existing_in(record, PROFILE)
    assert existing.careplan and existing.careplan.startswith("CarePlan/") and existing.condition
    result = review(record, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)
    assert result.drafts is None and result.refused is None
    assert "an active plan exists" in result.settled and existing.careplan in result.settled
    # the plan without the chart's Condition: only the diagnosis is drafted, no CarePlan, Goal or Provenance
    only_plan = existing_in(record, PROFILE)
    bundle = build_drafts(
        _report("complete"), PROFILE, now=NOW, existing=type(only_plan)(condition=None, careplan=only_plan.careplan)
    )
    assert {k: len(v) for k, v in _by_type(bundle).items()} == {"Condition": 1}


def test_a_red_flag_puts_the_referral_first_and_holds_every_phase_activity():
    report = _report("flag-neuro")
    assert report.referral_recommended
    plan = _by_type(build_drafts(report, PROFILE, now=NOW))["CarePlan"][0]["resource"]
    first, *rest = plan["activity"]
    assert first["detail"]["kind"] == "ServiceRequest" and first["detail"]["status"] == "not-started"
    assert rest and all(a["detail"]["status"] == "on-hold" for a in rest)
    assert all("progressive-neuro-deficit" in a["detail"]["statusReason"]["text"] for a in rest)
    narrative = plan["text"]["div"]
    assert narrative.index("Referral recommended") < narrative.index("on hold") < narrative.index("Phase 1")


def test_without_a_red_flag_no_activity_is_held():
    plan = _by_type(build_drafts(_report("missing-onset"), PROFILE, now=NOW))["CarePlan"][0]["resource"]
    assert {a["detail"]["status"] for a in plan["activity"]} == {"not-started"}
    assert "on hold" not in plan["text"]["div"]


def test_after_a_write_nothing_new_is_offered():
    from fhir_plugin import PatientRecord, review

    case, record = _case("missing-treatment-plan")
    first = review(record, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)
    # the server after the write: the drafts with ids, as the server keeps them
    written = [dict(e["resource"], id=f"w{i}") for i, e in enumerate(first.drafts["entry"])]
    urls = {
        e["fullUrl"]: f"{r['resourceType']}/{r['id']}" for e, r in zip(first.drafts["entry"], written, strict=False)
    }
    import json

    text = json.dumps(written)
    for url, ref in urls.items():
        text = text.replace(url, ref)
    after = PatientRecord(record.patient_id, record.resources + tuple(json.loads(text)))
    again = review(after, PROFILE, today=TODAY, now=NOW, encounter_id=case.encounter_id)
    assert again.report.element("treatment-plan").status == "proposed"
    assert again.drafts is None and again.refused is None and again.written
    assert urls[next(u for u, r in urls.items() if r.startswith("CarePlan/"))] in again.settled
