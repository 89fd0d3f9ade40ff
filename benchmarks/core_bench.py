"""Round trips and wall time per patient, ours against a naive client, plus the check's throughput.

    .venv/bin/python benchmarks/core_bench.py [--server URL] [--out docs/benchmarks-core.md]

Both clients run in the same process against the same server, one after the
other (who goes first alternates), each on its own copy of the same synthetic
patients, after warm-up passes.  Ours: one batch read, one transaction of
conditional creates.  Naive: one GET per resource type, one POST per resource.
The check's throughput is measured in memory on one core.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _hapi import RUN, fhir_server
from _latency import delayed

from fhir_plugin import (
    BatchReader,
    FhirClient,
    PerResourceWriter,
    PerTypeReader,
    TransactionWriter,
    check,
    load_profile,
    review,
)
from fhir_plugin._record import records_from_bundle
from fhir_plugin.synthetic import generate_cases, large_record, load_into_server, renamed_case

#: the JVM options of a HAPI started here: the JIT as in production (the sandbox's default stops at C1
#: to start faster for tests), so the server's steady-state work is what is compared
SERVER_JAVA_OPTS = "-Xms512m -Xmx2g -XX:+UseSerialGC"


def _flow(who: str, base: str, case, profile, today: date, now: datetime) -> dict[str, float]:
    """One patient through one client: read, check and drafts, write.

    ``who`` is "ours" (batch reader, transaction writer) or "naive" (the per-type reader and
    per-resource writer).  ``case`` is one whose code fits
    (``_writable``), so there are drafts to write.
    """
    with FhirClient(base) as client:
        reader = BatchReader(client) if who == "ours" else PerTypeReader(client)
        writer = TransactionWriter(client) if who == "ours" else PerResourceWriter(client)
        t0 = time.perf_counter()
        record = reader.read(case.patient_id)
        t1 = time.perf_counter()
        read_rt = client.round_trips
        drafts = review(record, profile, today=today, now=now, encounter_id=case.encounter_id).drafts
        assert drafts is not None, "only cases whose code fits are measured"
        t2 = time.perf_counter()
        writer.write(drafts)
        t3 = time.perf_counter()
        return {
            "read_rt": read_rt,
            "write_rt": client.round_trips - read_rt,
            "io_s": (t1 - t0) + (t3 - t2),
            "cpu_s": t2 - t1,
            "total_s": t3 - t0,
        }


def _per_patient(base: str, ours_cases: list, naive_cases: list, profile, today: date) -> dict[str, dict[str, list]]:
    """Each patient (two copies: one per client) through both clients; who goes first alternates."""
    out: dict[str, dict[str, list]] = {"ours": {}, "naive": {}}
    now = datetime.now(UTC)
    for i, copies in enumerate(
        {"ours": mine, "naive": theirs} for mine, theirs in zip(ours_cases, naive_cases, strict=True)
    ):
        for who in ("ours", "naive") if i % 2 == 0 else ("naive", "ours"):
            for key, value in _flow(who, base, copies[who], profile, today, now).items():
                out[who].setdefault(key, []).append(value)
    return out


def _warm_up(base: str, cases: list, profile, today: date, passes: int) -> None:
    """Run both clients on throw-away patients first, so the server's JIT has compiled its hot paths."""
    for n in range(passes):
        mine = [renamed_case(c, f"warm{n}-o") for c in cases]
        theirs = [renamed_case(c, f"warm{n}-n") for c in cases]
        load_into_server(base, mine + theirs)
        _per_patient(base, mine, theirs, profile, today)


_REQUEST_LOG = re.compile(r"sandbox\.requests - .* \(([\w-]+)\) (\d+) ms$")


def _server_ms(log: Path | None, start: int) -> dict[str, float] | None:
    """HAPI's own processing time (its request log, from byte ``start`` on), summed per client.

    Ours sends only Bundles (operation ``transaction``, batch included); the naive
    client only reads, searches and creates.  None when there is no log to read.
    """
    if log is None or not log.exists():
        return None
    totals = {"ours": 0.0, "naive": 0.0}
    with log.open("rb") as f:
        f.seek(start)
        for line in f.read().decode("utf-8", "replace").splitlines():
            m = _REQUEST_LOG.search(line)
            if m:
                totals["ours" if m.group(1) == "transaction" else "naive"] += float(m.group(2))
    return totals


