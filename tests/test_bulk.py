"""The Bulk Data client (fhir_plugin._bulk) against mocked servers: the IG's flow, resume, failure, expiry."""

from __future__ import annotations

import io
import json

import pytest
import requests
import responses

from fhir_plugin._bulk import BulkExporter, ExportRequest, kickoff_url
from fhir_plugin._errors import NotFound, ServerError, TransportError, UsageError
from fhir_plugin._pace import RateLimiter

BASE = "https://ehr.example/fhir"
STATUS = f"{BASE}/$export-poll-status?_jobId=42"
PATIENTS = '{"resourceType":"Patient","id":"a"}\n{"resourceType":"Patient","id":"b"}\n'
CONDITIONS = '{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/a"}}\n'


def manifest(requires_token: bool = True, errors: bool = False) -> dict:
    return {
        "transactionTime": "2026-11-29T07:00:00Z",
        "request": f"{BASE}/Patient/$export",
        "requiresAccessToken": requires_token,
        "output": [{"type": "Patient", "url": f"{BASE}/Binary/p1"}, {"type": "Condition", "url": f"{BASE}/Binary/c1"}],
        "error": [{"type": "OperationOutcome", "url": f"{BASE}/Binary/e1"}] if errors else [],
    }


def test_kickoff_url_for_each_level():
    url, params = kickoff_url(
        BASE, ExportRequest(group="g1", since="2026-01-01T00:00:00Z", type_filters=("Condition?code=M62.561",))
    )
    assert url == f"{BASE}/Group/g1/$export"
    assert ("_type", "Patient,Encounter,Condition,Observation,CarePlan") in params
    assert ("_since", "2026-01-01T00:00:00Z") in params
    assert ("_typeFilter", "Condition?code=M62.561") in params
    assert kickoff_url(BASE, ExportRequest(level="system"))[0] == f"{BASE}/$export"
    assert kickoff_url(BASE, ExportRequest())[0] == f"{BASE}/Patient/$export"
    with pytest.raises(UsageError):
        kickoff_url(BASE, ExportRequest(group="../x"))


def _kickoff_and_poll(rsps, manifest_body):
    rsps.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS})
    rsps.get(STATUS, status=202, headers={"Retry-After": "120", "X-Progress": "50% done"})
    rsps.get(STATUS, status=200, json=manifest_body)


@responses.activate
def test_whole_flow_honours_retry_after_sends_the_token_and_deletes_the_job(tmp_path):
    _kickoff_and_poll(responses, manifest(errors=True))
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=CONDITIONS)
    responses.get(
        f"{BASE}/Binary/e1",
        body=json.dumps(
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "processing", "diagnostics": "Observation/o9 could not be read"}
                ],
            }
        )
        + "\n",
    )
    responses.delete(STATUS, status=202)
    waits = []
    exporter = BulkExporter(BASE, tmp_path, token="s3cret", max_wait=5, sleep=waits.append)
    files, issues = exporter.run(ExportRequest())

    assert waits == [5]  # Retry-After 120, capped by max_wait
    kick = responses.calls[0].request
    assert kick.headers["Prefer"] == "respond-async"
    assert all(c.request.headers.get("Authorization") == "Bearer s3cret" for c in responses.calls)
    assert [p.read_text() for p in files] == [PATIENTS, CONDITIONS]
    assert issues == [{"file": "e1", "line": 1, "problem": "Observation/o9 could not be read"}]
    assert responses.calls[-1].request.method == "DELETE"


@responses.activate
def test_no_token_on_files_that_do_not_require_one(tmp_path):
    _kickoff_and_poll(responses, manifest(requires_token=False))
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=CONDITIONS)
    responses.delete(STATUS, status=202)
    BulkExporter(BASE, tmp_path, token="s3cret", sleep=lambda s: None).run(ExportRequest())
    downloads = [c.request for c in responses.calls if "/Binary/" in c.request.url]
    assert downloads and all("Authorization" not in r.headers for r in downloads)


