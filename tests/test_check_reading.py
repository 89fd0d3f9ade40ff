"""SPEC §3, §3.1 and §4 rule by rule: each test has records the rule accepts and records it refuses."""

from __future__ import annotations

import json

import pytest
from _records import (
    LEFT_LOWER_LEG,
    LNC,
    PID,
    RIGHT_LOWER_LEG,
    SCT,
    TODAY,
    condition,
    element,
    encounter,
    flag,
    observation,
    patient,
    report,
    right_calf_atrophy,
)

from fhir_plugin import InputError, load_bundle_file, records_from_bundle

# --- §3.1 Any valid R4 input -----------------------------------------------------------------------


def _as_bundle(resources, form: str) -> dict:
    """The same resources, their references written ``Type/id``, absolute, or ``urn:uuid:``."""
    entries = []
    uuids = {
        f"{r['resourceType']}/{r['id']}": f"0000000{i}-aaaa-4bbb-8ccc-00000000000{i}"[-36:]
        for i, r in enumerate(resources)
    }

    def ref(value: str) -> str:
        if form == "absolute":
            return f"https://ehr.example.org/fhir/{value}/_history/3"
        if form == "urn":
            return f"urn:uuid:{uuids[value]}"
        return value

    for r in resources:
        text = json.dumps(r)
        for plain in uuids:
            text = text.replace(f'"reference": "{plain}"', f'"reference": "{ref(plain)}"')
        full = (
            f"urn:uuid:{uuids[r['resourceType'] + '/' + r['id']]}"
            if form == "urn"
            else f"https://ehr.example.org/fhir/{r['resourceType']}/{r['id']}"
        )
        entries.append({"fullUrl": full, "resource": json.loads(text)})
    return {"resourceType": "Bundle", "type": "transaction" if form == "urn" else "searchset", "entry": entries}


@pytest.mark.parametrize("form", ["relative", "absolute", "urn"])
def test_spec_3_1_references_relative_absolute_or_urn_uuid_read_alike(form):
    resources = right_calf_atrophy(
        observation(
            "o1",
            "Calf circumference",
            value={"valueQuantity": {"value": 33}},
            category="exam",
            encounter="e1",
            body=RIGHT_LOWER_LEG,
        )
    )
    want = report(resources)
    [record] = records_from_bundle(_as_bundle(resources, form))
    from fhir_plugin import check, load_profile

    got = check(record, load_profile("M62.561"), today=TODAY).to_json()
    assert got == want
    assert element(got, "follow-up") == "not-yet-due"  # the visit's reasonReference was resolved


def test_spec_3_1_an_unresolvable_urn_uuid_subject_is_refused_not_guessed():
    bundle = _as_bundle(right_calf_atrophy(), "urn")
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"]
    with pytest.raises(InputError, match="no subject Patient"):
        records_from_bundle(bundle)


@pytest.mark.parametrize("layout", ["bundle", "array", "ndjson"])
def test_spec_3_1_bundle_json_array_and_ndjson_files(tmp_path, layout):
    resources = right_calf_atrophy()
    path = tmp_path / "record.txt"
    if layout == "bundle":
        path.write_text(
            json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]})
        )
    elif layout == "array":
        path.write_text(json.dumps(resources))
    else:
        path.write_text("\n".join(json.dumps(r) for r in resources) + "\n")
    [record] = load_bundle_file(path)
    assert record.patient_id == PID and len(record.resources) == len(resources)


def test_spec_3_1_broken_ndjson_is_still_an_input_error(tmp_path):
    path = tmp_path / "bad.ndjson"
    path.write_text('{"resourceType": "Patient", "id": "p1"}\n[1, 2]\n')
    with pytest.raises(InputError, match="not valid JSON"):
        load_bundle_file(path)