def _writable(cases: list, profile, today: date) -> list:
    """The cases whose code fits, so that both clients write drafts for every patient measured."""
    out = []
    for case in cases:
        [record] = records_from_bundle(case.resources)
        if review(record, profile, today=today, now=datetime.now(UTC), encounter_id=case.encounter_id).drafts_allowed:
            out.append(case)
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
    parser.add_argument(
        "--latency",
        type=float,
        action="append",
        default=[],
        metavar="MS",
        help="also run behind a proxy adding MS milliseconds per request (repeatable)",
    )
    parser.add_argument(
        "--warm-up",
        type=int,
        default=3,
        metavar="N",
        help="passes over the patients, not measured, before the runs (default 3)",
    )
    parser.add_argument("--out", help="also write the results as Markdown to this file")
    args = parser.parse_args()
    today = date.today()
    profile = load_profile("M62.561")
    all_cases = generate_cases(today)
    cases = _writable(all_cases, profile, today)
    log = None if args.server else RUN.parent / ".run" / f"hapi-{args.port}.log"
    runs: list[tuple[float, dict[str, dict[str, list]], dict[str, float] | None]] = []
    with fhir_server(args.server, args.port, java_opts=SERVER_JAVA_OPTS) as base:
        _warm_up(base, cases, profile, today, args.warm_up)
        for latency in [0.0] + args.latency:
            # new patients per run, one copy per client: each writes drafts where there were none
            mine = [renamed_case(c, f"o{int(latency)}") for c in cases]
            theirs = [renamed_case(c, f"n{int(latency)}") for c in cases]
            load_into_server(base, mine + theirs)
            start = log.stat().st_size if log and log.exists() else 0
            with delayed(base, latency) as url:
                figures = _per_patient(url, mine, theirs, profile, today)
            runs.append((latency, figures, _server_ms(log, start)))
    typical = next(c for c in all_cases if c.key == "complete")
    big = large_record(today, n_observations=2000)
    typical_rate = _throughput(records_from_bundle(typical.resources)[0], profile, today, typical.encounter_id)
    big_rate = _throughput(records_from_bundle(big.resources)[0], profile, today, big.encounter_id)

    server = "given" if args.server else f"sandbox HAPI ({SERVER_JAVA_OPTS})"
    lines = [
        f"Run {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.python_implementation()} {platform.python_version()}), server {server}, after {args.warm_up} "
        f"warm-up passes; {len(runs[0][1]['ours']['io_s'])} patients written per client per run (records whose code does "
        "not fit are skipped).",
        "",
        "Read + write is the time spent in the two I/O steps; the check and the drafting between them are the "
        "same code for both clients and are shown apart.",
        "",
        "| added latency per request | client | read round trips | write round trips | read + write (median) "
        "| speed-up, read + write | check + drafts (median) | whole flow (median) | speed-up, whole flow |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for latency, figures, _ in runs:
        med = {who: {k: statistics.median(v) for k, v in f.items()} for who, f in figures.items()}
        where = "none (loopback)" if latency == 0 else f"{latency:.0f} ms"
        for who, label in (
            ("ours", "ours (batch read, one transaction)"),
            ("naive", "naive (search per type, POST per resource)"),
        ):
            m, f = med[who], figures[who]
            io_x = med["naive"]["io_s"] / m["io_s"]
            total_x = med["naive"]["total_s"] / m["total_s"]
            lines.append(
                f"| {where} | {label} | {m['read_rt']:.0f} (max {max(f['read_rt']):.0f}) | "
                f"{m['write_rt']:.0f} (max {max(f['write_rt']):.0f}) | {m['io_s'] * 1000:.1f} ms | "
                f"**{io_x:.1f}x** | {m['cpu_s'] * 1000:.1f} ms | {m['total_s'] * 1000:.1f} ms | "
                f"{total_x:.1f}x |"
            )
    server_runs = [(latency, ms, figures) for latency, figures, ms in runs if ms]
    if server_runs:
        lines += [
            "",
            "HAPI's own processing time per patient, summed from its request log over the same requests, beside "
            "the read + write wall time over the same patients (means, not medians, so that the two compare): "
            "our server time is what ours would take if its round trips and its own code cost nothing, so the "
            "naive client's time over it is the ceiling of the speed-up on this server.",
            "",
            "| added latency per request | ours: server time / read + write | naive: server time / read + write "
            "| speed-up, read + write (means) | ceiling: naive read + write / ours' server time |",
            "|---|---|---|---|---|",
        ]
        for latency, ms, figures in server_runs:
            n = len(figures["ours"]["io_s"])
            wall = {who: statistics.fmean(figures[who]["io_s"]) * 1000 for who in ("ours", "naive")}
            where = "none (loopback)" if latency == 0 else f"{latency:.0f} ms"
            lines.append(
                f"| {where} | {ms['ours'] / n:.1f} ms / {wall['ours']:.1f} ms | "
                f"{ms['naive'] / n:.1f} ms / {wall['naive']:.1f} ms | {wall['naive'] / wall['ours']:.1f}x | "
                f"{wall['naive'] / (ms['ours'] / n):.1f}x |"
            )
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
