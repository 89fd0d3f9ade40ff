"""A real Bulk Data ``$export`` from the sandbox HAPI feeds the population job; a job SIGKILLed during download
and during write-back resumes without a second export and without a duplicate draft (counted on HAPI).

The killed jobs are real ``fhir-plugin population`` processes.  ``BulkProxy``, a small HTTP server of this
file between the job and HAPI, counts the ``$export`` kick-offs and the files fetched, and holds one answer on
cue so that the kill lands at a known point: the second NDJSON file half sent (the first one finished and
recorded in ``export.json``), or a transaction carried out by HAPI whose answer the job never gets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests

from fhir_plugin._cli import main
from fhir_plugin._vocab import DRAFT_TAG
from fhir_plugin.synthetic import generate_cases, load_into_server, renamed_case
from sandbox.testing import forwarding_handler, needing_drafts, put_group

pytestmark = [pytest.mark.server, pytest.mark.spark]

TODAY = dt.date(2026, 11, 1)
REPO = Path(__file__).resolve().parent.parent
#: the killed jobs' patients: a few, some whose drafts are allowed and some refused (a code that does not fit)
KILL_KEYS = (
    "complete",
    "missing-onset",
    "missing-severity",
    "excludes1",
    "left-lower-leg",
    "flag-fever",
    "insufficient",
    "missing-follow-up",
)
DRAFT_TYPES = ("Condition", "CarePlan", "Goal")  # the drafts with a patient search parameter


def _load_group(base: str, prefix: str, keys: tuple[str, ...] | None = None) -> tuple[str, list[Any]]:
    """The synthetic cases (or those named) under fresh ids, loaded into HAPI, as the members of a new Group.

    Each record still needs its drafts (SPEC §7.1: no clinician plan, the chart coded M62.56), so the
    write-back has patients to write.
    """
    tag = prefix + uuid.uuid4().hex[:6]
    cases = [
        dataclasses.replace(c, resources=needing_drafts(c.resources))
        for c in (
            renamed_case(c, tag)
            for c in generate_cases(TODAY)
            if not c.encounter_id and (keys is None or c.key in keys)
        )
    ]
    load_into_server(base, cases)
    group_id = f"fp-{tag}-group"
    put_group(base, group_id, [c.patient_id for c in cases])
    return group_id, cases


@pytest.fixture(scope="module")
def group(sandbox_hapi_url):
    """Every synthetic case (without a named encounter), as a new Group on HAPI."""
    return _load_group(sandbox_hapi_url, "bk")


def _population(base, group_id, out, *extra):
    return main(
        [
            "population",
            "--server",
            base,
            "--group",
            group_id,
            "--out",
            str(out),
            "--today",
            TODAY.isoformat(),
            "--max-poll-wait",
            "1",
            *extra,
        ]
    )


def test_a_real_export_feeds_the_job_and_every_row_equals_the_cli_report(
    sandbox_hapi_url, group, spark, tmp_path, capsys
):
    group_id, cases = group
    assert _population(sandbox_hapi_url, group_id, tmp_path) == 1  # gaps found: exit 1
    capsys.readouterr()
    rows = {r["patient"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert sorted(rows) == sorted(c.patient_id for c in cases)
    state = json.loads((tmp_path / "export" / "export.json").read_text())
    assert state["deleted"] is True and len(state["done"]) == len(state["manifest"]["output"]) >= 5

    args = ["check", "--server", sandbox_hapi_url, "--format", "json", "--today", TODAY.isoformat()]
    for case in cases:
        args += ["--patient", case.patient_id]
    main(args)
    reports = json.loads(capsys.readouterr().out)
    assert len(reports) == len(cases)
    for report in reports:
        row = rows[report["patient"].removeprefix("Patient/")]  # the report names a reference, the row an id
        assert row["encounter"] == report["encounter"]
        assert row["statuses"] == {e["id"]: e["status"] for e in report["elements"]}
        assert row["flag_statuses"] == {f["id"]: f["status"] for f in report["red_flags"]}
        assert row["code_fit"] == report["code_fit"]["status"]
        assert row["suggested"] == sorted(s["code"] for s in report["code_fit"]["suggested"])
        assert row["complete"] is report["complete"]
        assert row["referral"] is report["referral_recommended"]
    page = (tmp_path / "report.html").read_text()
    assert f"{len(cases)} patients from a Bulk Data export" in page


# ---------------------------------------------------------------- real kills: the proxy, the job as a process


class BulkProxy:
    """Forwards ``/fhir/...`` to HAPI; counts kick-offs, file downloads and transactions; holds one answer on cue.

    ``hold_download = n``: the n-th NDJSON file is answered with its headers and first half, then nothing.
    ``hold_transaction = n``: HAPI carries out the n-th transaction; its answer is held.
    Either way ``held`` is set once the job is stuck there, and the answer stays held until ``release``.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.kickoffs = self.downloads = self.transactions = 0
        self.hold_download: int | None = None
        self.hold_transaction: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), forwarding_handler(self.handle))
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _count(self, method: str, path: str, body: bytes) -> str | None:
        """Count the request; the kind to hold when it is the one asked for."""
        with self.lock:
            if method == "GET" and path.endswith("/$export"):
                self.kickoffs += 1
            elif method == "GET" and "/Binary/" in path:
                self.downloads += 1
                return "download" if self.downloads == self.hold_download else None
            elif method == "POST" and path.rstrip("/") == "/fhir" and b'"transaction"' in body:
                self.transactions += 1
                return "transaction" if self.transactions == self.hold_transaction else None
        return None

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        hold = self._count(method, unquote(urlsplit(h.path).path), body)
        kept = ("content-type", "accept", "prefer", "cache-control", "authorization", "range")
        headers = {k: v for k, v in h.headers.items() if k.lower() in kept}
        upstream_root = self.upstream[: -len("/fhir")]
        answer = requests.request(method, upstream_root + h.path, data=body or None, headers=headers, timeout=300)
        if hold == "transaction":  # carried out on HAPI; the job never hears of it
            self._hold(h)
            return
        content = answer.content.replace(self.upstream.encode(), self.base.encode())
        h.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() in ("content-type", "content-location", "location", "retry-after", "x-progress"):
                h.send_header(name, value.replace(self.upstream, self.base))
        h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        if hold == "download":
            h.wfile.write(content[: len(content) // 2])
            h.wfile.flush()
            self._hold(h)
            return
        h.wfile.write(content)

    def _hold(self, h: BaseHTTPRequestHandler) -> None:
        self.held.set()
        self.release.wait(900)
        h.close_connection = True


@pytest.fixture
def jobs():
    """The population processes a test starts: any still running when it ends (a failed test) is SIGKILLed."""
    started: list[subprocess.Popen] = []
    yield started
    for job in started:
        if job.poll() is None:
            _kill(job)


def _start(
    jobs: list[subprocess.Popen], base: str, group_id: str, out: Path, log: Path, *extra: str
) -> subprocess.Popen:
    """``fhir-plugin population`` as its own process (and process group), Spark in local mode on one core."""
    args = ["--server", base, "--group", group_id, "--out", str(out), "--today", TODAY.isoformat()]
    args += ["--max-poll-wait", "1", "--master", "local[1]", *extra]
    with open(log, "w") as fh:
        jobs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fhir_plugin._cli", "population", *args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(os.environ, PYSPARK_PYTHON=sys.executable),
            )
        )
    return jobs[-1]