def test_spec_3_1_several_patients_in_one_bundle_only_the_checked_one_counts():
    other = {
        "resourceType": "Condition",
        "id": "x1",
        "subject": {"reference": "Patient/p2"},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M62.84"}]},
    }
    assert element(report(right_calf_atrophy(other)), "excludes1") == "met"
    assert (
        element(report(right_calf_atrophy(dict(other, subject={"reference": f"Patient/{PID}"}))), "excludes1")
        == "conflict"
    )


# --- §3.1 What does not count, anywhere ----------------------------------------------------------------


@pytest.mark.parametrize(
    "status, counts",
    [
        ("final", True),
        ("amended", True),
        ("preliminary", True),
        ("entered-in-error", False),
        ("cancelled", False),
    ],
)
def test_spec_3_1_observation_status(status, counts):
    rep = report(right_calf_atrophy(observation("o1", "Reflexes", value={"valueString": "2+"}, status=status)))
    assert (element(rep, "neuro-exam") == "met") is counts


@pytest.mark.parametrize(
    "verification, counts",
    [
        ("confirmed", True),
        ("provisional", True),
        ("refuted", False),
        ("entered-in-error", False),
    ],
)
def test_spec_3_1_refuted_and_entered_in_error_conditions_document_nothing(verification, counts):
    cancer = condition("k1", "C50.911", verification=verification)
    rep = report(right_calf_atrophy(cancer))
    assert flag(rep, "cancer-history") == ("present" if counts else "not-documented")


def test_spec_3_1_refuted_other_side_does_not_make_a_conflict():
    left = condition("c2", "M62.562", verification="refuted", body=LEFT_LOWER_LEG, notes=("Left calf atrophy",))
    same_but_confirmed = dict(
        left,
        id="c3",
        code={"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M62.561"}]},
        verificationStatus={"coding": [{"code": "confirmed"}]},
    )
    assert element(report(right_calf_atrophy(left)), "laterality") == "met"
    assert element(report(right_calf_atrophy(same_but_confirmed)), "laterality") == "conflict"


@pytest.mark.parametrize(
    "status, counts",
    [
        ("finished", True),
        ("in-progress", True),
        ("arrived", True),
        ("triaged", True),
        ("onleave", True),
        ("planned", False),
        ("cancelled", False),
        ("entered-in-error", False),
    ],
)
def test_spec_3_1_visits_and_the_reference_encounter(status, counts):
    later = encounter("e2", "2026-11-24T10:00:00Z", status=status)
    rep = report(right_calf_atrophy(later))
    assert (rep["encounter"] == "Encounter/e2") is counts
    assert (element(rep, "follow-up") == "met") is counts


def test_spec_3_1_no_visit_at_all():
    rep = report(
        [patient(), condition("c1", body=RIGHT_LOWER_LEG), encounter("e9", "2026-12-20T09:00:00Z", status="planned")]
    )
    assert rep["encounter"] is None and rep["reference_date"] == TODAY.isoformat()
    assert element(rep, "follow-up") == "missing"
    rep = report(right_calf_atrophy())
    assert rep["encounter"] == "Encounter/e1" and rep["reference_date"] == "2026-11-20"


# --- §3.1 Active and history -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "clinical, active",
    [
        ("active", True),
        ("recurrence", True),
        ("relapse", True),
        (None, True),
        ("resolved", False),
        ("inactive", False),
        ("remission", False),
    ],
)
def test_spec_3_1_history_conditions_count_for_red_flags_never_for_site_side_finding(clinical, active):
    cancer = condition("k1", "C18.9", clinical=clinical)
    left = condition("c2", None, clinical=clinical, body=LEFT_LOWER_LEG, notes=("Left calf atrophy",))
    rep = report(right_calf_atrophy(cancer, left))
    assert flag(rep, "cancer-history") == "present"  # a resolved cancer is a history of cancer
    assert (element(rep, "laterality") == "conflict") is active  # a resolved left-leg Condition sets nothing
    sarcopenia = condition("k2", "M62.84", clinical=clinical)
    assert (element(report(right_calf_atrophy(sarcopenia)), "excludes1") == "conflict") is active


