"""The local Spark JVM's class-data-sharing archive: recorded once, adopted when finished, used afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fhir_plugin._population import _jvm_cds
from fhir_plugin._population._jvm_cds import CDS_SWITCH, cds_options


@pytest.fixture
def spark_home(tmp_path):
    jars = tmp_path / "spark" / "jars"
    jars.mkdir(parents=True)
    (jars / "spark-core.jar").write_bytes(b"x" * 10)
    return tmp_path / "spark"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("FHIR_PLUGIN_CACHE", str(folder))
    monkeypatch.delenv(CDS_SWITCH, raising=False)
    return folder


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _settled(path: Path) -> None:
    old = time.time() - 60
    os.utime(path, (old, old))


def test_without_an_archive_the_jvm_records_one_under_its_drivers_own_name(spark_home, cache):
    options = cds_options(spark_home, "-XX:+UseSerialGC", pid=4242)
    assert options.startswith("-XX:ArchiveClassesAtExit=")
    recording = Path(options.split()[0].split("=", 1)[1])
    assert recording.parent == cache and recording.name.endswith(".4242.part")
    assert "-Xlog:cds*=off" in options  # the JVM's CDS messages would land in the command's output


def test_a_finished_recording_is_adopted_and_then_used(spark_home, cache):
    pid = _dead_pid()
    recording = Path(cds_options(spark_home, pid=pid).split()[0].split("=", 1)[1])
    recording.write_bytes(b"archive")
    _settled(recording)
    options = cds_options(spark_home)
    archive = Path(options.split()[0].split("=", 1)[1])
    assert options.startswith("-XX:SharedArchiveFile=")
    assert archive.read_bytes() == b"archive" and not recording.exists()
    assert cds_options(spark_home) == options  # stable: the next start uses the same archive


def test_a_recording_still_being_written_is_left_alone(spark_home, cache):
    # the driver is alive (this process), or its JVM wrote the file a moment ago
    mine = Path(cds_options(spark_home, pid=os.getpid()).split()[0].split("=", 1)[1])
    mine.write_bytes(b"half")
    _settled(mine)
    fresh = Path(cds_options(spark_home, pid=_dead_pid()).split()[0].split("=", 1)[1])
    fresh.write_bytes(b"half")
    assert cds_options(spark_home).startswith("-XX:ArchiveClassesAtExit=")
    assert mine.exists() and fresh.exists()


def test_an_empty_recording_is_dropped_and_a_new_one_made(spark_home, cache):
    empty = Path(cds_options(spark_home, pid=_dead_pid()).split()[0].split("=", 1)[1])
    empty.write_bytes(b"")
    _settled(empty)
    assert cds_options(spark_home).startswith("-XX:ArchiveClassesAtExit=")
    assert not empty.exists()


def test_other_jars_or_options_need_their_own_archive(spark_home, cache):
    first = cds_options(spark_home, "-XX:+UseSerialGC", pid=1)
    assert cds_options(spark_home, "-XX:+UseParallelGC", pid=1) != first
    (spark_home / "jars" / "spark-sql.jar").write_bytes(b"y")
    assert cds_options(spark_home, "-XX:+UseSerialGC", pid=1) != first


def test_the_same_jars_installed_elsewhere_need_their_own_archive(spark_home, cache, tmp_path):
    """The JVM checks the class path by path (and each jar's time): an archive recorded in another
    virtual environment is refused, so another install records its own."""
    first = cds_options(spark_home, pid=1)
    elsewhere = tmp_path / "other-venv" / "spark"
    shutil.copytree(spark_home, elsewhere)
    assert cds_options(elsewhere, pid=1) != first
    jar = spark_home / "jars" / "spark-core.jar"
    os.utime(jar, (1_000_000, 1_000_000))  # the same jar, rewritten
    assert cds_options(spark_home, pid=1) != first


def test_the_cache_keeps_the_archives_used_last(spark_home, cache):
    cache.mkdir()
    olds = []
    for age, key in enumerate("abcde"):
        old = cache / f"spark-jvm-{key}.jsa"
        old.write_bytes(b"archive")
        os.utime(old, (time.time() - 3600 * (age + 1),) * 2)  # a used an hour ago … e five hours ago
        olds.append(old)
    stale = cache / "spark-jvm-f.123.part"  # another install's recording, never adopted
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    options = cds_options(spark_home, pid=_dead_pid())  # this install records its own
    left = sorted(p.name for p in cache.glob("spark-jvm-*.jsa"))
    assert left == ["spark-jvm-a.jsa", "spark-jvm-b.jsa"]  # with this install's, to come: three kept
    assert not stale.exists()
    recording = Path(options.split()[0].split("=", 1)[1])
    recording.write_bytes(b"archive")
    _settled(recording)
    used = Path(cds_options(spark_home).split()[0].split("=", 1)[1])
    assert used.exists() and time.time() - used.stat().st_mtime < 60  # touched: used last, pruned last


def test_switched_off_or_without_java_or_a_writable_cache_nothing_is_added(spark_home, cache, monkeypatch, tmp_path):
    monkeypatch.setenv(CDS_SWITCH, "0")
    assert cds_options(spark_home) == ""
    monkeypatch.delenv(CDS_SWITCH)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FHIR_PLUGIN_CACHE", str(blocker / "cache"))
    assert cds_options(spark_home) == ""
    monkeypatch.setattr(_jvm_cds, "_java", lambda: None)
    assert cds_options(spark_home) == ""


@pytest.mark.spark
def test_a_real_spark_jvm_records_the_archive_and_the_next_job_runs_on_it(tmp_path):
    """Two real local jobs in their own processes: the first records, the second maps the archive."""
    env = dict(os.environ, FHIR_PLUGIN_CACHE=str(tmp_path / "cache"))
    env.pop(CDS_SWITCH, None)
    job = (
        "import sys; from fhir_plugin._population._job import spark_session, SparkSettings; "
        "s = spark_session(SparkSettings(master='local[1]')); "
        "print(s.sparkContext.getConf().get('spark.driver.extraJavaOptions')); "
        "print(s.range(5).selectExpr('sum(id)').collect()[0][0]); "
        # the driver JVM (spark-submit execs it): has it mapped the archive?
        "jvm = s.sparkContext._gateway.proc.pid; "
        "print('mapped' if any('spark-jvm-' in l and l.rstrip().endswith('.jsa') for l in open(f'/proc/{jvm}/maps')) else 'not mapped')"
    )
    first = subprocess.run([sys.executable, "-c", job], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "ArchiveClassesAtExit" in first.stdout and first.stdout.splitlines()[-2:] == ["10", "not mapped"]
    assert "cds" not in first.stdout.lower().replace("-xlog:cds*=off", "")  # no JVM message in the output
    # the JVM writes the archive as it exits, just after its driver
    deadline = time.monotonic() + 120
    parts: list[Path] = []
    while time.monotonic() < deadline:
        parts = [p for p in (tmp_path / "cache").glob("*.part") if p.stat().st_size > 0]
        if parts and time.time() - parts[0].stat().st_mtime > 2:
            break
        time.sleep(0.5)
    assert parts, "the first job's JVM wrote no archive"
    _settled(parts[0])
    second = subprocess.run([sys.executable, "-c", job], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "SharedArchiveFile" in second.stdout and second.stdout.splitlines()[-2:] == ["10", "mapped"]
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".jsa"]


def test_another_installs_finished_recordings_are_settled_not_left_for_a_day(spark_home, cache):
    """Jobs started together each record: a CI clone, gone after its run, used to leave its spare recordings
    (186 MB each) in the shared cache for a day.  Any start now settles them: the first becomes that key's
    archive (counted against the archives kept), the spares are dropped; one still being written stays."""
    cache.mkdir()
    first, spare = (cache / f"spark-jvm-clone.{_dead_pid()}.part" for _ in range(2))
    writing = cache / f"spark-jvm-other.{os.getpid()}.part"
    for part in (first, spare, writing):
        part.write_bytes(b"archive")
        _settled(part)
    cds_options(spark_home, pid=_dead_pid())
    assert (cache / "spark-jvm-clone.jsa").read_bytes() == b"archive"
    assert not first.exists() and not spare.exists()
    assert writing.exists()  # its process is running: it may still be writing
    assert not (cache / "spark-jvm-other.jsa").exists()