@responses.activate
def test_an_interrupted_download_resumes_without_a_second_kickoff(tmp_path):
    _kickoff_and_poll(responses, manifest())
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=requests.ConnectionError("connection reset"))
    with pytest.raises(TransportError):
        BulkExporter(BASE, tmp_path, sleep=lambda s: None).run(ExportRequest())
    assert not list(tmp_path.glob("*Condition.ndjson"))  # nothing half-written under the final name

    responses.reset()
    responses.get(f"{BASE}/Binary/c1", body=CONDITIONS)
    responses.delete(STATUS, status=202)
    again = BulkExporter(BASE, tmp_path, sleep=lambda s: None)
    files, _ = again.run(ExportRequest())
    assert again.kickoffs == 0
    assert [c.request.url for c in responses.calls] == [f"{BASE}/Binary/c1", STATUS]  # only the missing file
    assert [p.read_text() for p in files] == [PATIENTS, CONDITIONS]


@responses.activate
def test_a_failed_export_is_a_server_error_with_its_outcome(tmp_path):
    responses.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS})
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception", "diagnostics": "job failed"}],
    }
    responses.get(STATUS, status=500, json=outcome)
    with pytest.raises(ServerError, match="the export failed on the server") as err:
        BulkExporter(BASE, tmp_path, sleep=lambda s: None).run(ExportRequest())
    assert err.value.outcome == outcome
    assert not list(tmp_path.glob("*.ndjson"))


@responses.activate
def test_a_transient_status_answer_is_polled_again_and_too_many_fail(tmp_path):
    """Bulk Data IG: a polling failure that is not the job's failure carries a transient issue code (or is a
    gateway's 502/503/504): poll again after Retry-After.  Past five in a row the export is given up."""
    transient = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
    responses.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, status=503, headers={"Retry-After": "7"})
    responses.get(STATUS, status=500, json=transient)
    _kickoff_and_poll(responses, manifest(requires_token=False))  # its kick-off is not reached again
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=CONDITIONS)
    responses.delete(STATUS, status=202)
    waits: list[float] = []  # time passes as the client sleeps: a held pacer waits no longer than the poll
    paths, _ = BulkExporter(BASE, tmp_path, max_wait=30, sleep=waits.append, clock=lambda: sum(waits)).run(
        ExportRequest()
    )
    assert [p.name for p in paths] == ["000-Patient.ndjson", "001-Condition.ndjson"]
    assert waits[:3] == [7.0, 1.0, 30.0]  # Retry-After, none given (1 s), HAPI's 120 s capped

    responses.reset()
    responses.get(STATUS, status=502)
    with pytest.raises(ServerError, match="the export failed on the server \\(HTTP 502\\)"):
        BulkExporter(BASE, tmp_path / "again", sleep=lambda s: None).poll(STATUS)
    assert len(responses.calls) == 6  # five in a row polled again, the sixth given up


@responses.activate
def test_an_expired_export_says_so(tmp_path):
    _kickoff_and_poll(responses, manifest())
    responses.get(f"{BASE}/Binary/p1", status=404)
    with pytest.raises(NotFound, match="expired"):
        BulkExporter(BASE, tmp_path, sleep=lambda s: None).run(ExportRequest())
    assert not list(tmp_path.glob("*.ndjson*"))  # no file, not even a part file
    responses.reset()
    responses.get(STATUS, status=404)
    with pytest.raises(NotFound, match="--fresh-export"):
        BulkExporter(BASE, tmp_path / "other", sleep=lambda s: None).poll(STATUS)


@responses.activate
def test_a_status_url_on_another_server_never_gets_the_token(tmp_path):
    responses.get(
        f"{BASE}/Patient/$export", status=202, headers={"Content-Location": "https://elsewhere.example/status/1"}
    )
    with pytest.raises(UsageError, match="must not leave its server"):
        BulkExporter(BASE, tmp_path, token="s3cret").run(ExportRequest())


