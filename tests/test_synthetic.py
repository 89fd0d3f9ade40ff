"""The synthetic patients: deterministic, valid R4, and an oracle that covers all of SPEC.md."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
import responses
import simple_icd_10_cm as cm

from fhir_plugin._errors import ServerError, TransportError
from fhir_plugin._record import load_bundle_file, records_from_bundle, subject_patient_id, validate_resource
from fhir_plugin._vocab import is_plugin_draft
from fhir_plugin.synthetic import (
    SyntheticCase,
    cases_bundle,
    generate_cases,
    large_record,
    load_into_server,
    many_patients,
    save_cases,
)

# SPEC.md §3 table, in its order (read by hand from the spec, not from the library: no drift)
ELEMENT_IDS = (
    "onset",
    "duration",
    "severity",
    "exacerbating-factors",
    "prior-treatment-response",
    "injury-history",
    "lifestyle-occupation",
    "physical-exam",
    "range-of-motion",
    "palpation",
    "neuro-exam",
    "posture-inspection",
    "body-site",
    "laterality",
    "atrophy-finding",
    "objective-measure",
    "etiology",
    "excludes1",
    "functional-limitation",
    "red-flag-screen",
    "treatment-plan",
    "follow-up",
    "treatment-response",
    "medical-necessity",
)
OPTIONAL_ELEMENTS = frozenset(
    {"injury-history", "lifestyle-occupation", "posture-inspection", "etiology", "treatment-response"}
)
REQUIRED_ELEMENTS = tuple(e for e in ELEMENT_IDS if e not in OPTIONAL_ELEMENTS)
# SPEC.md §4 table
FLAG_IDS = (
    "progressive-neuro-deficit",
    "bowel-bladder-dysfunction",
    "cancer-history",
    "significant-trauma",
    "weight-loss",
    "fever",
    "persistent-beyond-expected",
)
ELEMENT_STATUSES = {"met", "missing", "conflict", "not-yet-due", "proposed"}
FLAG_STATUSES = {"present", "absent", "not-documented"}
CODE_FIT = {"fits", "mismatch", "insufficient"}

AS_OF = dt.date(2026, 11, 26)
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


@pytest.fixture(scope="module")
def cases() -> list[SyntheticCase]:
    return generate_cases(AS_OF)


@pytest.fixture(scope="module")
def by_key(cases) -> dict[str, SyntheticCase]:
    return {c.key: c for c in cases}


def _walk(value):
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def _dates(resource) -> list[dt.date]:
    found = []
    for node in _walk(resource):
        for key, v in node.items():
            if key in ("onsetDateTime", "recordedDate", "effectiveDateTime", "start", "end", "created", "birthDate"):
                found.append(dt.date.fromisoformat(v[:10]))
    return found


# --- determinism and validity -----------------------------------------------------------------


def test_same_as_of_gives_identical_cases():
    first, second = generate_cases(AS_OF), generate_cases(AS_OF)
    assert first == second
    assert json.dumps([c.__dict__ for c in first]) == json.dumps([c.__dict__ for c in second])


def test_saved_files_are_byte_identical(tmp_path):
    save_cases(generate_cases(AS_OF), tmp_path / "a")
    save_cases(generate_cases(AS_OF), tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_dates_are_relative_to_as_of():
    shifted = generate_cases(AS_OF + dt.timedelta(days=100))
    for old, new in zip(generate_cases(AS_OF), shifted, strict=True):
        assert old.expected == new.expected
        for a, b in zip(old.resources, new.resources, strict=True):
            for da, db in zip(_dates(a), _dates(b), strict=False):
                if a["resourceType"] != "Patient":
                    assert (db - da).days == 100, (a["id"], da, db)


@pytest.mark.parametrize("as_of", [AS_OF, dt.date(2028, 2, 29), dt.date(2027, 1, 1)])
def test_every_resource_validates_and_nothing_is_in_the_future(as_of):
    for case in generate_cases(as_of):
        for res in case.resources:
            validate_resource(res)
            assert all(d <= as_of for d in _dates(res)), res["id"]


def test_ids_are_stable_unique_prefixed_and_references_resolve(cases):
    seen: set[tuple[str, str]] = set()
    for case in cases:
        assert case.patient_id == f"fp-{case.key}"
        local = {(r["resourceType"], r["id"]) for r in case.resources}
        assert ("Patient", case.patient_id) in local
        assert sum(1 for r in case.resources if r["resourceType"] == "Patient") == 1
        for res in case.resources:
            assert FHIR_ID.match(res["id"]) and res["id"].startswith(case.patient_id), res["id"]
            assert (res["resourceType"], res["id"]) not in seen
            seen.add((res["resourceType"], res["id"]))
            assert subject_patient_id(res) == case.patient_id
            for node in _walk(res):
                if "reference" in node:
                    rtype, _, rid = node["reference"].partition("/")
                    assert (rtype, rid) in local, node["reference"]
        if case.encounter_id is not None:
            assert ("Encounter", case.encounter_id) in local


def test_icd10cm_displays_come_from_the_data(cases):
    for case in cases:
        for res in case.resources:
            for node in _walk(res):
                if node.get("system") == ICD10CM and "code" in node:
                    assert cm.is_leaf(node["code"]), node["code"]
                    assert node["display"] == cm.get_description(node["code"])


def test_patients_are_synthetic_people(cases):
    for case in cases:
        patient = next(r for r in case.resources if r["resourceType"] == "Patient")
        assert patient["name"][0]["family"] and patient["name"][0]["given"]
        assert patient["gender"] in ("female", "male")
    example = next(c for c in cases if c.key == "clinical-example")
    patient = next(r for r in example.resources if r["resourceType"] == "Patient")
    born = dt.date.fromisoformat(patient["birthDate"])
    age = AS_OF.year - born.year - ((AS_OF.month, AS_OF.day) < (born.month, born.day))
    assert (patient["gender"], age) == ("female", 45)


# --- the oracle covers SPEC -------------------------------------------------------------------


def test_every_case_states_every_element_and_flag(cases):
    for case in cases:
        exp = case.expected
        assert set(exp) == {"elements", "red_flags", "code_fit", "suggested", "complete", "referral_recommended"}
        assert tuple(exp["elements"]) == ELEMENT_IDS, case.key
        assert tuple(exp["red_flags"]) == FLAG_IDS, case.key
        assert set(exp["elements"].values()) <= ELEMENT_STATUSES, case.key
        assert set(exp["red_flags"].values()) <= FLAG_STATUSES, case.key
        assert exp["code_fit"] in CODE_FIT


def test_every_status_in_spec_appears_somewhere(cases):
    assert {s for c in cases for s in c.expected["elements"].values()} == ELEMENT_STATUSES
    assert {s for c in cases for s in c.expected["red_flags"].values()} == FLAG_STATUSES
    assert {c.expected["code_fit"] for c in cases} == CODE_FIT
    for flag in FLAG_IDS:
        statuses = {c.expected["red_flags"][flag] for c in cases}
        assert statuses == FLAG_STATUSES, flag
    for element in REQUIRED_ELEMENTS:
        statuses = {c.expected["elements"][element] for c in cases}
        assert "met" in statuses and ({"missing", "conflict"} & statuses), element


def test_expected_outcomes_are_consistent_with_spec_rules(cases):
    for case in cases:
        exp = case.expected
        els = exp["elements"]
        # SPEC §6: complete = every required element met (or not-yet-due) and code fit fits
        assert exp["complete"] == (
            all(els[e] in ("met", "not-yet-due") for e in REQUIRED_ELEMENTS) and exp["code_fit"] == "fits"
        ), case.key
        # SPEC §4: any present flag recommends referral
        assert exp["referral_recommended"] == ("present" in exp["red_flags"].values()), case.key
        # SPEC §3: red-flag-screen met iff every flag is documented
        assert (els["red-flag-screen"] == "met") == ("not-documented" not in exp["red_flags"].values()), case.key
        # SPEC §3: medical necessity is derived
        parts = ("physical-exam", "objective-measure", "functional-limitation", "severity")
        assert (els["medical-necessity"] == "met") == all(els[p] == "met" for p in parts), case.key
        # statuses only where SPEC allows them
        assert els["follow-up"] in ("met", "missing", "not-yet-due")
        assert els["treatment-plan"] in ("met", "missing", "proposed")
        assert els["excludes1"] in ("met", "conflict")
        # suggestions: leaf codes, sorted, only when the code does not fit
        assert exp["suggested"] == sorted(exp["suggested"])
        assert bool(exp["suggested"]) == (exp["code_fit"] == "mismatch"), case.key
        assert all(cm.is_leaf(code) for code in exp["suggested"])


def test_one_case_per_required_element_taken_away(by_key):
    complete = by_key["complete"].expected
    assert complete["complete"] is True and complete["code_fit"] == "fits"
    assert set(complete["elements"].values()) == {"met"}
    assert set(complete["red_flags"].values()) == {"absent"}
    for element in REQUIRED_ELEMENTS:
        if element in ("excludes1", "medical-necessity"):
            continue  # excludes1 is met or conflict; medical-necessity is derived
        case = by_key[f"missing-{element}"]
        assert case.expected["elements"][element] == "missing", element
        assert case.expected["complete"] is False
    assert by_key["excludes1"].expected["elements"]["excludes1"] == "conflict"
    assert by_key["missing-severity"].expected["elements"]["medical-necessity"] == "missing"


@pytest.mark.parametrize(
    "key, code_fit, suggested",
    [
        ("complete", "fits", []),
        ("left-lower-leg", "mismatch", ["M62.562"]),
        ("bilateral", "mismatch", ["M62.561", "M62.562"]),
        ("missing-laterality", "mismatch", ["M62.569"]),
        ("thigh-right", "mismatch", ["M62.551"]),
        ("thigh-left", "mismatch", ["M62.552"]),
        ("clinical-example", "mismatch", ["M62.830"]),
        ("spasm-calf", "mismatch", ["M62.838"]),
        ("excludes1", "mismatch", ["M62.84"]),
        ("insufficient", "insufficient", []),
        ("missing-body-site", "insufficient", []),
        ("missing-atrophy-finding", "insufficient", []),
    ],
)
def test_code_fit_cases(by_key, key, code_fit, suggested):
    assert (by_key[key].expected["code_fit"], by_key[key].expected["suggested"]) == (code_fit, suggested)


@pytest.mark.parametrize(
    "key, flag",
    [
        ("flag-neuro", "progressive-neuro-deficit"),
        ("flag-bowel-bladder", "bowel-bladder-dysfunction"),
        ("flag-cancer", "cancer-history"),
        ("flag-trauma", "significant-trauma"),
        ("flag-weight-loss", "weight-loss"),
        ("flag-fever", "fever"),
        ("flag-persistent", "persistent-beyond-expected"),
    ],
)
def test_each_red_flag_present_in_its_case(by_key, key, flag):
    exp = by_key[key].expected
    assert exp["red_flags"][flag] == "present" and exp["referral_recommended"] is True
    assert [f for f, s in exp["red_flags"].items() if s == "present"] == [flag]


def test_follow_up_and_plan_statuses(by_key):
    assert by_key["complete"].expected["elements"]["follow-up"] == "met"
    assert by_key["follow-up-not-yet-due"].expected["elements"]["follow-up"] == "not-yet-due"
    assert by_key["follow-up-not-yet-due"].expected["complete"] is True
    assert by_key["missing-follow-up"].expected["elements"]["follow-up"] == "missing"
    assert by_key["plan-proposed"].expected["elements"]["treatment-plan"] == "proposed"
    draft = next(r for r in by_key["plan-proposed"].resources if r["resourceType"] == "CarePlan")
    assert (draft["status"], draft["intent"]) == ("draft", "proposal") and is_plugin_draft(draft)
    assert not any(is_plugin_draft(r) for c in by_key.values() if c.key != "plan-proposed" for r in c.resources)
    retired = next(r for r in by_key["missing-treatment-plan"].resources if r["resourceType"] == "CarePlan")
    assert retired["status"] == "entered-in-error"


def test_single_encounter_ages_match_the_follow_up_rule(by_key):
    for key, younger_than_42 in (("follow-up-not-yet-due", True), ("missing-follow-up", False)):
        encounters = [r for r in by_key[key].resources if r["resourceType"] == "Encounter"]
        assert len(encounters) == 1
        age = (AS_OF - dt.date.fromisoformat(encounters[0]["period"]["start"][:10])).days
        assert (age < 42) == younger_than_42


def test_reference_encounter_changes_the_persistence_flag(by_key):
    case = by_key["earlier-encounter"]
    assert case.encounter_id == "fp-earlier-encounter-enc1"
    assert case.expected["red_flags"]["persistent-beyond-expected"] == "absent"
    cond = next(r for r in case.resources if r["resourceType"] == "Condition")
    onset = dt.date.fromisoformat(cond["onsetDateTime"])
    starts = {
        r["id"]: dt.date.fromisoformat(r["period"]["start"][:10])
        for r in case.resources
        if r["resourceType"] == "Encounter"
    }
    assert (starts[case.encounter_id] - onset).days <= 42 < (max(starts.values()) - onset).days


def test_negation_and_word_start_probes_are_in_the_data(by_key):
    text = json.dumps(by_key["complete"].resources)
    for probe in (
        "No numbness",
        "Denies weight loss",
        "Negative for trauma",
        "feedback",
        "upright",
        "Left calf, measured for comparison",
        '"valueBoolean": false',
        "373067005",
    ):
        assert probe in text, probe
    temps = [
        r["valueQuantity"]["value"]
        for r in by_key["complete"].resources
        if r["resourceType"] == "Observation" and r["code"].get("coding", [{}])[0].get("code") == "8310-5"
    ]
    assert temps and max(temps) < 38.0
    assert "Notes numbness" in json.dumps(by_key["flag-neuro"].resources)


# --- output -----------------------------------------------------------------------------------


def test_saved_bundles_read_back_as_one_record_each(tmp_path, cases):
    paths = save_cases(cases, tmp_path)
    assert {p.name for p in paths} == {f"{c.key}.json" for c in cases} | {"expected.json"}
    for case in cases:
        records = load_bundle_file(tmp_path / f"{case.key}.json")
        assert len(records) == 1
        assert records[0].patient_id == case.patient_id
        counts: dict[str, int] = {}
        for res in case.resources:
            counts[res["resourceType"]] = counts.get(res["resourceType"], 0) + 1
        assert records[0].counts() == counts
    expected = json.loads((tmp_path / "expected.json").read_text(encoding="utf-8"))
    assert set(expected) == {c.key for c in cases}
    for case in cases:
        assert expected[case.key]["patient_id"] == case.patient_id
        assert expected[case.key]["encounter_id"] == case.encounter_id
        assert expected[case.key]["expected"] == case.expected


def test_transaction_bundle_puts_every_resource_at_its_id(cases):
    bundle = cases_bundle(cases)
    validate_resource(bundle)
    assert bundle["type"] == "transaction"
    total = sum(len(c.resources) for c in cases)
    assert len(bundle["entry"]) == total
    urls = [e["request"]["url"] for e in bundle["entry"]]
    assert len(set(urls)) == total
    for entry in bundle["entry"]:
        res = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
    assert sum(len(r.resources) for r in records_from_bundle(bundle)) == total


def test_large_record(cases):
    case = large_record(AS_OF)
    observations = [r for r in case.resources if r["resourceType"] == "Observation"]
    assert len(observations) == 2000
    assert len({r["id"] for r in case.resources}) == len(case.resources)
    for res in case.resources:
        validate_resource(res)
    complete = next(c for c in cases if c.key == "complete")
    assert case.expected == complete.expected
    assert large_record(AS_OF, 500) == large_record(AS_OF, 500)
    assert len([r for r in large_record(AS_OF, 50).resources if r["resourceType"] == "Observation"]) == 50
    with pytest.raises(ValueError):
        large_record(AS_OF, 3)


def test_many_patients_are_distinct(cases):
    patients = list(many_patients(AS_OF, 2 * len(cases) + 3))
    assert len(patients) == 2 * len(cases) + 3
    ids = [(r["resourceType"], r["id"]) for resources in patients for r in resources]
    assert len(ids) == len(set(ids))
    first = patients[0]
    assert first[0]["id"] == "fp-0001-complete"
    pids = set()
    for resources in patients:
        records = records_from_bundle(resources)
        assert len(records) == 1
        pids.add(records[0].patient_id)
        local = {f"{r['resourceType']}/{r['id']}" for r in resources}
        for res in resources:
            for node in _walk(res):
                if "reference" in node:
                    assert node["reference"] in local
    assert len(pids) == len(patients)
    assert next(iter(many_patients(AS_OF, 12000)))[0]["id"] == "fp-00001-complete"


@responses.activate
def test_load_into_server_posts_one_transaction(cases):
    responses.add(
        responses.POST,
        "http://fhir.test/fhir",
        json={"resourceType": "Bundle", "type": "transaction-response", "entry": []},
        status=200,
    )
    answer = load_into_server("http://fhir.test/fhir/", cases[:2])
    assert answer["type"] == "transaction-response"
    sent = json.loads(responses.calls[0].request.body)
    assert sent["type"] == "transaction"
    assert len(sent["entry"]) == len(cases[0].resources) + len(cases[1].resources)
    assert responses.calls[0].request.headers["Content-Type"] == "application/fhir+json"


@responses.activate
def test_load_into_server_errors_are_plugin_errors(cases):
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}
    responses.add(responses.POST, "http://fhir.test/fhir", json=outcome, status=400)
    with pytest.raises(ServerError) as err:
        load_into_server("http://fhir.test/fhir", cases[:1])
    assert err.value.status == 400 and err.value.outcome == outcome
    with pytest.raises(TransportError):
        load_into_server("http://unreachable.test/fhir", cases[:1])