def _finish(job: subprocess.Popen, log: Path, timeout: float = 900) -> tuple[int, str]:
    try:
        code = job.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(job)
        raise
    return code, log.read_text(errors="replace")


def _kill(job: subprocess.Popen) -> None:
    """SIGKILL the job and everything it started (its Spark JVM): no handler, no clean-up runs."""
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(60)


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def _count_on(base: str, rtype: str, query: str) -> int:
    answer = requests.get(f"{base}/{rtype}?{query}&_summary=count", headers={"Cache-Control": "no-cache"}, timeout=60)
    answer.raise_for_status()
    return int(answer.json()["total"])


def _drafts_on_hapi(base: str, patient: str) -> dict[str, int]:
    """The plugin's drafts (by tag) HAPI holds for one patient, per type."""
    tag = f"_tag={DRAFT_TAG['system']}|{DRAFT_TAG['code']}"
    return {rtype: _count_on(base, rtype, f"patient={patient}&{tag}") for rtype in DRAFT_TYPES}


def _searchable(if_none_exist: str) -> str:
    """A conditional-create key as a search outside its transaction: a ``urn:uuid`` (the Provenance's target)
    names nothing there, and the rest of the key is unique on its own."""
    return "&".join(part for part in if_none_exist.split("&") if "=urn:uuid:" not in part)