def _previous_results(out):
    """An output folder as an earlier run left it: results, report and problems, each with known content."""
    (out / "results.parquet").mkdir(parents=True)
    (out / "results.parquet" / "part-00000.parquet").write_bytes(b"PAR1 earlier rows PAR1")
    (out / "results.jsonl").write_text('{"patient": "earlier"}\n')
    (out / "report.html").write_text("<html>the earlier report</html>")
    (out / "problems.jsonl").write_text('{"file": "earlier.ndjson", "line": 1, "problem": "earlier"}\n')
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("fails", "exit_code", "says"),
    [
        ("status 500", 6, "the export failed on the server"),
        ("status 404", 7, "the export expired or was deleted"),
        ("file 410", 7, "expired on the server"),
    ],
)
@responses.activate
def test_an_export_that_fails_or_expires_leaves_the_previous_results_as_they_were(
    tmp_path, capsys, fails, exit_code, says
):
    from fhir_plugin._cli import main

    before = _previous_results(tmp_path)
    responses.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS})
    where, status = fails.split()
    if where == "status":
        outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
        responses.get(STATUS, status=int(status), json=outcome)
    else:
        responses.get(STATUS, status=200, json=manifest())
        responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
        responses.get(f"{BASE}/Binary/c1", status=int(status))

    assert main(["population", "--server", BASE, "--out", str(tmp_path), "--today", "2026-11-01"]) == exit_code
    assert says in capsys.readouterr().err
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] != "export"} == before  # nothing new, nothing changed
    assert not [p.name for p in (tmp_path / "export").glob("*Condition.ndjson*")]  # the failed file: not even a part


@responses.activate
def test_every_export_request_waits_its_turn_at_the_rate(tmp_path):
    _kickoff_and_poll(responses, manifest())
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=CONDITIONS)
    responses.delete(STATUS, status=202)
    slept: list[float] = []
    pacer = RateLimiter(60, clock=lambda: sum(slept), sleep=slept.append)  # one a second; time is what was slept
    BulkExporter(BASE, tmp_path, max_wait=5, sleep=slept.append, pacer=pacer).run(ExportRequest())
    # kick-off at 0; first poll 1 s later; the poll's own 5 s wait (Retry-After capped); the second poll is
    # already past its slot; then the two files and the DELETE, 1 s apart
    assert len(responses.calls) == 6 and slept == [1.0, 5.0, 1.0, 1.0, 1.0]


@responses.activate
def test_a_429_during_the_export_holds_the_shared_pacer(tmp_path):
    class Pacer:
        def __init__(self):
            self.waits, self.holds = 0, []

        def wait(self):
            self.waits += 1

        def hold_for(self, seconds):
            self.holds.append(seconds)

    responses.get(STATUS, status=429, headers={"Retry-After": "90"})
    responses.get(STATUS, status=200, json=manifest())
    pacer = Pacer()
    BulkExporter(BASE, tmp_path, max_wait=30, sleep=lambda s: None, pacer=pacer).poll(STATUS)
    assert pacer.waits == 2 and pacer.holds == [30]  # Retry-After capped by max_wait, like the poll's own wait


def test_the_population_command_refuses_a_rate_it_cannot_use(tmp_path, capsys):
    from fhir_plugin._cli import main

    out = str(tmp_path / "out")
    assert main(["population", "--ndjson", str(tmp_path), "--out", out, "--max-requests-per-minute", "60"]) == 2
    assert "--max-requests-per-minute applies to --server" in capsys.readouterr().err
    assert main(["population", "--server", BASE, "--out", out, "--max-requests-per-minute", "0"]) == 2
    assert "--max-requests-per-minute must be a positive number, not 0" in capsys.readouterr().err
    # a write rate that cannot work is refused before any export or Spark job, not after them
    assert main(["population", "--server", BASE, "--out", out, "--write", "--max-writes-per-minute", "0"]) == 2
    assert "--max-writes-per-minute must be a positive number, not 0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "export").exists()


class _CutOff(io.RawIOBase):
    """A response body that breaks off after ``keep`` bytes, as a dropped connection does mid-file."""

    def __init__(self, data: bytes, keep: int) -> None:
        self._data, self._keep, self._at = data, keep, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self._at >= self._keep:
            raise ConnectionResetError("connection reset by peer")
        n = min(len(buffer), self._keep - self._at)
        buffer[:n] = self._data[self._at : self._at + n]
        self._at += n
        return n