def test_spec_3_1_history_condition_is_no_finding():
    old = condition("c2", None, clinical="resolved", notes=("Calf atrophy, resolved",), body=RIGHT_LOWER_LEG)
    base = [patient(), condition("c1", body=RIGHT_LOWER_LEG), encounter("e1", "2026-11-20T09:00:00Z")]
    assert element(report(base + [old]), "atrophy-finding") == "missing"
    assert (
        element(report(base + [dict(old, clinicalStatus={"coding": [{"code": "active"}]})]), "atrophy-finding") == "met"
    )


# --- §3.1 Visits for the condition, follow-up on calendar days ---------------------------------------------


@pytest.mark.parametrize(
    "second, met",
    [
        (encounter("e2", "2026-11-22T09:00:00Z"), True),  # reasonReference
        (encounter("e2", "2026-11-22T09:00:00Z", reasons=(), reason_code="M62.561"), True),  # reasonCode
        (encounter("e2", "2026-11-22T09:00:00Z", reasons=()), False),  # not for the condition
        (encounter("e2", "2026-11-20T17:00:00Z"), False),  # the same calendar day
        (encounter("e2", "2026-11-20T23:30:00-05:00"), False),  # same day as written
    ],
)
def test_spec_3_1_follow_up_needs_visits_for_the_condition_on_two_days(second, met):
    rep = report(right_calf_atrophy(second))
    assert (element(rep, "follow-up") == "met") is met


def test_spec_3_1_a_visit_is_for_the_condition_when_an_element_observation_refers_to_it():
    visit = encounter("e2", "2026-11-22T09:00:00Z", reasons=())
    palpation = observation("o1", "Calf palpation", value={"valueString": "tender"}, encounter="e2")
    heart_rate = observation("o2", "Heart rate", value={"valueQuantity": {"value": 70}}, encounter="e2")
    assert element(report(right_calf_atrophy(visit, palpation)), "follow-up") == "met"
    assert element(report(right_calf_atrophy(visit, heart_rate)), "follow-up") == "not-yet-due"


@pytest.mark.parametrize(
    "status, met",
    [
        ("active", True),
        ("on-hold", True),
        ("draft", True),
        ("completed", False),
        ("revoked", False),
    ],
)
def test_spec_3_1_treatment_plans_that_count(status, met):
    plan = {
        "resourceType": "CarePlan",
        "id": "cp1",
        "status": status,
        "intent": "plan",
        "subject": {"reference": f"Patient/{PID}"},
        "addresses": [{"reference": "Condition/c1"}],
    }
    assert (element(report(right_calf_atrophy(plan)), "treatment-plan") == "met") is met


# --- §3 Conditions under review, separate diagnoses, the code's own words ------------------------------------


@pytest.mark.parametrize(
    "code, under_review",
    [
        ("M62.561", True),
        ("M62.569", True),
        ("M62.56", True),
        ("M62.5", True),  # the code and its listed family
        ("M62.562", False),
        ("M62.551", False),
        ("M62.830", False),  # other specific codes: separate
    ],
)
def test_spec_3_conditions_under_review(code, under_review):
    # site is read only from a Condition under review
    rep = report([patient(), condition("c1", code, body=RIGHT_LOWER_LEG), encounter("e1", "2026-11-20")])
    assert (element(rep, "body-site") == "met") is under_review


def test_spec_3_uncoded_condition_with_the_site_is_under_review():
    uncoded = condition("c1", None, body=RIGHT_LOWER_LEG, text="Calf muscle wasting")
    other_site = condition("c1", None, body={"text": "left forearm"}, text="Forearm muscle wasting")
    assert element(report([patient(), uncoded, encounter("e1", "2026-11-20")]), "body-site") == "met"
    assert element(report([patient(), other_site, encounter("e1", "2026-11-20")]), "body-site") == "missing"


