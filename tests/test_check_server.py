"""The same oracle as test_check_cases.py, with each record read back from a real FHIR server."""

import pytest
from fresh import fresh_cases
from test_check_cases import CASES, TODAY, diff, outcome

from fhir_plugin import FhirClient, check, load_profile
from fhir_plugin.synthetic import load_into_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def loaded(fhir_base_url):
    cases = fresh_cases(CASES)
    load_into_server(fhir_base_url, cases)
    return cases


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.key for c in CASES])
def test_report_matches_the_oracle_from_the_server(index, loaded, fhir_base_url):
    case = loaded[index]
    with FhirClient(fhir_base_url) as client:
        record = client.read_patient_record(case.patient_id)
        assert client.round_trips <= 2  # one batch read (a second only when a search pages)
    assert record.counts() == {
        t: sum(r["resourceType"] == t for r in case.resources) for t in {r["resourceType"] for r in case.resources}
    }
    report = check(record, load_profile("M62.561"), today=TODAY, encounter_id=case.encounter_id)
    problems = diff(outcome(report), case.expected)
    assert not problems, f"{case.key}:\n  " + "\n  ".join(problems)
