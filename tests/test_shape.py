"""The population's reading validation (``fhir_plugin._shape``) against whole-resource R4 validation.

The population job checks the R4 types of the elements the check reads (docs/population.md,
"What valid R4 means here"); ``--strict-r4`` validates whole resources as the command line does.
For valid records the two must give the same row; for a malformed read element both must make the
patient a problem row naming file, line and element.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from fhir_plugin._errors import InputError
from fhir_plugin._population._rows import patient_row
from fhir_plugin._profile import load_profile
from fhir_plugin._record import validate_resource
from fhir_plugin._shape import reading_problem
from fhir_plugin.synthetic import generate_cases

TODAY = dt.date(2026, 11, 1)
NOW = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)


def _lines(resources):
    return [("f.ndjson", i + 1, json.dumps(r)) for i, r in enumerate(resources)]


def test_every_synthetic_record_gives_the_same_row_with_and_without_strict_r4():
    profile = load_profile("M62.561")
    cases = [c for c in generate_cases(TODAY) if not c.encounter_id]
    assert len(cases) > 30
    for case in cases:
        for resource in case.resources:
            assert reading_problem(resource) is None, (case.key, resource["resourceType"])
        fast = patient_row(case.patient_id, _lines(case.resources), profile, today=TODAY, now=NOW)
        strict = patient_row(case.patient_id, _lines(case.resources), profile, today=TODAY, now=NOW, strict_r4=True)
        assert fast == strict, case.key
        assert fast["problem"] is None
        assert fast["statuses"] and json.loads(fast["statuses"]) == case.expected["elements"], case.key


# (resource type, element, malformed value, what the sentence names)
MALFORMED = [
    ("Encounter", "class", [{"code": "AMB"}], "class: expected an object (a Coding), got a list"),  # R5's shape
    ("Patient", "birthDate", "14/03/1974", "birthDate: '14/03/1974' is not an R4 date"),
    ("Condition", "code", "M62.561", "code: expected an object (a CodeableConcept), got a string"),
    ("Condition", "onsetDateTime", "2026-02-30", "onsetDateTime: '2026-02-30' is not a calendar date"),
    ("Condition", "bodySite", {"text": "right calf"}, "bodySite: expected a list, got an object"),
    ("Observation", "valueQuantity", {"value": "31"}, "valueQuantity.value: expected a number, got a string"),
    ("Observation", "note", [{"text": 5}], "note[0].text: expected a string, got a number"),
    ("Condition", "subject", {"reference": 7}, "subject.reference: expected a string, got a number"),
    ("Encounter", "period", {"start": "2026-01-05T10:00:00"}, "period.start: '2026-01-05T10:00:00' is not an R4"),
    ("CarePlan", "activity", [{"detail": {"code": "x"}}], "activity[0].detail.code: expected an object"),
]


@pytest.mark.parametrize(("rtype", "element", "value", "named"), MALFORMED, ids=[m[1] for m in MALFORMED])
def test_a_malformed_read_element_is_a_problem_row_in_both_modes(rtype, element, value, named):
    profile = load_profile("M62.561")
    case = next(
        c for c in generate_cases(TODAY) if not c.encounter_id and any(r["resourceType"] == rtype for r in c.resources)
    )
    resources = [dict(r) for r in case.resources]
    at = next(i for i, r in enumerate(resources) if r["resourceType"] == rtype)
    resources[at][element] = value
    found = reading_problem(resources[at])
    assert found is not None and named in found, found
    with pytest.raises(InputError):  # the whole R4 model refuses it too: the fast check only narrows, never widens
        validate_resource(resources[at])
    for strict in (False, True):
        row = patient_row(case.patient_id, _lines(resources), profile, today=TODAY, now=NOW, strict_r4=strict)
        assert row["problem"] and row["problem"].startswith(f"f.ndjson line {at + 1}: "), row["problem"]
        assert row["complete"] is False and row["code_fit"] is None
    fast = patient_row(case.patient_id, _lines(resources), profile, today=TODAY, now=NOW)
    assert named in fast["problem"]


def test_an_element_the_check_does_not_read_is_left_to_strict_r4():
    profile = load_profile("M62.561")
    case = next(c for c in generate_cases(TODAY) if not c.encounter_id)
    resources = [dict(r) for r in case.resources]
    at = next(i for i, r in enumerate(resources) if r["resourceType"] == "Patient")
    resources[at]["multipleBirthBoolean"] = "twice"  # not read by the check (SPEC §3), not R4 either
    assert reading_problem(resources[at]) is None
    fast = patient_row(case.patient_id, _lines(resources), profile, today=TODAY, now=NOW)
    strict = patient_row(case.patient_id, _lines(resources), profile, today=TODAY, now=NOW, strict_r4=True)
    assert fast["problem"] is None and fast["code_fit"] is not None
    assert strict["problem"] and "multipleBirthBoolean" in strict["problem"]