def test_spec_3_a_separate_diagnosis_beside_the_code_does_not_contradict_it():
    back_spasm = condition(
        "c2", "M62.830", body={"coding": [{"system": SCT, "code": "77568009"}]}, notes=("Lumbar paraspinal spasm",)
    )
    rep = report(right_calf_atrophy(back_spasm))
    assert element(rep, "body-site") == "met" and rep["code_fit"]["status"] == "fits"
    # the same back-spasm words on the Condition under review do contradict it
    on_review = right_calf_atrophy()
    on_review[1]["note"].append({"text": "Lumbar paraspinal spasm"})
    assert element(report(on_review), "body-site") == "conflict"


@pytest.mark.parametrize(
    "bilateral_text, with_m62562, laterality, fit",
    [
        ("Atrophy of both calves, bilateral", True, "met", "fits"),
        ("Atrophy of both calves, bilateral", False, "conflict", "mismatch"),
        ("Atrophy of the right calf", True, "met", "fits"),
    ],
)
def test_spec_3_and_5_both_sides_coded(bilateral_text, with_m62562, laterality, fit):
    resources = [
        patient(),
        condition("c1", body=RIGHT_LOWER_LEG, notes=(bilateral_text,)),
        encounter("e1", "2026-11-20"),
    ]
    if with_m62562:
        resources.append(condition("c2", "M62.562", body=LEFT_LOWER_LEG))
    rep = report(resources)
    assert element(rep, "laterality") == laterality and rep["code_fit"]["status"] == fit


@pytest.mark.parametrize(
    "text, extra, finding",
    [
        (None, ({"system": SCT, "code": "88092000", "display": "Muscle atrophy"},), "missing"),  # a translation
        ("Muscle wasting and atrophy, not elsewhere classified, right lower leg", (), "missing"),  # the title
        ("Atrophy of the right calf after casting", (), "met"),  # the clinician's words
    ],
)
def test_spec_3_the_code_is_never_its_own_evidence(text, extra, finding):
    rep = report(
        [
            patient(),
            condition("c1", body=RIGHT_LOWER_LEG, text=text, extra_codings=extra),
            encounter("e1", "2026-11-20"),
        ]
    )
    assert element(rep, "atrophy-finding") == finding


# --- §3 Site and side from Observations -------------------------------------------------------------------------


def test_spec_3_observation_body_site_only_when_it_documents_an_element():
    base = [patient(), condition("c1", notes=("Atrophy of the right calf",)), encounter("e1", "2026-11-20")]
    blood_pressure = observation(
        "bp",
        code={"coding": [{"system": LNC, "code": "85354-9"}], "text": "Blood pressure"},
        value={"valueString": "120/80"},
        body={"text": "Left arm"},
        encounter="e1",
    )
    left_strength = observation(
        "mmt",
        "Calf strength (manual muscle test)",
        value={"valueString": "4/5"},
        body=LEFT_LOWER_LEG,
        encounter="e1",
        category="exam",
    )
    assert element(report(base + [blood_pressure]), "laterality") == "met"
    assert element(report(base + [blood_pressure]), "body-site") == "met"
    uncoded_side = [patient(), condition("c1", notes=("Calf atrophy",)), encounter("e1", "2026-11-20")]
    assert element(report(uncoded_side + [blood_pressure]), "laterality") == "missing"
    assert element(report(uncoded_side + [left_strength]), "laterality") == "conflict"


def test_spec_3_observations_set_the_side_only_when_no_condition_does():
    left_circ = observation(
        "circ",
        "Calf circumference",
        value={"valueQuantity": {"value": 36}},
        body=LEFT_LOWER_LEG,
        encounter="e1",
        category="exam",
    )
    assert element(report(right_calf_atrophy(left_circ)), "laterality") == "met"


