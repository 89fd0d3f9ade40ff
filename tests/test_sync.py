"""Unit tests of the sync job: selection, the state file, resume after a crash, faults — no server.

``FakeServer`` stands in for ``FhirClient``: it serves the synthetic patients'
records and carries out transactions the way FHIR says (conditional creates
keyed on ``ifNoneExist``), and can be told to fail.  The same job against the
real HAPI, with a SIGKILL and a fault-injecting proxy, is tests/test_sync_server.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import subprocess
import sys
import threading
from typing import Any

import pytest
import responses

from fhir_plugin import synthetic
from fhir_plugin._checkpoint import Checkpoint, StateLocked
from fhir_plugin._cli import main
from fhir_plugin._client import FhirClient
from fhir_plugin._errors import AuthError, InputError, NotFound, TransportError, UsageError
from fhir_plugin._profile import load_profile
from fhir_plugin._record import records_from_bundle
from fhir_plugin._sync import (
    Selection,
    SyncOptions,
    changed_patients,
    default_scope,
    format_instant,
    group_members,
    parse_instant,
    patient_line,
    run_sync,
)
from sandbox.testing import needing_drafts

AS_OF = dt.date(2026, 11, 26)
BASE = "http://fhir.test/fhir"


@pytest.fixture(scope="module")
def cases():
    # SPEC §7.1: a plan or a diagnosis already in the chart is not drafted again, so the job's write paths
    # are tested on records that still need all 7 drafts (no plan; the chart's Condition less specific)
    return [dataclasses.replace(c, resources=needing_drafts(c.resources)) for c in synthetic.generate_cases(AS_OF)]


@pytest.fixture(scope="module")
def profile():
    return load_profile("M62.561")


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


class FakeServer:
    """Enough of FhirClient for the job: records by patient id, transactions with conditional creates."""

    base_url = BASE

    def __init__(self, cases) -> None:
        self.records = {c.patient_id: records_from_bundle(c.resources)[0] for c in cases}
        self.stored: dict[str, str] = {}  # ifNoneExist -> "Type/id"
        self.creates: list[str] = []  # every create carried out, in order
        self.transactions = 0
        self.fail: dict[str, BaseException] = {}  # patient id -> raised on reading the record
        self.crash_after_commit: int | None = None  # commit the Nth transaction, then "die"
        self.lock = threading.Lock()

    # the job reads records and writes transactions; selection modes other than --patient use request()
    def read_patient_record(self, pid: str, *, plan_notes: bool = False):  # the records hold no notes
        if pid in self.fail:
            raise self.fail[pid]
        if pid not in self.records:
            raise NotFound(f"patient {pid} was not found on {BASE}")
        return self.records[pid]

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        entries = []
        with self.lock:
            for entry in bundle["entry"]:
                key = entry["request"]["ifNoneExist"]
                if key in self.stored:
                    entries.append({"response": {"status": "200 OK", "location": self.stored[key] + "/_history/1"}})
                else:
                    ref = f"{entry['request']['url']}/{len(self.creates) + 1}"
                    self.stored[key] = ref
                    self.creates.append(key)
                    entries.append({"response": {"status": "201 Created", "location": ref + "/_history/1"}})
            self.transactions += 1
            if self.crash_after_commit is not None and self.transactions == self.crash_after_commit:
                raise Crash()
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


def _run(server, state, *, patients=None, write=True, concurrency=3, fresh=False, max_transport_errors=10):
    out = io.StringIO()
    ids = tuple(patients if patients is not None else server.records)
    with Checkpoint(state) as checkpoint:
        result = run_sync(
            server,
            checkpoint,
            SyncOptions(Selection(patients=ids), write, concurrency, AS_OF, fresh, max_transport_errors),
            profile=load_profile("M62.561"),
            out=out,
        )
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    return result, lines[:-1], lines[-1]["summary"]


# ---------------------------------------------------------------- pure parts


def test_selection_modes_and_their_signatures():
    assert Selection().mode == "changed"
    assert Selection(patients=("b", "a")).signature() == Selection(patients=("a", "b", "a")).signature()
    assert Selection(group="g1").mode == "group" and Selection(all=True).mode == "all"
    assert Selection(group="g1").signature() != Selection(group="g2").signature()
    with pytest.raises(UsageError, match="one of"):
        Selection(patients=("a",), all=True)
    with pytest.raises(UsageError, match="--since"):
        Selection(all=True, since="2026-01-01")


def test_report_line_carries_ids_and_statuses_only(cases, profile):
    from fhir_plugin import check

    case = next(c for c in synthetic.generate_cases(AS_OF) if c.key == "missing-onset")  # with its own plan
    report = check(records_from_bundle(case.resources)[0], profile, today=AS_OF)
    line = patient_line(case.patient_id, status="gaps", report=report, written={"created": ["Condition/1"]})
    assert line == {
        "patient": "Patient/fp-missing-onset",
        "status": "gaps",
        "gaps": ["onset", "red-flag-screen"],
        "code_fit": "fits",
        "written": {"created": ["Condition/1"], "existing": []},
        "error": None,
    }
    text = json.dumps(line)
    patient = next(r for r in case.resources if r["resourceType"] == "Patient")
    assert patient["name"][0]["family"] not in text and patient["birthDate"] not in text


def test_instants():
    assert format_instant(parse_instant("2026-11-26T10:53:29.644+01:00")) == "2026-11-26T09:53:29.644Z"
    assert format_instant(parse_instant("2026-11-26")) == "2026-11-26T00:00:00.000Z"
    with pytest.raises(UsageError, match="--since"):
        parse_instant("yesterday")


def test_default_scopes_are_least_privilege():
    read = default_scope(Selection(), write=False)
    assert "system/Condition.rs" in read and ".c" not in read and "Group" not in read
    # a dry run searches the plugin's plan notes and their Provenance too (SPEC §7.1), so it asks to
    assert {"system/DocumentReference.rs", "system/Provenance.rs"} <= set(read.split())
    write = default_scope(Selection(group="g"), write=True)
    # create asked apart from read (issue 12, item 5): a server that refuses the create keeps the read
    assert {
        "system/Condition.rs",
        "system/Condition.cs",
        "system/CarePlan.cs",
        "system/DocumentReference.cs",
        "system/Goal.cs",
        "system/Provenance.cs",
        "system/Group.r",
        "system/Observation.rs",
    } <= set(write.split())


# ---------------------------------------------------------------- which patients, over HTTP (mocked)


def _page(resources, *, next_url=None, stamp=None):
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if stamp:
        bundle["meta"] = {"lastUpdated": stamp}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


@responses.activate
def test_changed_patients_follows_pages_skips_drafts_and_takes_the_servers_time():
    def subj(rtype, pid):
        return {"resourceType": rtype, "subject": {"reference": f"Patient/{pid}"}}

    responses.get(
        f"{BASE}/Condition",
        json=_page(
            [subj("Condition", "a"), subj("Condition", "b")],
            next_url=f"{BASE}?_getpages=x1",
            stamp="2026-11-26T10:00:05Z",
        ),
    )
    responses.get(f"{BASE}?_getpages=x1", json=_page([subj("Condition", "c"), subj("Condition", "a")]))
    not_a_patient = {"resourceType": "Observation", "subject": {"reference": "Group/1"}}
    responses.get(
        f"{BASE}/Observation", json=_page([subj("Observation", "d"), not_a_patient], stamp="2026-11-26T10:00:04.5Z")
    )
    responses.get(f"{BASE}/Encounter", json=_page([], stamp="2026-11-26T10:00:06Z"))
    responses.get(f"{BASE}/CarePlan", json=_page([subj("CarePlan", "b")], stamp="2026-11-26T10:00:06Z"))
    ids, server_time = changed_patients(FhirClient(BASE), parse_instant("2026-11-25T00:00:00Z"))
    assert ids == ["a", "b", "c", "d"]
    assert server_time == parse_instant("2026-11-26T10:00:04.500Z")
    first = responses.calls[0].request
    assert "_lastUpdated=gt2026-11-25T00%3A00%3A00.000Z" in first.url
    assert "_tag%3Anot=urn%3Afhir-plugin%3Atag%7Cmachine-drafted" in first.url
    assert first.headers["Cache-Control"] == "no-cache"


@responses.activate
def test_group_members_are_active_patients_only():
    responses.get(
        f"{BASE}/Group/g1",
        json={
            "resourceType": "Group",
            "id": "g1",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": "Patient/a"}},
                {"entity": {"reference": "Patient/b"}, "inactive": True},
                {"entity": {"reference": "Practitioner/x"}},
                {"entity": {"reference": "Patient/a"}},
                {"entity": {"reference": "Patient/c"}},
            ],
        },
    )
    assert group_members(FhirClient(BASE), "g1") == ["a", "c"]


# ---------------------------------------------------------------- the run


def test_a_run_checks_everyone_writes_once_and_a_second_run_writes_nothing(cases, tmp_path):
    server = FakeServer(cases)
    result, lines, summary = _run(server, tmp_path / "s.sqlite")
    assert result.finished and summary["patients"] == len(cases)
    assert sorted(x["patient"] for x in lines) == sorted(f"Patient/{c.patient_id}" for c in cases)
    by_id = {x["patient"].split("/")[1]: x for x in lines}
    for case in cases:
        line = by_id[case.patient_id]
        if line["code_fit"] == "mismatch":
            assert line["status"] == "refused" and line["written"] is None
        else:
            assert line["status"] in ("complete", "gaps") and len(line["written"]["created"]) == 7
    created = len(server.creates)
    assert created == summary["created"] == len(set(server.creates))

    result2, lines2, summary2 = _run(server, tmp_path / "s.sqlite")
    assert summary2["created"] == 0 and summary2["existing"] == created
    assert len(server.creates) == created
    assert summary2["run"] == summary["run"] + 1


def test_dry_run_writes_nothing(cases, tmp_path):
    server = FakeServer(cases)
    _, lines, summary = _run(server, tmp_path / "s.sqlite", write=False)
    assert server.transactions == 0 and all(x["written"] is None for x in lines)
    assert summary["complete"] + summary["gaps"] + summary["refused"] == len(cases)


def test_malformed_data_and_missing_patients_are_reported_and_skipped(cases, tmp_path):
    server = FakeServer(cases)
    bad = cases[3].patient_id
    server.fail[bad] = InputError("Observation/x is not valid FHIR R4 at code: Field required")
    _, lines, summary = _run(server, tmp_path / "s.sqlite", patients=[bad, "no-such-patient", cases[0].patient_id])
    by_id = {x["patient"]: x for x in lines}
    assert by_id[f"Patient/{bad}"]["status"] == "error"
    assert by_id[f"Patient/{bad}"]["error"] == "Observation/x is not valid FHIR R4 at code: Field required."
    assert by_id["Patient/no-such-patient"]["error"].startswith("patient no-such-patient was not found")
    assert by_id[f"Patient/{cases[0].patient_id}"]["status"] == "gaps"  # its plan taken away (the fixture)
    assert summary["error"] == 2 and server.transactions == 1


def test_a_crash_after_a_commit_resumes_without_repeating_or_missing_a_write(cases, tmp_path):
    state = tmp_path / "s.sqlite"
    reference = FakeServer(cases)
    _, ref_lines, _ = _run(reference, tmp_path / "ref.sqlite")

    server = FakeServer(cases)
    server.crash_after_commit = 5  # the 5th transaction reaches the server, its answer never the job
    with pytest.raises(Crash):
        _run(server, state)
    with Checkpoint(state) as cp:
        run = cp.unfinished_run(f"{BASE}|M62.561|write")
        done_before = cp.counts(run)["done"]
    assert 0 < done_before < len(cases)

    server.crash_after_commit = None
    result, lines, summary = _run(server, state)
    assert result.finished and summary["from_earlier_attempt"] == done_before
    assert sorted(x["patient"] for x in lines) == sorted(x["patient"] for x in ref_lines)  # each patient once
    assert sorted(server.creates) == sorted(reference.creates)  # the same drafts, none twice
    assert len(server.creates) == len(set(server.creates))
    # the patient whose transaction was committed but not recorded was sent again and found its drafts
    assert summary["existing"] >= 7


def test_a_refused_token_stops_the_run_and_resume_finishes_it(cases, tmp_path):
    server = FakeServer(cases)
    victim = cases[10].patient_id
    server.fail[victim] = AuthError("GET x failed with 401 Unauthorized: token expired.", status=401)
    with pytest.raises(AuthError):
        _run(server, tmp_path / "s.sqlite", concurrency=1)
    with Checkpoint(tmp_path / "s.sqlite") as cp:
        run = cp.unfinished_run(f"{BASE}|M62.561|write")
        # the ten before it are done; the one queued behind it may have started before the run stopped
        assert victim in cp.todo(run) and cp.counts(run)["done"] in (10, 11)
    del server.fail[victim]
    result, lines, summary = _run(server, tmp_path / "s.sqlite", concurrency=1)
    assert result.finished and summary["patients"] == len(cases) and summary["error"] == 0


def test_a_server_that_stops_answering_stops_the_run(cases, tmp_path):
    server = FakeServer(cases)
    for case in cases[5:]:
        server.fail[case.patient_id] = TransportError("could not reach x: connection refused (5 attempts)")
    with pytest.raises(TransportError, match="in a row"):
        _run(server, tmp_path / "s.sqlite", concurrency=1, max_transport_errors=3)
    server.fail.clear()
    result, _, summary = _run(server, tmp_path / "s.sqlite", concurrency=1)
    assert result.finished and summary["error"] == 0 and summary["patients"] == len(cases)


def test_another_selection_while_a_run_is_unfinished_needs_fresh(cases, tmp_path):
    server = FakeServer(cases)
    server.crash_after_commit = 2
    with pytest.raises(Crash):
        _run(server, tmp_path / "s.sqlite", concurrency=1)
    server.crash_after_commit = None
    with pytest.raises(UsageError, match="--fresh"):
        _run(server, tmp_path / "s.sqlite", patients=[cases[0].patient_id])
    result, lines, _ = _run(server, tmp_path / "s.sqlite", patients=[cases[0].patient_id], fresh=True)
    assert result.finished and len(lines) == 1


def test_failed_patients_get_another_try_in_the_next_changes_run(cases, tmp_path):
    with Checkpoint(tmp_path / "s.sqlite") as cp:
        scope = "x|M62.561|write"
        run = cp.start_run(scope, "{}", ["a", "b", "c"], since=None, mark="2026-11-26T10:00:00.000Z")
        cp.record(run, "a", failed=False, line={"patient": "Patient/a"})
        cp.record(run, "b", failed=True, line={"patient": "Patient/b"})
        cp.record(run, "c", failed=True, line={"patient": "Patient/c"})
        cp.finish_run(run, set_mark=True)
        assert cp.mark(scope) == "2026-11-26T10:00:00.000Z"
        assert cp.outstanding_failures(scope) == ["b", "c"]
        run2 = cp.start_run(scope, "{}", ["c"], since=None, mark=None)
        cp.record(run2, "c", failed=False, line={"patient": "Patient/c"})
        cp.finish_run(run2, set_mark=False)
        assert cp.outstanding_failures(scope) == ["b"]
        assert cp.mark(scope) == "2026-11-26T10:00:00.000Z"


# ---------------------------------------------------------------- one job at a time


def test_a_second_job_on_the_same_state_file_is_refused(tmp_path):
    state = tmp_path / "s.sqlite"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from fhir_plugin._checkpoint import Checkpoint\n"
                f"cp = Checkpoint({str(state)!r}); print('locked', flush=True); time.sleep(30)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateLocked, match=f"pid {holder.pid}") as info:
            Checkpoint(state)
        assert info.value.exit_code == 10
    finally:
        holder.kill()
        holder.wait()
    Checkpoint(state).close()  # the kernel dropped the dead holder's lock: no stale lock to clear


def test_the_command_line_says_so_in_one_sentence_with_exit_code_10(tmp_path, capsys):
    state = tmp_path / "s.sqlite"
    with Checkpoint(state):
        code = main(["sync", "--server", BASE, "--patient", "p1", "--state", str(state)])
    err = capsys.readouterr().err.strip()
    assert code == 10
    assert err.startswith("fhir-plugin: another sync job") and err.count("\n") == 0


def test_command_line_usage_errors(tmp_path, capsys):
    assert main(["sync", "--server", BASE, "--all", "--group", "g", "--state", str(tmp_path / "s")]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert main(["sync", "--server", BASE, "--client-id", "x", "--state", str(tmp_path / "s")]) == 2
    assert "--key" in capsys.readouterr().err
    assert main(["sync", "--server", BASE, "--concurrency", "0", "--state", str(tmp_path / "s")]) == 2


def test_the_command_paces_its_one_client_at_max_requests_per_minute(tmp_path, monkeypatch):
    from fhir_plugin._cli import sync as command
    from fhir_plugin._sync import SyncResult

    used = []

    def fake_run_sync(client, checkpoint, options, **_):
        used.append(client)
        return SyncResult(1, "patients")

    monkeypatch.setattr(command, "run_sync", fake_run_sync)
    state = str(tmp_path / "s")
    args = ["sync", "--server", BASE, "--patient", "p1", "--state", state, "--report", str(tmp_path / "r")]
    assert main([*args, "--max-requests-per-minute", "250"]) == 0
    assert main(args) == 0
    assert [client._pacer.per_minute for client in used] == [250, None]


@pytest.mark.parametrize("rate", ["0", "-5"])
def test_a_rate_that_is_not_positive_is_refused_in_one_sentence(tmp_path, capsys, rate):
    args = ["sync", "--server", BASE, "--all", "--state", str(tmp_path / "s"), "--max-requests-per-minute", rate]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fhir-plugin: --max-requests-per-minute must be a positive number, not {rate}"
    assert not (tmp_path / "s").exists()  # refused before the state file or the server is touched


def test_progress_goes_to_stderr_and_report_lines_carry_no_names(cases, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = FakeServer(cases)
    progress = io.StringIO()
    out = io.StringIO()
    with Checkpoint(tmp_path / "s.sqlite") as cp:
        run_sync(
            server,
            cp,
            SyncOptions(Selection(patients=tuple(server.records)), True, 2, AS_OF),
            profile=load_profile("M62.561"),
            out=out,
            progress_stream=progress,
        )
    assert f"{len(cases)} of {len(cases)} patients done" in progress.getvalue()
    text = out.getvalue() + progress.getvalue() + "\n".join(r.getMessage() for r in caplog.records)
    for case in cases:
        patient = next(r for r in case.resources if r["resourceType"] == "Patient")
        assert patient["name"][0]["family"] not in text
        assert patient["birthDate"] not in text


# ---------------------------------------------------------------- the high-water mark


class HttpFakeServer(FakeServer):
    """The fake's records, with the patient searches answered over (mocked) HTTP by a real FhirClient."""

    def __init__(self, cases) -> None:
        super().__init__(cases)
        self.http = FhirClient(BASE)

    def request(self, *args, **kwargs):
        return self.http.request(*args, **kwargs)

    def search_bundle_pages(self, *args, **kwargs):
        return self.http.search_bundle_pages(*args, **kwargs)


