"""Round trips and wall time per patient, ours against a naive client, plus the check's throughput.

    .venv/bin/python benchmarks/core_bench.py [--server URL] [--out docs/benchmarks-core.md]

Both clients run in the same process against the same server, one after the
other, on the same synthetic patients.  Ours: one batch read, one transaction
of conditional creates.  Naive: one GET per resource type, one POST per
resource.  The check's throughput is measured in memory on one core.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _hapi import fhir_server  # noqa: E402
from _latency import delayed  # noqa: E402

from fhir_plugin import DraftsRefused, FhirClient, build_drafts, check, load_profile, write_drafts  # noqa: E402
from fhir_plugin._naive_client import NaiveClient  # noqa: E402
from fhir_plugin._record import records_from_bundle  # noqa: E402
from fhir_plugin.synthetic import generate_cases, large_record, load_into_server, renamed_case  # noqa: E402


def _per_patient(base: str, cases: list, profile, today: date) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("ours_read_rt", "ours_write_rt", "ours_s",
                                                    "naive_read_rt", "naive_write_rt", "naive_s")}
    now = datetime.now(timezone.utc)
    for case in cases:
        with FhirClient(base) as ours:
            t0 = time.perf_counter()
            record = ours.read_patient_record(case.patient_id)
            read_rt = ours.round_trips
            report = check(record, profile, today=today, encounter_id=case.encounter_id)
            try:
                bundle = build_drafts(report, profile, now=now)
            except DraftsRefused:
                continue  # no write to compare for a record whose code does not fit
            write_drafts(ours, bundle)
            out["ours_s"].append(time.perf_counter() - t0)
            out["ours_read_rt"].append(read_rt)
            out["ours_write_rt"].append(ours.round_trips - read_rt)
        with FhirClient(base) as inner:
            naive = NaiveClient(inner)
            t0 = time.perf_counter()
            record = naive.read_patient_record(case.patient_id)
            read_rt = naive.round_trips
            report = check(record, profile, today=today, encounter_id=case.encounter_id)
            bundle = build_drafts(report, profile, now=now)
            naive.write_bundle(bundle)
            out["naive_s"].append(time.perf_counter() - t0)
            out["naive_read_rt"].append(read_rt)
            out["naive_write_rt"].append(naive.round_trips - read_rt)
    return out


def _throughput(record, profile, today: date, encounter_id, seconds: float = 3.0) -> tuple[float, float]:
    """Checks per wall second and per CPU second of this (single-threaded) process.

    The CPU figure is the one-core rate even when other work shares the machine.
    """
    check(record, profile, today=today, encounter_id=encounter_id)  # warm caches (ICD-10-CM data)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or n < 3:
        check(record, profile, today=today, encounter_id=encounter_id)
        n += 1
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="FHIR base URL (default: start the sandbox HAPI)")
    parser.add_argument("--port", type=int, default=18095, help="port for the sandbox HAPI")
    parser.add_argument("--latency", type=float, action="append", default=[], metavar="MS",
                        help="also run behind a proxy adding MS milliseconds per request (repeatable)")
    parser.add_argument("--out", help="also write the results as Markdown to this file")
    args = parser.parse_args()
    today = date.today()
    profile = load_profile("M62.561")
    cases = generate_cases(today)
    runs: list[tuple[float, dict[str, list[float]]]] = []
    with fhir_server(args.server, args.port) as base:
        for latency in [0.0] + args.latency:
            fresh = [renamed_case(c, f"b{int(latency)}") for c in cases]   # new patients per run: nothing written before
            load_into_server(base, fresh)
            with delayed(base, latency) as url:
                runs.append((latency, _per_patient(url, fresh, profile, today)))
    typical = next(c for c in cases if c.key == "complete")
    big = large_record(today, n_observations=2000)
    typical_rate = _throughput(records_from_bundle(typical.resources)[0], profile, today, typical.encounter_id)
    big_rate = _throughput(records_from_bundle(big.resources)[0], profile, today, big.encounter_id)

    lines = [
        f"Run {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.python_implementation()} {platform.python_version()}), server {'given' if args.server else 'sandbox HAPI'}; "
        f"{len(runs[0][1]['ours_s'])} patients written per run (records whose code does not fit are skipped).",
        "",
        "| added latency per request | client | read round trips | write round trips | wall time per patient (median) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for latency, figures in runs:
        med = {k: statistics.median(v) for k, v in figures.items()}
        where = "none (loopback)" if latency == 0 else f"{latency:.0f} ms"
        lines.append(f"| {where} | ours (batch read, one transaction) | {med['ours_read_rt']:.0f} "
                     f"(max {max(figures['ours_read_rt']):.0f}) | {med['ours_write_rt']:.0f} "
                     f"(max {max(figures['ours_write_rt']):.0f}) | {med['ours_s'] * 1000:.1f} ms | "
                     f"**{med['naive_s'] / med['ours_s']:.1f}x** |")
        lines.append(f"| {where} | naive (search per type, POST per resource) | {med['naive_read_rt']:.0f} | "
                     f"{med['naive_write_rt']:.0f} | {med['naive_s'] * 1000:.1f} ms | 1.0x |")
    lines += [
        "",
        "| check in memory, one thread | patients per CPU second (one core) | patients per wall second |",
        "|---|---|---|",
        f"| typical record ({len(typical.resources)} resources) | {typical_rate[1]:.0f} | {typical_rate[0]:.0f} |",
        f"| large record ({len(big.resources)} resources, 2,000 Observations) | {big_rate[1]:.1f} | {big_rate[0]:.1f} |",
        "",
        "Target: >= 200 typical patients/s on one core.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