@responses.activate
def test_a_file_cut_off_mid_download_goes_on_from_its_part_in_the_same_run(tmp_path):
    body = CONDITIONS.encode() * 1000  # more than one chunk: the first is on disk when the connection drops
    cut = 1 << 16
    _kickoff_and_poll(responses, manifest(requires_token=False))
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=io.BufferedReader(_CutOff(body, cut)))
    responses.get(
        f"{BASE}/Binary/c1",
        status=206,
        body=body[cut:],
        match=[responses.matchers.header_matcher({"Range": f"bytes={cut}-"})],
    )
    responses.delete(STATUS, status=202)
    exporter = BulkExporter(BASE, tmp_path, sleep=lambda s: None)
    files, _ = exporter.run(ExportRequest())

    assert files[1].read_bytes() == body
    assert exporter.kickoffs == 1 and not list(tmp_path.glob("*.part"))


@responses.activate
def test_a_dropped_connection_while_polling_is_polled_again_and_too_many_end_the_run(tmp_path):
    responses.get(f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS})
    responses.get(STATUS, body=requests.ConnectionError("connection reset"))
    responses.get(STATUS, body=requests.ConnectionError("connection reset"))
    responses.get(STATUS, status=200, json=manifest(requires_token=False))
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=CONDITIONS)
    responses.delete(STATUS, status=202)
    waits: list[float] = []
    files, _ = BulkExporter(BASE, tmp_path, sleep=waits.append).run(ExportRequest())
    assert len(files) == 2 and waits == [1.0, 2.0]  # one export; 1 s, then 2 s between the tries

    responses.reset()
    responses.get(STATUS, body=requests.ConnectionError("connection reset"))
    with pytest.raises(TransportError, match="run again to keep waiting for the same export"):
        BulkExporter(BASE, tmp_path / "again", max_wait=4, sleep=waits.append).poll(STATUS)
    assert len(responses.calls) == 6 and waits[2:] == [1.0, 2.0, 4.0, 4.0, 4.0]  # capped by max_wait


@responses.activate
def test_a_kickoff_told_later_is_sent_again_but_a_lost_one_is_not(tmp_path):
    """A 429 (or a gateway's 503) refused the kick-off, so sending it again starts one export; a kick-off whose
    connection dropped may have started one, so it is not sent twice."""
    responses.get(f"{BASE}/Patient/$export", status=429, headers={"Retry-After": "3"})
    responses.get(f"{BASE}/Patient/$export", status=503)
    _kickoff_and_poll(responses, manifest(requires_token=False))
    waits: list[float] = []
    exporter = BulkExporter(BASE, tmp_path, max_wait=5, sleep=waits.append, clock=lambda: sum(waits))
    assert exporter.kickoff(ExportRequest()) == STATUS
    assert exporter.kickoffs == 1 and waits == [3.0, 2.0]  # Retry-After; then none given: 2 s, the second try

    responses.reset()
    responses.get(f"{BASE}/Patient/$export", body=requests.ConnectionError("connection reset"))
    with pytest.raises(TransportError):
        BulkExporter(BASE, tmp_path / "lost", sleep=waits.append).kickoff(ExportRequest())
    assert len(responses.calls) == 1


@responses.activate
def test_a_busy_download_is_fetched_again_and_a_delete_that_cannot_be_sent_is_asked_next_run(tmp_path):
    _kickoff_and_poll(responses, manifest(requires_token=False))
    responses.get(f"{BASE}/Binary/p1", status=503, headers={"Retry-After": "2"})
    responses.get(f"{BASE}/Binary/p1", body=PATIENTS)
    responses.get(f"{BASE}/Binary/c1", body=CONDITIONS)
    responses.delete(STATUS, body=requests.ConnectionError("connection reset"))
    files, _ = BulkExporter(BASE, tmp_path, sleep=lambda s: None).run(ExportRequest())
    assert [p.read_text() for p in files] == [PATIENTS, CONDITIONS]  # the results stand without the delete
    assert json.loads((tmp_path / "export.json").read_text())["deleted"] is False

    responses.reset()
    responses.delete(STATUS, status=202)
    again = BulkExporter(BASE, tmp_path, sleep=lambda s: None)
    again.run(ExportRequest())
    assert [c.request.method for c in responses.calls] == ["DELETE"]  # nothing fetched again, only the delete
    assert json.loads((tmp_path / "export.json").read_text())["deleted"] is True