def _changes_run(server, state, since=None):
    out = io.StringIO()
    with Checkpoint(state) as checkpoint:
        run_sync(
            server,
            checkpoint,
            SyncOptions(Selection(since=since), True, 2, AS_OF),
            profile=load_profile("M62.561"),
            out=out,
        )
        mark = checkpoint.mark(f"{BASE}|M62.561|write")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    return [x["patient"] for x in lines[:-1]], lines[-1]["summary"], mark


@responses.activate
def test_the_mark_is_the_servers_time_less_a_margin_and_moves_only_forward(cases, tmp_path):
    server = HttpFakeServer(cases[:4])
    state = tmp_path / "s.sqlite"
    patients = [{"resourceType": "Patient", "id": c.patient_id} for c in cases[:4]]
    responses.get(f"{BASE}/Patient", json=_page(patients, stamp="2026-11-26T10:00:00Z"))
    ids, summary, mark = _changes_run(server, state)  # no mark yet: every patient
    assert len(ids) == 4 and summary["mode"] == "changed"
    assert mark == "2026-11-26T09:58:00.000Z"  # two minutes before the server's time

    def changed(stamp, pid=None):
        responses.reset()
        for rtype in ("Condition", "Observation", "Encounter", "CarePlan"):
            found = (
                [{"resourceType": rtype, "subject": {"reference": f"Patient/{pid}"}}]
                if pid and rtype == "Observation"
                else []
            )
            responses.get(f"{BASE}/{rtype}", json=_page(found, stamp=stamp))

    changed("2026-11-26T11:00:00Z", cases[2].patient_id)
    ids, _, mark = _changes_run(server, state)
    assert ids == [f"Patient/{cases[2].patient_id}"]
    assert "_lastUpdated=gt2026-11-26T09%3A58%3A00.000Z" in responses.calls[0].request.url
    assert mark == "2026-11-26T10:58:00.000Z"

    changed("2026-11-26T12:00:00Z")  # --since later than the mark skipped changes: the mark stays
    ids, _, mark = _changes_run(server, state, since="2026-11-26T11:30:00Z")
    assert ids == [] and mark == "2026-11-26T10:58:00.000Z"

    changed("2026-11-26T12:00:00Z")  # --since earlier than the mark: checked more, the mark moves on
    _, _, mark = _changes_run(server, state, since="2026-11-26T08:00:00Z")
    assert mark == "2026-11-26T11:58:00.000Z"


def test_progress_bar_on_a_terminal_and_the_servers_clock():
    from email.utils import formatdate

    import requests

    from fhir_plugin._sync import Progress, ServerClock

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = Progress(4, 0, stream)
    for failed in (False, True, False, False):
        progress.advance(failed)
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\r\x1b[Ksync [") and "4/4" in text and "1 failed" in text and text.endswith("\n")

    clock = ServerClock()
    response = requests.Response()
    response.headers["Date"] = formatdate(1_795_000_000, usegmt=True)
    clock(response)
    assert clock.latest is not None and clock.latest.timestamp() == 1_795_000_000