def test_killed_during_download_resumes_the_same_export_and_gives_the_uninterrupted_rows(
    sandbox_hapi_url, spark, tmp_path, capsys, jobs
):
    group_id, cases = _load_group(sandbox_hapi_url, "dl", KILL_KEYS)
    assert _population(sandbox_hapi_url, group_id, tmp_path / "whole") == 1  # the uninterrupted run
    capsys.readouterr()
    whole = _rows(tmp_path / "whole")
    assert sorted(r["patient"] for r in whole) == sorted(c.patient_id for c in cases)

    proxy = BulkProxy(sandbox_hapi_url)
    out, export = tmp_path / "killed", tmp_path / "killed" / "export"
    try:
        proxy.hold_download = 2  # the first file finished, the second half sent
        job = _start(jobs, proxy.base, group_id, out, tmp_path / "killed.log")
        assert proxy.held.wait(600), (tmp_path / "killed.log").read_text()[-3000:]
        state = json.loads((export / "export.json").read_text())
        files = len(state["manifest"]["output"])
        assert len(state["done"]) == 1 < files  # killed after the first file, before the download ends
        assert (export / state["done"][0]).stat().st_size > 0
        _kill(job)
        assert job.returncode == -signal.SIGKILL
        proxy.release.set()
        assert proxy.kickoffs == 1
        assert not [n for n in ("results.parquet", "results.jsonl", "report.html") if (out / n).exists()]
        downloads_before = proxy.downloads

        code, log = _finish(_start(jobs, proxy.base, group_id, out, tmp_path / "resumed.log"), tmp_path / "resumed.log")
        assert code == 1, log[-3000:]  # gaps found: exit 1
        assert proxy.kickoffs == 1  # the same command resumed the recorded export: no second kick-off
        assert proxy.downloads - downloads_before == files - 1  # and fetched only the files not finished
    finally:
        proxy.stop()
    resumed = json.loads((export / "export.json").read_text())
    assert resumed["status_url"] == state["status_url"] and resumed["deleted"] is True
    assert len(resumed["done"]) == files
    assert _rows(out) == whole  # the rows of the uninterrupted run


def test_killed_during_write_back_resumes_without_exporting_again_or_a_duplicate_draft(
    sandbox_hapi_url, tmp_path, jobs
):
    group_id, cases = _load_group(sandbox_hapi_url, "wb", KILL_KEYS)
    patients = [c.patient_id for c in cases]
    k = 2  # patients written and logged before the kill
    proxy = BulkProxy(sandbox_hapi_url)
    out = tmp_path / "out"
    try:
        proxy.hold_transaction = k + 1  # HAPI carries out the (k+1)-th patient's drafts; the job never hears
        job = _start(jobs, proxy.base, group_id, out, tmp_path / "killed.log", "--write")
        assert proxy.held.wait(900), (tmp_path / "killed.log").read_text()[-3000:]
        on_hapi = {p: sum(_drafts_on_hapi(sandbox_hapi_url, p).values()) for p in patients}
        assert sum(1 for n in on_hapi.values() if n) == k + 1  # counted on HAPI: k+1 patients have drafts
        with sqlite3.connect(out / "writeback.sqlite") as db:
            assert db.execute("SELECT count(*) FROM written").fetchone()[0] == k  # the job logged k
        _kill(job)
        assert job.returncode == -signal.SIGKILL
        proxy.release.set()
        assert proxy.kickoffs == 1

        code, log = _finish(
            _start(
                jobs, proxy.base, group_id, out, tmp_path / "resumed.log", "--write", "--max-writes-per-minute", "6000"
            ),
            tmp_path / "resumed.log",
        )
        assert code == 1, log[-3000:]
        assert proxy.kickoffs == 1  # no second export
        assert f"{k} written by an earlier run" in log
    finally:
        proxy.stop()

    import pyarrow.parquet as pq

    rows = pq.read_table(out / "results.parquet", columns=["patient", "drafts_allowed", "drafts"]).to_pylist()
    assert sorted(r["patient"] for r in rows) == sorted(patients)
    allowed = [r for r in rows if r["drafts_allowed"]]
    refused = [r["patient"] for r in rows if not r["drafts_allowed"]]
    assert len(allowed) > k + 1 and refused  # some written after the kill, some never to be written
    for row in allowed:
        entries = json.loads(row["drafts"])["entry"]
        for entry in entries:  # every draft identifier exactly once on HAPI: nothing missing, nothing twice
            rtype, key = entry["request"]["url"], _searchable(entry["request"]["ifNoneExist"])
            assert _count_on(sandbox_hapi_url, rtype, key) == 1, f"{rtype}?{key} of {row['patient']}"
        wanted = {t: sum(1 for e in entries if e["request"]["url"] == t) for t in DRAFT_TYPES}
        assert _drafts_on_hapi(sandbox_hapi_url, row["patient"]) == wanted  # and no other draft of theirs
    for patient in refused:
        assert sum(_drafts_on_hapi(sandbox_hapi_url, patient).values()) == 0
