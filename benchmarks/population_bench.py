"""Throughput and memory of ``fhir-plugin population`` (NDJSON -> Spark -> Parquet), and export + Spark
against the sync job's per-patient path on the same patients in HAPI.

    .venv/bin/python benchmarks/population_bench.py ndjson --sizes 10000 100000 --cores 1 2 [--cache off on] [--out r.json]
    .venv/bin/python benchmarks/population_bench.py connect --sizes 10000 100000 --cores 1 2
    .venv/bin/python benchmarks/population_bench.py hapi --server http://127.0.0.1:18500/fhir --patients 1000

``ndjson``: writes the synthetic population (``sandbox.population.write_ndjson``, files of
1,000 patients per type) once per size, then for each size and core count runs the whole
command in its own process (``fhir-plugin population --ndjson DIR --master local[C]``), so
Spark's start-up is counted, as a user would see it.  Measured: wall time, patients/s, and
the driver's peak memory: the Python driver's and the driver JVM's ``VmHWM``
(in local mode the JVM also hosts the executors' task threads; the Python workers that run
the check are separate processes, whose peak is reported as the largest one), each the
kernel's ``VmHWM`` sampled every half second.  ``--cache``: each run with the machine's cache
folder (``fhir_plugin._cache``: the ICD-10-CM index and the Spark JVM's class archive, primed
by one small job first) and without it (a folder that cannot be written: the package is
imported and no archive used, as before there was a cache), alternating, so the two compare
in the same run on the same machine.

``connect``: the same job on a running Spark Connect server (``local[C]`` inside), started here
pinned to the first C CPUs with the command beside it on the same CPUs, and warmed by one run of
the first size (a long-lived server has run jobs before): Spark's start and its JVM's warm-up
are paid once, not by each job, as a team running population jobs on a cluster has it.  Memory:
the server JVM's peak (``VmHWM``) and its resident set after each run.

``hapi``: loads ``--patients`` synthetic patients (and a Group of them) into a HAPI that
offers ``$export`` (our sandbox), then times, each as its own command, ``population --server
--group`` (kick-off, poll, download, Spark) and ``sync --group`` (check only, the per-patient
path).  With ``--rate-limit N`` both go through the sandbox EHR in front of that HAPI, metered at
N calls a minute per app (as eClinicalWorks is, at 250), each authenticated as a backend client
(SMART Backend Services, a key made here); the sync job then paces itself under the limit
(``--max-requests-per-minute N``), as an operator runs it against such an EHR.  Not a timed test:
the figures go to docs/benchmarks-population.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TODAY = dt.date(2026, 11, 1)
CLI = [sys.executable, "-m", "fhir_plugin._cli"]


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    kids = [int(x) for x in out.split()]
    return kids + [g for k in kids for g in _children(k)]


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def timed(cmd: list[str]) -> dict:
    """Run ``cmd``; wall time, exit code, and the peak RSS of its driver JVM and Python workers (sampled)."""
    peaks = {"driver_python_kb": 0, "jvm_kb": 0, "worker_kb": 0}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks["driver_python_kb"] = max(peaks["driver_python_kb"], _status_kb(proc.pid, "VmHWM"))
            for pid in _children(proc.pid):
                line = _cmdline(pid)
                hwm = _status_kb(pid, "VmHWM")
                if "java" in line.split(" ")[0]:
                    peaks["jvm_kb"] = max(peaks["jvm_kb"], hwm)
                elif "pyspark" in line or "daemon" in line or "worker" in line:
                    peaks["worker_kb"] = max(peaks["worker_kb"], hwm)
            stop.wait(0.5)

    started = time.perf_counter()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    # VmHWM is the kernel's peak resident set of each process (KiB), sampled every half second; the CPU
    # time is the whole process tree's (each process is reaped by its parent), so it is fair on a busy machine
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": round(wall, 2),
        "exit": proc.returncode,
        "stdout": out[-2000:],
        "stderr_tail": err[-1500:],
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        **peaks,
    }


def _phases(stdout: str) -> dict:
    """The command's own account of its phases: Spark's start, the check (NDJSON to Parquet), the report."""
    import re

    found = re.search(
        r"Spark ready after ([\d.]+) s.*?; the check of (\d+) patients took ([\d.]+) s .*the report ([\d.]+) s", stdout
    )
    if not found:
        return {}
    start, n, job, report = float(found[1]), int(found[2]), float(found[3]), float(found[4])
    export = re.search(r"The export took ([\d.]+) s", stdout)
    return {
        **({"export_s": float(export[1])} if export else {}),
        "spark_start_s": start,
        "job_s": job,
        "report_s": report,
        "job_patients_per_s": round(n / job, 1) if job else None,
    }


#: a cache folder that cannot be made (under a file): the plugin then works as it did without one
NO_CACHE = {"FHIR_PLUGIN_CACHE": "/dev/null/fhir-plugin-cache"}


def _archive_ready(cache: Path) -> bool:
    """Whether a local job would start on an archive in ``cache`` (one for this Java, these jars, these options)."""
    from fhir_plugin._population._job import _LOCAL_JVM_OPTIONS, _spark_home
    from fhir_plugin._population._jvm_cds import cds_options

    saved = os.environ.get("FHIR_PLUGIN_CACHE")
    os.environ["FHIR_PLUGIN_CACHE"] = str(cache)
    try:
        return "SharedArchiveFile" in cds_options(_spark_home(), _LOCAL_JVM_OPTIONS)
    finally:
        if saved is None:
            os.environ.pop("FHIR_PLUGIN_CACHE")
        else:
            os.environ["FHIR_PLUGIN_CACHE"] = saved


def primed_cache(work: Path) -> dict[str, str]:
    """A cache folder with the ICD-10-CM index and the Spark JVM's archive in it, recorded by a small real job."""
    from sandbox.population import write_ndjson

    cache = work / "cache"
    env = {"FHIR_PLUGIN_CACHE": str(cache)}
    if _archive_ready(cache):
        return env
    folder = work / "ndjson-prime"
    write_ndjson(folder, TODAY, 200)
    cmd = [*CLI, "population", "--ndjson", str(folder), "--out", str(work / "out-prime"), "--master", "local[1]"]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: some patients have gaps
        raise RuntimeError(f"the priming job failed: {done.stderr[-2000:]}")
    # the JVM writes the archive as it exits; a later start adopts it once it has been still for 10 s
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        parts = [p for p in cache.glob("*.part") if p.stat().st_size > 0]
        if parts and time.time() - parts[0].stat().st_mtime > 11:
            break
        time.sleep(1)
    return env


