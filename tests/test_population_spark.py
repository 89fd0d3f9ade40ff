"""The population job on Spark: local mode with bad lines in the input, and a standalone cluster the test starts."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyspark
import pytest

from fhir_plugin._population._job import ndjson_files, run_population
from sandbox.population import write_ndjson
from sandbox.spark import start_spark_connect, stop
from sandbox.testing import free_port

pytestmark = pytest.mark.spark

TODAY = dt.date(2026, 11, 1)
NOW = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)
N = 80  # more than two cycles of the 36 cases, in two files per type


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ndjson")
    patients = write_ndjson(folder, TODAY, N, file_patients=50)
    # a line that is not JSON, a resource with no patient, and a type the check does not read; then two
    # clinicians' notes, one a patient's (words that would be evidence, were a note ever evidence), one no
    # one's: neither is the plugin's plan note, so both are skipped without a problem (SPEC §7.1)
    first = sorted(patients)[0]
    note = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18776-5"}]},
        "content": [{"attachment": {"contentType": "text/plain", "data": "cGxhbg=="}}],
        "description": "onset three weeks ago; severity 7/10; range of motion reduced; denies fever",
    }
    (folder / "Extra.ndjson").write_text(
        '{"resourceType":"Medication","id":"m1"}\n'
        '{"resourceType": "Observation", "id": \n'
        '{"resourceType":"Condition","id":"orphan","code":{"text":"x"}}\n'
        + json.dumps(dict(note, id="n1", subject={"reference": f"Patient/{first}"}))
        + "\n"
        + json.dumps(dict(note, id="n2"))
        + "\n",
        encoding="utf-8",
    )
    return folder, patients


@pytest.fixture(scope="module")
def local_run(spark, population, tmp_path_factory):
    folder, _ = population
    out = tmp_path_factory.mktemp("out-local")
    return run_population(spark, ndjson_files(folder), out, profile_code="M62.561", today=TODAY, now=NOW)


def _rows(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def test_every_patient_row_is_the_expected_report(local_run, population):
    _, patients = population
    rows = _rows(local_run.jsonl)
    assert [r["patient"] for r in rows] == sorted(patients)  # one row per patient, in patient order
    for row in rows:
        expected = patients[row["patient"]].expected
        assert row["problem"] is None
        assert row["statuses"] == expected["elements"], row["patient"]
        assert row["flag_statuses"] == expected["red_flags"], row["patient"]
        assert row["code_fit"] == expected["code_fit"]
        assert row["suggested"] == expected["suggested"]
        assert row["complete"] is expected["complete"]
        assert row["referral"] is expected["referral_recommended"]
        assert set(row["gaps"]) <= {k for k, v in expected["elements"].items() if v in ("missing", "conflict")}


def test_bad_lines_are_reported_with_file_and_line_and_the_rest_is_checked(local_run):
    assert local_run.problems == [
        {"file": "Extra.ndjson", "line": 2, "problem": local_run.problems[0]["problem"]},
        {
            "file": "Extra.ndjson",
            "line": 3,
            "problem": "Condition/orphan has no subject Patient reference, so it belongs to no record",
        },
    ]
    assert local_run.problems[0]["problem"].startswith("not valid JSON")
    assert local_run.patients == N
    out = local_run.parquet.parent
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "results.parquet"]  # no temporaries left


def test_a_rerun_leaves_only_its_own_problems_beside_its_results(spark, tmp_path, capsys):
    from fhir_plugin._cli import main

    bad, good, out = tmp_path / "bad", tmp_path / "good", tmp_path / "out"
    write_ndjson(good, TODAY, 3)
    write_ndjson(bad, TODAY, 3)
    (bad / "Extra.ndjson").write_text('{"resourceType": "Observation", "id": \n', encoding="utf-8")
    args = ["population", "--out", str(out), "--today", TODAY.isoformat(), "--ndjson"]

    assert main([*args, str(bad)]) == 1
    assert [json.loads(x)["file"] for x in (out / "problems.jsonl").read_text().splitlines()] == ["Extra.ndjson"]
    assert main([*args, str(good)]) == 1  # the same patients, without the bad line
    capsys.readouterr()
    assert not (out / "problems.jsonl").exists()  # the earlier run's problems are not this run's
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.jsonl", "results.parquet"]


def test_a_file_too_large_to_read_whole_is_read_in_pieces_with_the_same_rows_and_lines(spark, tmp_path):
    """A gigabyte NDJSON file (one per type, as Synthea writes) ran the local JVM out of memory when read
    whole. Files past the piece size are cut at line ends: the rows, and each problem's file and line, are
    those of the same files read whole."""
    import shutil

    folder = tmp_path / "ndjson"
    patients = write_ndjson(folder, TODAY, 12, file_patients=12)
    # 3,000 lines of a type the check skips, one of them longer than a piece; then a line that is not JSON
    # and one with no patient
    skipped = '{"resourceType":"Medication","id":"m1"}\n' * 3000
    long_line = '{"resourceType":"Binary","id":"b1","data":"' + "x" * 20_000 + '"}\n'
    bad = '{"resourceType": "Observation", "id": \n{"resourceType":"Condition","id":"orphan"}\n'
    (folder / "Extra.ndjson").write_text(skipped + long_line + bad, encoding="utf-8")
    files = ndjson_files(folder)
    largest = max(f.stat().st_size for f in files)

    def run(name: str, piece_bytes: int):
        out = tmp_path / name
        result = run_population(
            spark, files, out, profile_code="M62.561", today=TODAY, now=NOW, piece_bytes=piece_bytes
        )
        return result, _rows(result.jsonl), out

    whole, whole_rows, _ = run("whole", largest)
    cut, cut_rows, out = run("cut", 16_000)  # the Observation and Extra files in pieces of 16 kB
    assert largest > 16_000 * 3
    assert cut_rows == whole_rows and len(cut_rows) == len(patients)
    assert [(p["file"], p["line"]) for p in whole.problems] == [("Extra.ndjson", 3002), ("Extra.ndjson", 3003)]
    # in pieces of 16 kB the line of 20 kB is not read, and is reported; the other problems are the same
    assert cut.problems[1:] == whole.problems
    assert (cut.problems[0]["file"], cut.problems[0]["line"]) == ("Extra.ndjson", 3001)
    assert cut.problems[0]["problem"] == "a line of 20.0 kB, longer than the 16.0 kB one resource may be; not read"
    assert not (out / ".pieces").exists()  # the pieces are removed with the run
    shutil.rmtree(folder)


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("Job aborted: java.lang.OutOfMemoryError: Java heap space"),  # a task's, Py4J's words
        ConnectionRefusedError(111, "Connection refused"),  # the local JVM died of it under the job
    ],
)
def test_spark_out_of_memory_is_one_sentence_that_says_what_to_do(spark, tmp_path, capsys, monkeypatch, failure):
    """Before, "internal error (Py4JJavaError)" or "(ConnectionRefusedError)". Spark prints its own log; the
    command says what happened and what to change, and the earlier results are left as they were."""
    from fhir_plugin._cli import main
    from fhir_plugin._population import _job

    folder, out = tmp_path / "ndjson", tmp_path / "out"
    write_ndjson(folder, TODAY, 3)

    def out_of_memory(*args, **kwargs):
        raise failure

    monkeypatch.setattr(_job, "run_population", out_of_memory)
    assert main(["population", "--ndjson", str(folder), "--out", str(out), "--today", TODAY.isoformat()]) == 11
    err = capsys.readouterr().err
    assert "the check on Spark ran out of memory or its JVM stopped" in err and "--driver-memory" in err
    assert not (out / "results.parquet").exists()


def test_parquet_holds_the_same_rows(local_run):
    import pyarrow.parquet as pq

    table = pq.read_table(local_run.parquet)
    assert table.num_rows == N
    assert set(table.column_names) >= {
        "patient",
        "encounter",
        "complete",
        "code_fit",
        "gaps",
        "red_flags",
        "referral",
        "drafts_allowed",
    }


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _population_cli(folder: Path, out: Path, *where: str) -> subprocess.CompletedProcess:
    """``fhir-plugin population --ndjson`` as a user runs it, on the Spark that ``where`` names."""
    return subprocess.run(
        [sys.executable, "-m", "fhir_plugin._cli", "population", "--ndjson", str(folder), "--out", str(out), *where]
        + ["--today", TODAY.isoformat()],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYSPARK_PYTHON=sys.executable),
    )


def _assert_same_rows_as_local(done: subprocess.CompletedProcess, out: Path, local_run) -> None:
    assert done.returncode == 1, done.stderr[-3000:]  # 1: the worklist is not empty
    assert f"{N} patients:" in done.stdout
    assert _rows(out / "results.jsonl") == _rows(local_run.jsonl)


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    """One master and two one-core workers from the PySpark distribution, on loopback; stopped at the end."""
    spark_home = Path(pyspark.__file__).parent
    spark_class = str(spark_home / "bin" / "spark-class")
    logs = tmp_path_factory.mktemp("spark-logs")
    env = dict(
        os.environ,
        SPARK_HOME=str(spark_home),
        PYSPARK_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_WORKER_DIR=str(logs / "work"),
    )
    port = free_port()
    master_url = f"spark://127.0.0.1:{port}"
    procs = []

    def start(name, *args):
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed when the cluster stops
        procs.append(
            (
                subprocess.Popen(
                    [spark_class, *args], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                ),
                log,
            )
        )

    try:
        start(
            "master",
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--webui-port",
            str(free_port()),
        )
        _wait_for(lambda: "I have been elected leader" in (logs / "master.log").read_text(), 120, "the master")
        for i in (1, 2):
            start(
                f"worker{i}",
                "org.apache.spark.deploy.worker.Worker",
                master_url,
                "--host",
                "127.0.0.1",
                "--cores",
                "1",
                "--memory",
                "1g",
                "--webui-port",
                str(free_port()),
            )
        _wait_for(
            lambda: all("Successfully registered with master" in (logs / f"worker{i}.log").read_text() for i in (1, 2)),
            120,
            "two workers",
        )
        yield master_url, logs
    finally:
        for proc, log in reversed(procs):
            stop(proc)
            log.close()


def test_a_standalone_cluster_gives_the_same_rows_as_local_mode(standalone_cluster, local_run, population, tmp_path):
    master_url, logs = standalone_cluster
    folder, _ = population
    out = tmp_path / "out-cluster"
    _assert_same_rows_as_local(_population_cli(folder, out, "--master", master_url), out, local_run)
    # the work really ran on the cluster's two workers
    executors = list((logs / "work").glob("app-*/*"))
    assert len(executors) == 2, executors


@pytest.fixture(scope="module")
def spark_connect_server(tmp_path_factory):
    """A Spark Connect server (local[2] inside) from the PySpark distribution, on loopback; stopped at the end."""
    logs = tmp_path_factory.mktemp("connect-logs")
    proc, url = start_spark_connect("local[2]", logs / "connect.log")
    try:
        yield url, logs
    finally:
        stop(proc)


def test_spark_connect_gives_the_same_rows_as_local_mode(spark_connect_server, local_run, population, tmp_path):
    url, _ = spark_connect_server
    folder, _ = population
    out = tmp_path / "out-connect"
    _assert_same_rows_as_local(_population_cli(folder, out, "--remote", url), out, local_run)
    # the same problems as local mode, each with its file and line
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text(encoding="utf-8").splitlines()]
    assert problems == local_run.problems