@pytest.mark.parametrize(
    "sides, laterality",
    [
        (("right", "left"), "missing"),  # the same measure on both sides in one visit: a comparison
        (("left",), "conflict"),
        (("right",), "met"),
    ],
)
def test_spec_3_bilateral_comparison_measure_documents_no_side(sides, laterality):
    base = [patient(), condition("c1", notes=("Calf atrophy",)), encounter("e1", "2026-11-20")]
    body = {"right": RIGHT_LOWER_LEG, "left": LEFT_LOWER_LEG}
    measures = [
        observation(
            f"circ-{s}",
            code={"coding": [{"system": LNC, "code": "xx-circ"}], "text": "Calf circumference"},
            value={"valueQuantity": {"value": 34}},
            body=body[s],
            encounter="e1",
            category="exam",
        )
        for s in sides
    ]
    assert element(report(base + measures), "laterality") == laterality


# --- §3.2 Answers as values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, status",
    [
        ({"valueString": "absent"}, "absent"),
        ({"valueString": "Negative"}, "absent"),
        ({"valueString": "none"}, "absent"),
        ({"valueCodeableConcept": {"text": "Not present"}}, "absent"),
        ({"valueBoolean": False}, "absent"),
        ({"valueCodeableConcept": {"coding": [{"system": SCT, "code": "373067005", "display": "No"}]}}, "absent"),
        ({"valueString": "yes"}, "present"),
        ({"valueCodeableConcept": {"text": "Positive"}}, "present"),
        ({"valueBoolean": True}, "present"),
        ({"valueCodeableConcept": {"coding": [{"system": SCT, "code": "373066001", "display": "Yes"}]}}, "present"),
    ],
)
def test_spec_3_2_answers_as_values(value, status):
    assert flag(report(right_calf_atrophy(observation("q1", "Fever", value=value))), "fever") == status


def test_spec_3_2_a_negative_answer_on_the_finding_documents_no_finding():
    base = [patient(), condition("c1", body=RIGHT_LOWER_LEG), encounter("e1", "2026-11-20")]
    assert (
        element(report(base + [observation("q1", "Calf atrophy", value={"valueString": "absent"})]), "atrophy-finding")
        == "missing"
    )
    assert (
        element(report(base + [observation("q1", "Calf atrophy", value={"valueString": "present"})]), "atrophy-finding")
        == "met"
    )


@pytest.mark.parametrize(
    "value, finding",
    [
        ({"valueCodeableConcept": {"coding": [{"system": SCT, "code": "373067005"}]}}, "missing"),
        ({"valueBoolean": False}, "missing"),
        ({"valueBoolean": True}, "met"),
        ({"valueQuantity": {"value": 2}}, "met"),  # no answer: the code documents it
    ],
)
def test_spec_3_2_answers_decide_for_an_observation_coded_with_the_finding(value, finding):
    base = [patient(), condition("c1", body=RIGHT_LOWER_LEG), encounter("e1", "2026-11-20")]
    atrophy = observation("q1", code={"coding": [{"system": SCT, "code": "88092000"}]}, value=value)
    assert element(report(base + [atrophy]), "atrophy-finding") == finding


@pytest.mark.parametrize(
    "later, reference",
    [
        ("2026-11-21T01:00:00+09:00", "Encounter/e1"),  # 2026-11-20T16:00Z: before e1's 18:00Z
        ("2026-11-20T15:00:00-05:00", "Encounter/e2"),  # 20:00Z: after
    ],
)
def test_spec_3_1_latest_visit_by_period_start_across_time_zones(later, reference):
    resources = [
        patient(),
        condition("c1", body=RIGHT_LOWER_LEG),
        encounter("e1", "2026-11-20T18:00:00Z"),
        encounter("e2", later),
    ]
    assert report(resources)["encounter"] == reference


