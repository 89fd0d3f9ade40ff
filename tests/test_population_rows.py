"""The population's pure parts: keying lines, one patient's row, the summary and the HTML report, write-back."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re

from fhir_plugin._population._report import render_html, render_terminal, summarize
from fhir_plugin._population._rows import key_line, patient_row
from fhir_plugin._population._writeback import RateLimiter, WriteLog, write_back
from fhir_plugin._profile import load_profile
from fhir_plugin._write import WriteResult
from fhir_plugin.synthetic import generate_cases
from sandbox.testing import needing_drafts

TODAY = dt.date(2026, 11, 1)
NOW = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)


def test_key_line_finds_the_patient_and_reports_what_it_cannot_key():
    assert key_line('{"resourceType":"Observation","id":"o","subject":{"reference":"Patient/p1"}}').patient == "p1"
    assert key_line('{"resourceType":"Patient","id":"p2"}').patient == "p2"
    assert key_line('{"resourceType":"Medication","id":"m"}') is None  # not read by the check
    assert key_line("   ") is None
    broken = key_line('{"resourceType": "Observation", ')
    assert broken.patient is None and "not valid JSON" in broken.problem
    orphan = key_line('{"resourceType":"Condition","id":"c9"}')
    assert orphan.patient is None and "Condition/c9 has no subject Patient reference" in orphan.problem


def _lines(case):
    return [("f.ndjson", i + 1, json.dumps(r)) for i, r in enumerate(case.resources)]


def test_patient_row_matches_the_hand_derived_expectation():
    profile = load_profile("M62.561")
    for case in generate_cases(TODAY):
        if case.encounter_id:
            continue
        row = patient_row(case.patient_id, _lines(case), profile, today=TODAY, now=NOW)
        assert row["problem"] is None
        assert json.loads(row["statuses"]) == case.expected["elements"], case.key
        assert json.loads(row["flag_statuses"]) == case.expected["red_flags"], case.key
        assert row["code_fit"] == case.expected["code_fit"]
        assert row["suggested"] == case.expected["suggested"]
        assert row["complete"] is case.expected["complete"]
        assert row["referral"] is case.expected["referral_recommended"]
        assert row["drafts"] is None  # kept only for write-back


def test_an_invalid_resource_makes_a_problem_row_naming_file_and_line():
    case = generate_cases(TODAY)[0]
    lines = _lines(case)
    assert case.resources[0]["resourceType"] == "Patient"
    lines[0] = ("f.ndjson", 3, json.dumps(dict(case.resources[0], birthDate="14/03/1974")))
    row = patient_row(case.patient_id, lines, load_profile("M62.561"), today=TODAY, now=NOW)
    assert row["problem"].startswith("f.ndjson line 3: ")
    assert row["complete"] is False and row["code_fit"] is None


def _cases():
    return [c for c in generate_cases(TODAY) if not c.encounter_id]


def _rows(cases=None):
    profile = load_profile("M62.561")
    return [
        patient_row(c.patient_id, _lines(c), profile, today=TODAY, now=NOW, keep_drafts=True)
        for c in (cases if cases is not None else _cases())
    ]


def test_summary_and_report_count_what_the_rows_say():
    rows = _rows()
    s = summarize(rows, limit=5)
    assert s.patients == len(rows)
    assert s.complete == sum(r["complete"] for r in rows)
    assert s.referrals == sum(r["referral"] for r in rows) == sum(c.expected["referral_recommended"] for c in _cases())
    assert s.gap_frequency["onset"] == sum("onset" in r["gaps"] for r in rows)
    assert len(s.worklist) == 5 and s.worklist_total == sum(not r["complete"] or r["referral"] for r in rows)
    page = render_html(
        s,
        profile_code="M62.561",
        source="test",
        generated="now",
        problems=[{"file": "Observation.ndjson", "line": 7, "problem": "not valid JSON"}],
    )
    # offline: no script, no external resource; every plot has a title and a table beside it
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page.count("<svg") == 4 == page.count('role="img"') == page.count("<title id=")
    assert page.count("<table") == 5  # four beside the plots, one worklist
    assert "Observation.ndjson line 7: not valid JSON" in page
    assert re.search(r"<th scope=\"row\">fever</th><td>1</td>", page) is None  # flags are not gaps
    text = render_terminal(s, [{"file": "x.ndjson", "line": 2, "problem": "not valid JSON"}])
    assert f"{s.patients} patients: {s.complete} complete" in text
    assert "problem: x.ndjson line 2: not valid JSON" in text


class _Writer:
    def __init__(self, fail_after=None):
        self.sent = []
        self.fail_after = fail_after

    def write(self, drafts):
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise KeyboardInterrupt  # the job is killed here
        self.sent.append(drafts)
        return WriteResult(tuple(f"Condition/{len(self.sent)}" for _ in range(1)), ())


def test_write_back_resumes_after_a_kill_and_keeps_to_the_rate(tmp_path):
    # records that still need drafts (SPEC §7.1: most examples hold a clinician's plan already)
    rows = _rows([dataclasses.replace(c, resources=needing_drafts(c.resources)) for c in _cases()])
    allowed = [r for r in rows if r["drafts_allowed"]]
    clock = [0.0]
    waits = []

    def sleep(s):
        waits.append(s)
        clock[0] += s

    first = _Writer(fail_after=3)
    with WriteLog(tmp_path / "w.sqlite") as log:
        try:
            write_back(rows, first, log, RateLimiter(30, clock=lambda: clock[0], sleep=sleep))
        except KeyboardInterrupt:
            pass
    assert len(first.sent) == 3 and waits == [2.0, 2.0, 2.0]  # 30 a minute: one every 2 s
    second = _Writer()
    with WriteLog(tmp_path / "w.sqlite") as log:
        summary = write_back(rows, second, log, RateLimiter(None))
        assert log.count() == len(allowed)
    assert summary.skipped == 3 and summary.written == len(allowed) - 3
    assert [d for d in first.sent + second.sent] == [json.loads(r["drafts"]) for r in allowed]


def test_population_command_refuses_unclear_sources(tmp_path, capsys):
    from fhir_plugin._cli import main

    assert main(["population", "--out", str(tmp_path)]) == 2
    assert main(["population", "--out", str(tmp_path), "--ndjson", str(tmp_path), "--server", "http://x/fhir"]) == 2
    assert main(["population", "--out", str(tmp_path), "--ndjson", str(tmp_path), "--write"]) == 2
    assert main(["population", "--out", str(tmp_path), "--ndjson", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "give exactly one source" in err and "--write needs --server" in err and "not a folder" in err
    assert main(["population", "--out", str(tmp_path), "--ndjson", str(tmp_path), "--plan-notes"]) == 2
    assert "--plan-notes apply to an export (--server)" in capsys.readouterr().err


def test_plan_notes_export_the_plugins_plan_notes_only():
    from fhir_plugin._bulk import EXPORT_TYPES, PLAN_NOTE_FILTER, ExportRequest, kickoff_url

    _, params = kickoff_url(
        "https://ehr.test/fhir",
        ExportRequest("g", types=(*EXPORT_TYPES, "DocumentReference"), type_filters=(PLAN_NOTE_FILTER,)),
    )
    assert ("_type", "Patient,Encounter,Condition,Observation,CarePlan,DocumentReference") in params
    assert ("_typeFilter", "DocumentReference?type=http://loinc.org|18776-5") in params
