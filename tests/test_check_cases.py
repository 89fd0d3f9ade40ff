"""The check against the synthetic patients' hand-derived expectations (SPEC §3–§6), one test per case.

From Bundle files here; from the sandbox HAPI in test_check_server.py.
"""

from datetime import date

import pytest

from fhir_plugin import check, load_bundle_file, load_profile
from fhir_plugin.synthetic import generate_cases, save_cases

TODAY = date(2026, 11, 26)
CASES = generate_cases(TODAY)


def outcome(report) -> dict:
    """The parts of a report the oracle states."""
    data = report.to_json()
    return {
        "elements": {e["id"]: e["status"] for e in data["elements"]},
        "red_flags": {f["id"]: f["status"] for f in data["red_flags"]},
        "code_fit": data["code_fit"]["status"],
        "suggested": sorted(s["code"] for s in data["code_fit"]["suggested"]),
        "complete": data["complete"],
        "referral_recommended": data["referral_recommended"],
    }


def diff(got: dict, want: dict) -> list[str]:
    lines = []
    for part in ("elements", "red_flags"):
        for key in sorted(set(got[part]) | set(want[part])):
            if got[part].get(key) != want[part].get(key):
                lines.append(f"{part}.{key}: got {got[part].get(key)}, expected {want[part].get(key)}")
    for key in ("code_fit", "suggested", "complete", "referral_recommended"):
        if got[key] != want[key]:
            lines.append(f"{key}: got {got[key]}, expected {want[key]}")
    return lines


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    save_cases(CASES, folder)
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_report_matches_the_oracle_from_files(case, saved):
    [record] = load_bundle_file(saved / f"{case.key}.json")
    report = check(record, load_profile("M62.561"), today=TODAY, encounter_id=case.encounter_id)
    problems = diff(outcome(report), case.expected)
    assert not problems, f"{case.key} ({case.title}):\n  " + "\n  ".join(problems)
    # every met element and every documented flag names its evidence (SPEC §3: ResourceType/id)
    for element in report.elements:
        if element.status == "met" and element.id not in ("excludes1",):
            assert element.evidence, element.id
            assert all("/" in ref for ref in element.evidence)
