"""The source document's own clinical example must come out as a coding error (SPEC §1, erratum 3)."""

from datetime import date

import simple_icd_10_cm as cm

from fhir_plugin._check import check
from fhir_plugin._profile import load_profile
from fhir_plugin._record import records_from_bundle

TODAY = date(2026, 11, 26)


def _seed_example() -> dict:
    patient = {"resourceType": "Patient", "id": "seed", "gender": "female", "birthDate": "1981-03-02"}
    condition = {
        "resourceType": "Condition",
        "id": "seed-c",
        "subject": {"reference": "Patient/seed"},
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "code": {
            "coding": [
                {
                    "system": "http://hl7.org/fhir/sid/icd-10-cm",
                    "code": "M62.561",
                    "display": cm.get_description("M62.561"),
                }
            ],
            "text": "Muscle spasm in the right trapezius muscle",
        },
        "bodySite": [{"text": "right trapezius"}],
        "onsetDateTime": "2026-11-12",
        "note": [
            {
                "text": "Right shoulder muscle spasms that began two weeks ago. Pain worsens throughout "
                "the day, particularly after long hours of sitting at her desk."
            }
        ],
    }
    exam = {
        "resourceType": "Observation",
        "id": "seed-o",
        "status": "final",
        "subject": {"reference": "Patient/seed"},
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "exam"}]}
        ],
        "code": {"text": "Physical examination"},
        "valueString": "Tenderness upon palpation of the right trapezius muscle. Range of motion is slightly "
        "limited due to discomfort. No signs of neurological deficits.",
    }
    encounter = {
        "resourceType": "Encounter",
        "id": "seed-e",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/seed"},
        "period": {"start": "2026-11-26"},
        "reasonReference": [{"reference": "Condition/seed-c"}],
    }
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (patient, condition, exam, encounter)],
    }


def test_trapezius_spasm_coded_m62561_is_a_mismatch_suggesting_m62830():
    [record] = records_from_bundle(_seed_example())
    report = check(record, load_profile("M62.561"), today=TODAY).to_json()
    assert report["code_fit"]["status"] == "mismatch"
    assert [s["code"] for s in report["code_fit"]["suggested"]] == ["M62.830"]
    # titles come from the ICD-10-CM data, not from the source document's wrong title
    assert report["code_fit"]["suggested"][0]["display"] == cm.get_description("M62.830") == "Muscle spasm of back"
    assert report["profile"]["display"] == cm.get_description("M62.561")
    assert "right lower leg" in report["profile"]["display"]
    statuses = {e["id"]: e["status"] for e in report["elements"]}
    assert statuses["body-site"] == "conflict"
    assert statuses["palpation"] == "met" and statuses["range-of-motion"] == "met"
    assert statuses["atrophy-finding"] == "missing"
    assert report["complete"] is False


def test_same_record_checked_against_back_spasm_profile_fits():
    # SPEC §3 Conditions under review: against M62.830 a Condition coded M62.561 is a separate
    # diagnosis, not under review, so nothing gives the site: the code fit cannot tell
    [record] = records_from_bundle(_seed_example())
    report = check(record, load_profile("M62.830"), today=TODAY).to_json()
    assert report["code_fit"]["status"] == "insufficient", report["code_fit"]
    # recoded as the suggestion says, the same documentation fits M62.830
    bundle = _seed_example()
    bundle["entry"][1]["resource"]["code"]["coding"] = [
        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M62.830", "display": cm.get_description("M62.830")}
    ]
    [record] = records_from_bundle(bundle)
    report = check(record, load_profile("M62.830"), today=TODAY).to_json()
    assert report["code_fit"]["status"] == "fits", report["code_fit"]
