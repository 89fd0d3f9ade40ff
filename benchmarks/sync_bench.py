"""Throughput and memory of ``fhir-plugin sync`` on the local HAPI.

    .venv/bin/python benchmarks/sync_bench.py [--server URL | --port 18095] [--patients 1000]
        [--concurrency 1 4 8] [--memory-patients 5000] [--out results.json]

What it does:

1. loads synthetic patients (the cases over and over, as ``many_patients``
   does, ids moved under a prefix per set with ``renamed_case``) in sets of ``--patients``, one Group per set; a set whose
   Group is already on the server is not loaded again;
2. for each concurrency level, a ``--write`` run over its own fresh set, so
   every level does the same work (read, check, draft, one transaction that
   creates 7 drafts, or none when the code does not fit);
3. memory: two dry runs at concurrency 4, one over ``--patients`` and one over
   ``--memory-patients`` (a Group of several sets), each in its own process.

Each run is a separate Python process (``--one``), so ``ru_maxrss`` is that
run's peak.  Measured per run: wall time of ``run_sync`` (selection included),
patients/s, the time requests spent inside the HTTP adapter (summed over
threads), the share of the workers' time outside HTTP waits,
``1 - http / (wall × concurrency)``, process CPU time, peak RSS, and the RSS
growth over the warmed-up baseline (profile and ICD-10-CM data loaded).
With ``--tracemalloc`` the Python heap's peak too (slower).  Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
AS_OF = date(2026, 11, 26)


# ---------------------------------------------------------------- loading


def _group_size(base: str, group: str) -> int:
    answer = requests.get(f"{base}/Group/{group}", timeout=60)
    return len(answer.json().get("member") or []) if answer.status_code == 200 else -1


def load_set(base: str, prefix: str, n: int, chunk: int = 50) -> str:
    """``n`` patients under ids ``fp-<prefix>-NNNN-<case>``, and the Group ``<prefix>`` of them."""
    from fhir_plugin import synthetic
    from sandbox.testing import put_group

    if _group_size(base, prefix) == n:
        return prefix
    started = time.monotonic()
    batch: list[Any] = []
    ids: list[str] = []

    def flush() -> None:
        cases = [synthetic.SyntheticCase(r[0]["id"], "", r[0]["id"], r, None, {}) for r in batch]
        synthetic.load_into_server(base, cases, timeout=900)
        batch.clear()

    cases = synthetic.generate_cases(AS_OF)
    for i in range(n):  # as synthetic.many_patients does, with each set under its own ids
        resources = synthetic.renamed_case(cases[i % len(cases)], f"{prefix}-{i + 1:04d}").resources
        ids.append(next(r["id"] for r in resources if r["resourceType"] == "Patient"))
        batch.append(resources)
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    put_group(base, prefix, ids, timeout=300)
    print(f"  loaded {n} patients as Group/{prefix} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return prefix


def union_group(base: str, name: str, groups: list[str]) -> str:
    members = []
    for group in groups:
        members += requests.get(f"{base}/Group/{group}", timeout=60).json()["member"]
    requests.put(
        f"{base}/Group/{name}",
        json={"resourceType": "Group", "id": name, "type": "person", "actual": True, "member": members},
        timeout=300,
    ).raise_for_status()
    return name


# ---------------------------------------------------------------- one measured run (its own process)


def _status_mb(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    import tracemalloc

    from fhir_plugin import check, load_profile, synthetic
    from fhir_plugin._checkpoint import Checkpoint
    from fhir_plugin._client import FhirClient
    from fhir_plugin._record import records_from_bundle
    from fhir_plugin._sync import Selection, SyncOptions, run_sync

    class TimingAdapter(requests.adapters.HTTPAdapter):
        """Adds up the time every request spends in the adapter: connecting, sending, waiting, reading."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.seconds = 0.0
            self.calls = 0
            self.lock = threading.Lock()

        def send(self, *a: Any, **kw: Any) -> requests.Response:
            started = time.perf_counter()
            try:
                response = super().send(*a, **kw)
                _ = response.content  # the body is read here, not later in our code
                return response
            finally:
                with self.lock:
                    self.seconds += time.perf_counter() - started
                    self.calls += 1

    concurrency = args.concurrency[0]
    profile = load_profile("M62.561")
    warm = synthetic.generate_cases(AS_OF)[0]  # loads the ICD-10-CM data and the models before the baseline
    check(records_from_bundle(warm.resources)[0], profile, today=AS_OF)
    baseline = _status_mb("VmRSS") or 0.0
    peak_reset = _reset_peak()
    if args.tracemalloc:
        tracemalloc.start()
    session = requests.Session()
    adapter = TimingAdapter(pool_maxsize=max(10, concurrency + 2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(os.devnull, "w") as out,
        Checkpoint(Path(tmp) / "state.sqlite") as checkpoint,
        FhirClient(args.server, session=session, timeout=120) as client,
    ):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = run_sync(
            client,
            checkpoint,
            SyncOptions(Selection(group=args.group), args.write, concurrency, AS_OF),
            profile=profile,
            out=out,
        )
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    traced = tracemalloc.get_traced_memory()[1] / 2**20 if args.tracemalloc else None
    return {
        "group": args.group,
        "write": args.write,
        "concurrency": concurrency,
        "patients": result.total,
        "statuses": result.counts,
        "created": result.created,
        "existing": result.existing,
        "wall_s": round(wall, 2),
        "patients_per_s": round(result.total / wall, 2),
        "http_s": round(adapter.seconds, 2),
        "http_calls": adapter.calls,
        "outside_http_share": round(1 - adapter.seconds / (wall * concurrency), 3),
        "cpu_s": round(cpu, 2),
        "cpu_per_patient_ms": round(1000 * cpu / max(1, result.total), 1),
        "baseline_rss_mb": round(baseline, 1),
        # the peak since the baseline when /proc allows resetting it, else the process's lifetime peak
        "peak_rss_mb": round(
            (_status_mb("VmHWM") if peak_reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            1,
        ),
        "rss_growth_mb": round((_status_mb("VmHWM") if peak_reset else 0.0) - baseline, 1) if peak_reset else None,
        "traced_peak_mb": round(traced, 1) if traced is not None else None,
    }


def measure(server: str, group: str, concurrency: int, *, write: bool, trace: bool = False) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--one",
        "--server",
        server,
        "--group",
        group,
        "--concurrency",
        str(concurrency),
    ]
    command += (["--write"] if write else []) + (["--tracemalloc"] if trace else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the whole benchmark


def _row(label: str, r: dict[str, Any]) -> str:
    traced = f"{r['traced_peak_mb']:.1f}" if r.get("traced_peak_mb") is not None else "-"
    return (
        f"| {label} | {r['patients']} | {r['concurrency']} | {r['created']}/{r['existing']} | {r['wall_s']:.1f} | "
        f"**{r['patients_per_s']:.1f}** | {r['http_calls']} | {100 * r['outside_http_share']:.0f} % | "
        f"{r['cpu_per_patient_ms']:.0f} | {r['baseline_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
        f"{r['rss_growth_mb'] if r['rss_growth_mb'] is not None else '-'} | {traced} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="FHIR base URL (default: start the sandbox HAPI on --port)")
    parser.add_argument("--port", type=int, default=18095)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument(
        "--memory-patients", type=int, default=5000, help="the larger dry run for the memory comparison (0: skip)"
    )
    parser.add_argument("--out", help="write the results as JSON here too")
    # one measured run, in a process of its own
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args)))
        return 0

    from _hapi import fhir_server

    n = args.patients
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": [],
    }
    with fhir_server(args.server, args.port) as base:
        rows = []
        for c in args.concurrency:
            group = load_set(base, f"bench{n}w{c}", n)
            r = measure(base, group, c, write=True)
            results["runs"].append({"label": "write", **r})
            rows.append(_row("write", r))
            print(rows[-1], file=sys.stderr)
        again = measure(base, f"bench{n}w{args.concurrency[-1]}", args.concurrency[-1], write=True)
        results["runs"].append({"label": "write again", **again})
        rows.append(_row("write again (all exist)", again))
        print(rows[-1], file=sys.stderr)
        small = measure(base, f"bench{n}w{args.concurrency[0]}", 4, write=False, trace=True)
        results["runs"].append({"label": "dry run", **small})
        rows.append(_row("dry run + tracemalloc", small))
        print(rows[-1], file=sys.stderr)
        if args.memory_patients:
            groups = [f"bench{n}w{c}" for c in args.concurrency]
            extra = 0
            while len(groups) * n < args.memory_patients:
                extra += 1
                groups.append(load_set(base, f"bench{n}x{extra}", n))
            big = union_group(base, f"bench{n}all{len(groups)}", groups[: args.memory_patients // n])
            large = measure(base, big, 4, write=False, trace=True)
            results["runs"].append({"label": "dry run, large", **large})
            rows.append(_row("dry run + tracemalloc", large))
            print(rows[-1], file=sys.stderr)
    header = (
        "| run | patients | concurrency | drafts created/existing | wall s | patients/s | HTTP requests | "
        "workers' time outside HTTP | CPU ms/patient | RSS before MB | peak RSS MB | peak growth MB | "
        "traced peak MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(results["machine"])
    print(header)
    print("\n".join(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