def _population_folder(work: Path, size: int) -> Path:
    """The synthetic population of ``size`` patients as NDJSON, written once per work folder."""
    from sandbox.population import write_ndjson

    folder = work / f"ndjson-{size}"
    if not (folder / ".complete").exists():
        t = time.perf_counter()
        write_ndjson(folder, TODAY, size)
        (folder / ".complete").write_text("")
        print(f"wrote {size} patients in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return folder


def bench_ndjson(args: argparse.Namespace) -> list[dict]:
    results = []
    work = Path(args.work or tempfile.mkdtemp(prefix="population-bench-"))
    caches = {"on": primed_cache(work) if "on" in args.cache else {}, "off": NO_CACHE}
    for size in args.sizes:
        folder = _population_folder(work, size)
        for cores, cache in ((c, m) for c in args.cores for m in args.cache):
            out = work / f"out-{size}-{cores}"
            # each run in a fresh process, so RUSAGE_CHILDREN is that run's alone: run this script again
            # the whole process tree (driver, JVM, Python workers) pinned to the first ``cores`` CPUs,
            # so "one core" is one CPU for everything, not one Spark task slot beside a busy JVM
            cmd = [
                *_pinned(cores),
                sys.executable,
                __file__,
                "one",
                "--",
                *CLI,
                "population",
                "--ndjson",
                str(folder),
                "--out",
                str(out),
                "--master",
                f"local[{cores}]",
                "--today",
                TODAY.isoformat(),
            ]
            env = {**os.environ, **caches[cache]}
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
            r.update(
                size=size, cores=cores, cache=cache, patients_per_s=round(size / r["wall_s"], 1), **_phases(r["stdout"])
            )
            print(json.dumps({k: v for k, v in r.items() if k not in ("stdout", "stderr_tail")}), file=sys.stderr)
            results.append(r)
    return results


def _pinned(cores: int) -> list[str]:
    return ["taskset", "-c", ",".join(str(c) for c in range(cores))]


def bench_connect(args: argparse.Namespace) -> list[dict]:
    """The same job on a running Spark Connect server: its start and its JVM's warm-up paid before, once."""
    from sandbox.spark import start_spark_connect, stop

    results = []
    work = Path(args.work or tempfile.mkdtemp(prefix="population-bench-"))
    folders = {size: _population_folder(work, size) for size in args.sizes}
    for cores in args.cores:
        server, url = start_spark_connect(f"local[{cores}]", work / f"connect-{cores}.log", prefix=_pinned(cores))
        try:
            # a long-lived server has run jobs before: one run of the first size warms its JVM and workers
            runs = [("warm-up", args.sizes[0])] + [("measured", size) for size in args.sizes]
            for what, size in runs:
                out = work / f"out-connect-{size}-{cores}"
                cmd = [*_pinned(cores), sys.executable, __file__, "one", "--", *CLI, "population"]
                cmd += ["--ndjson", str(folders[size]), "--out", str(out), "--remote", url]
                cmd += ["--today", TODAY.isoformat()]
                r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
                r.update(
                    run=what,
                    size=size,
                    cores=cores,
                    server_jvm_hwm_kb=_status_kb(server.pid, "VmHWM"),
                    server_jvm_rss_kb=_status_kb(server.pid, "VmRSS"),
                    patients_per_s=round(size / r["wall_s"], 1),
                    **_phases(r["stdout"]),
                )
                print(json.dumps({k: v for k, v in r.items() if k not in ("stdout", "stderr_tail")}), file=sys.stderr)
                if what == "measured":
                    results.append(r)
        finally:
            stop(server)
    return results


def bench_hapi(args: argparse.Namespace) -> list[dict]:
    import requests

    from fhir_plugin.synthetic import load_into_server
    from sandbox.population import population
    from sandbox.testing import put_group

    base = args.server.rstrip("/")
    group_id = f"fp-bench-{args.patients}"
    if requests.get(f"{base}/Group/{group_id}", timeout=60).status_code != 200:
        batch, members = [], []
        from fhir_plugin.synthetic import SyntheticCase

        for patient, resources in population(TODAY, args.patients, prefix="bench"):
            members.append(patient.patient_id)
            batch.append(SyntheticCase(patient.case_key, "", patient.patient_id, resources, None, {}))
            if len(batch) == 100:
                load_into_server(base, batch)
                batch = []
        if batch:
            load_into_server(base, batch)
        put_group(base, group_id, members, timeout=120)
    if args.load_only:
        return []
    work = Path(tempfile.mkdtemp(prefix="population-bench-hapi-"))
    env = {**os.environ, **primed_cache(work)}  # both paths with the machine's cache, as a user has it
    runs = []
    ehr = None
    auth: list[str] = []
    if args.rate_limit:
        ehr, auth = _metered_ehr(base, args.rate_limit, work)
        base = ehr.fhir_base_url

    def export_cmd(out: str) -> list[str]:
        """Each export run in its own folder: a finished export in the folder would be reused, not redone."""
        return [
            *CLI,
            "population",
            "--server",
            base,
            "--group",
            group_id,
            "--out",
            str(work / out),
            "--today",
            TODAY.isoformat(),
            "--max-poll-wait",
            "1",
            *auth,
        ]

    connect = (
        [("export + Spark Connect (a running server: --remote)", [*export_cmd("pop-connect"), "--remote", args.remote])]
        if args.remote
        else []
    )
    for name, cmd in (
        ("export + Spark (population --server --group, local[2])", [*export_cmd("pop-local"), "--master", "local[2]"]),
        *connect,
        (
            "sync job, per-patient reads (sync --group, check only, concurrency 4)",
            [
                *CLI,
                "sync",
                "--server",
                base,
                "--group",
                group_id,
                "--state",
                str(work / "sync.sqlite"),
                "--report",
                str(work / "sync.jsonl"),
                "--today",
                TODAY.isoformat(),
                *auth,
                *(["--max-requests-per-minute", str(args.rate_limit)] if args.rate_limit else []),
            ],
        ),
    ):
        r = json.loads(
            subprocess.run(
                [sys.executable, __file__, "one", "--", *cmd], capture_output=True, text=True, check=True, env=env
            ).stdout
        )
        r.update(
            run=name,
            patients=args.patients,
            patients_per_s=round(args.patients / r["wall_s"], 1),
            **_phases(r["stdout"]),
        )
        if ehr is not None:
            r["ehr_answers"] = _answers(ehr)
        print(json.dumps({k: v for k, v in r.items() if k not in ("stdout", "stderr_tail")}), file=sys.stderr)
        runs.append(r)
    if ehr is not None:
        ehr.stop()
    return runs


def _metered_ehr(upstream: str, per_minute: int, work: Path) -> tuple[object, list[str]]:
    """The sandbox EHR in front of ``upstream``, metering each app at ``per_minute``; the job's auth options."""
    from joserfc.jwk import RSAKey

    from fhir_plugin._backend_auth import load_signing_key
    from sandbox.ehr import Client, start_in_thread

    key = work / "backend.pem"
    key.write_bytes(RSAKey.generate_key(2048, private=True).as_pem(private=True))
    key.chmod(0o600)
    ehr = start_in_thread(upstream, rate_limit=(per_minute, 60.0))
    jwk = load_signing_key(key).public_jwk()
    ehr.clients.register(
        Client("bench", scope=["system/*.read"], token_endpoint_auth_method="private_key_jwt", jwks={"keys": [jwk]})
    )
    return ehr, ["--client-id", "bench", "--key", str(key)]


def _answers(ehr: object) -> dict[str, int]:
    """The EHR's answers so far by status (then forgotten): how many calls were made, and how many refused."""
    answered = ehr.proxy.answered  # type: ignore[attr-defined]
    counts: dict[str, int] = {}
    for _, _, status in answered:
        counts[str(status)] = counts.get(str(status), 0) + 1
    answered.clear()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    # what the NDJSON runs share: local mode (``ndjson``) and a running Connect server (``connect``)
    sized = argparse.ArgumentParser(add_help=False)
    sized.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    sized.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    sized.add_argument("--work", help="folder for the NDJSON and outputs (reused between runs)")
    sized.add_argument("--out", help="results JSON file")
    nd = sub.add_parser("ndjson", parents=[sized])
    nd.add_argument("--cache", nargs="+", choices=["off", "on"], default=["off", "on"])
    sub.add_parser("connect", parents=[sized])
    hp = sub.add_parser("hapi")
    hp.add_argument("--server", required=True)
    hp.add_argument("--patients", type=int, default=1000)
    hp.add_argument("--remote", help="also through this Spark Connect server (sc://HOST:PORT), started beforehand")
    hp.add_argument("--load-only", action="store_true", help="only load the patients and their Group")
    hp.add_argument(
        "--rate-limit", type=int, metavar="N", help="both paths through the sandbox EHR metered at N calls a minute"
    )
    hp.add_argument("--out", help="results JSON file")
    one = sub.add_parser("one")
    one.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.what == "one":
        print(json.dumps(timed([c for c in args.cmd if c != "--"])))
        return
    bench = {"ndjson": bench_ndjson, "connect": bench_connect, "hapi": bench_hapi}[args.what]
    results = bench(args)
    text = json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
