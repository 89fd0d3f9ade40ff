"""The five-second review page's pure parts (issue 13): verdict, actions in plain words, trends, evidence."""

from __future__ import annotations

import re

from test_check_cases import CASES, TODAY

from fhir_plugin import check, load_profile, records_from_bundle
from smart_launch.views import evidence_index, gap_actions, resource_facts, svg_plot, trends, verdict

PROFILE = load_profile("M62.561")


def _record_and_report(key):
    case = next(c for c in CASES if c.key == key)
    [record] = records_from_bundle(case.resources)
    return record, check(record, PROFILE, today=TODAY, encounter_id=case.encounter_id)


def test_a_red_flag_leads_with_the_referral_never_with_complete():
    _, report = _record_and_report("flag-neuro")
    assert report.complete  # the documentation is complete ...
    shown = verdict(report, settled=None, written=False)
    assert shown["kind"] == "bad" and shown["text"].startswith("Refer first")  # ... but the referral leads
    assert "Progressive neurological deficit" in shown["text"] and "Complete" not in shown["text"]


def test_gaps_read_as_plain_actions_and_one_note_closing_two_gaps_is_one_action():
    _, report = _record_and_report("missing-onset")
    actions = gap_actions(report, PROFILE)
    words = [a["action"] for a in actions]
    assert "Document when the symptoms began" in words
    onset = next(a for a in actions if a["action"] == "Document when the symptoms began")
    assert set(onset["elements"]) >= {"Onset"}
    assert not any(re.search(r"[a-z]+-[a-z]+-[a-z]+", w) for w in words)  # no machine ids in the wording
    _, both = _record_and_report("missing-duration")
    merged = [a for a in gap_actions(both, PROFILE) if a["action"] == "Document when the symptoms began"]
    assert len(merged) == 1


def test_the_red_flag_screen_action_names_the_flags_in_words():
    _, report = _record_and_report("missing-red-flag-screen")
    [action] = [a for a in gap_actions(report, PROFILE) if a["action"].startswith("Document each red flag")]
    assert "unexplained weight loss" in action["action"] and "weight-loss" not in action["action"]


def test_medical_necessity_is_not_its_own_action_while_one_of_its_parts_is_a_gap():
    _, report = _record_and_report("missing-severity")
    words = [a["action"] for a in gap_actions(report, PROFILE)]
    assert "Record a pain score (0-10)" in words
    assert not any("Complete the exam" in w for w in words)


def test_the_measures_the_profile_names_are_read_with_their_side_and_dates():
    record, _ = _record_and_report("complete")
    found = {t["id"]: t for t in trends(record, PROFILE)}
    assert set(found) == {"circumference", "strength", "pain"}
    sides = {s.label: [shown for _, _, shown in s.points] for s in found["circumference"]["series"]}
    assert sides["right"] == ["34.5 cm", "35 cm"] and sides["left"] == ["37.5 cm"]
    assert [shown for _, _, shown in found["strength"]["series"][0].points] == ["4/5"]
    assert len(found["pain"]["series"][0].points) == 2


def test_the_plot_is_plain_svg_that_the_csp_allows():
    record, _ = _record_and_report("complete")
    svg = str(next(t for t in trends(record, PROFILE) if t["id"] == "circumference")["svg"])
    assert svg.startswith("<svg") and "<polyline" in svg and 'aria-hidden="true"' in svg
    assert "<script" not in svg and "style=" not in svg and "<style" not in svg  # no inline style or script
    assert svg_plot.__doc__  # single point series still draw (no division by zero)
    from smart_launch.views import Series

    assert "<circle" in svg_plot([Series("all", (("2026-01-01", 4.0, "4/5"),))], title="one point")


def test_evidence_reads_as_date_name_and_value():
    record, report = _record_and_report("complete")
    index = evidence_index(record)
    ref = next(r for e in report.elements if e.id == "severity" for r in e.evidence if r.startswith("Observation/"))
    shown = index[ref]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", shown["date"]) and shown["value"] and "Pain" in shown["name"]
    facts = dict(resource_facts(next(r for r in record.resources if f"Observation/{r['id']}" == ref)))
    assert facts["Date"] == shown["date"] and facts["Value"] == shown["value"]