@pytest.mark.parametrize(
    "text, element_id, status",
    [
        ("No tenderness on palpation", "palpation", "met"),  # negated: still examined
        ("Reflexes absent at the ankle", "neuro-exam", "met"),
        ("Posture not assessed... no postural deviation", "posture-inspection", "met"),
        ("Denies difficulty walking", "functional-limitation", "missing"),  # negated: documents nothing
        ("No visible atrophy", "atrophy-finding", "missing"),
        ("Not aggravated by walking", "exacerbating-factors", "missing"),
        ("Aggravated by walking", "exacerbating-factors", "met"),
    ],
)
def test_spec_3_a_negated_match_counts_only_for_what_was_examined(text, element_id, status):
    base = [patient(), condition("c1", body=RIGHT_LOWER_LEG), encounter("e1", "2026-11-20")]
    rep = report(base + [observation("o1", "Progress note", value={"valueString": text})])
    assert element(rep, element_id) == status


# --- §3 table and §3.2: palpation also matches "nontender" ------------------------------------------------------


@pytest.mark.parametrize("text, met", [("Calf nontender", True), ("Calf non-tender", True), ("Calf soft", False)])
def test_spec_3_2_palpation_nontender(text, met):
    rep = report(right_calf_atrophy(observation("o1", "Calf exam", value={"valueString": text})))
    assert (element(rep, "palpation") == "met") is met


# --- §4 Red flags --------------------------------------------------------------------------------------------


def _note(oid: str, text: str, when: str | None = "2026-11-20") -> dict:
    return observation(oid, "Progress note", value={"valueString": text}, when=when)


@pytest.mark.parametrize(
    "texts, status",
    [
        (("Had fever to 38.9 last week", "Denies fever today"), "present"),  # present wins
        (("Denies fever today",), "absent"),
        (("Return for fever or chills",), "not-documented"),  # hypothetical: nothing
    ],
)
def test_spec_4_present_wins(texts, status):
    notes = [_note(f"n{i}", t) for i, t in enumerate(texts)]
    assert flag(report(right_calf_atrophy(*notes)), "fever") == status


@pytest.mark.parametrize(
    "note, code, status",
    [
        ("Family history: colon cancer", None, "not-documented"),
        ("Father treated for prostate cancer", None, "not-documented"),
        ("Treated for colon cancer in 2015", None, "present"),
        (None, "Z80.0", "not-documented"),  # family history of cancer
        (None, "Z85.038", "present"),  # personal history of cancer
    ],
)
def test_spec_4_relatives_and_family_history_codes_document_nothing(note, code, status):
    extra = _note("n1", note) if note else condition("k1", code)
    assert flag(report(right_calf_atrophy(extra)), "cancer-history") == status


@pytest.mark.parametrize(
    "when, status",
    [
        ("2026-10-01", "present"),  # 50 days before the reference date
        ("2026-06-01", "not-documented"),  # 172 days: outside the 90-day window
        (None, "present"),  # undated text counts
    ],
)
def test_spec_4_date_window_applies_to_text(when, status):
    rep = report(right_calf_atrophy(_note("n1", "Tibial fracture after a fall", when=when)))
    assert flag(rep, "significant-trauma") == status


@pytest.mark.parametrize("when, status", [("2026-10-01", "absent"), ("2026-01-10", "not-documented")])
def test_spec_4_date_window_applies_to_absent_alike(when, status):
    rep = report(right_calf_atrophy(_note("n1", "No trauma or fracture", when=when)))
    assert flag(rep, "significant-trauma") == status


def test_spec_4_a_truncated_field_is_named_in_the_flag_detail(monkeypatch):
    from fhir_plugin import _check, _text

    monkeypatch.setattr(_text, "MAX_FIELD_CHARS", 40)
    monkeypatch.setattr(_check, "MAX_FIELD_CHARS", 40)
    long_note = _note("long", "Calf exam unremarkable, denies chills. " + "x " * 40 + "Reports fever.")
    rep = report(right_calf_atrophy(long_note))
    fever = next(f for f in rep["red_flags"] if f["id"] == "fever")
    assert fever["status"] == "not-documented" and "Observation/long" in fever["detail"]
    screen = next(e for e in rep["elements"] if e["id"] == "red-flag-screen")
    assert "Observation/long" in screen["detail"]
