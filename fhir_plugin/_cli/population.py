"""``fhir-plugin population``: a whole population through Bulk Data ``$export`` (or NDJSON files) and Spark.

This module only wires: the export (``_bulk``), the Spark job (``_population._job``), the
summary and report (``_population._report``) and the write-back (``_population._writeback``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from .._errors import PluginError, UsageError
from .._pace import RateLimiter
from .._profile import DEFAULT_PROFILE, load_profile
from ._common import add_auth_options, authenticate_job, parse_today, subparser, write_allowed_by

#: the write-back's draft ledger, beside its write log in ``--out``
LEDGER = "ledger.sqlite"


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(
        sub,
        "population",
        epilog,
        help="check a whole population (Bulk Data $export or NDJSON) on Apache Spark; worklist out",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="output folder: results.parquet, results.jsonl, report.html (and the export's files)",
    )
    source = parser.add_argument_group("where the population comes from (one of)")
    source.add_argument("--server", metavar="URL", help="FHIR R4 base URL to $export from")
    source.add_argument("--ndjson", metavar="DIR", help="a folder of .ndjson files from any bulk tool")
    export = parser.add_argument_group("the export (with --server)")
    export.add_argument("--group", metavar="ID", help="export the members of this Group (Group/ID/$export)")
    export.add_argument(
        "--level",
        choices=("patient", "system"),
        default="patient",
        help="without --group: Patient/$export (default) or the whole system ($export)",
    )
    export.add_argument(
        "--type",
        metavar="TYPES",
        help="comma-separated _type (default Patient,Encounter,Condition,Observation,CarePlan)",
    )
    export.add_argument("--since", metavar="INSTANT", help="_since: only resources changed after this instant")
    export.add_argument(
        "--plan-notes",
        action="store_true",
        help="also export the plugin's plan-of-care notes (DocumentReference, _typeFilter on LOINC 18776-5): on an "
        "EHR that takes the plan as a note (Epic, Oracle Health), a run after a write-back then reads the written "
        "plans as drafted",
    )
    export.add_argument(
        "--type-filter",
        metavar="QUERY",
        action="append",
        default=[],
        help="a _typeFilter, e.g. 'Condition?code=M62.561' (repeatable)",
    )
    export.add_argument(
        "--fresh-export",
        action="store_true",
        help="start a new export instead of resuming the one recorded in DIR/export/",
    )
    export.add_argument(
        "--max-poll-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="longest wait between status polls, whatever Retry-After says (default 120)",
    )
    export.add_argument(
        "--export-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="give up polling after this long (a later run resumes the same export)",
    )
    spark = parser.add_argument_group("where Spark runs (default: local mode on this machine)")
    spark.add_argument("--master", metavar="URL", help="a Spark master, e.g. spark://host:7077 (default local[*])")
    spark.add_argument("--remote", metavar="URL", help="a Spark Connect server, e.g. sc://host:15002")
    spark.add_argument("--driver-memory", metavar="SIZE", help="spark.driver.memory, e.g. 2g")
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the drafts of every patient whose drafts are allowed (needs --server)",
    )
    parser.add_argument(
        "--max-writes-per-minute", type=float, metavar="N", help="rate limit for --write (default: none)"
    )
    parser.add_argument(
        "--max-requests-per-minute",
        type=float,
        metavar="N",
        help="with --server: at most N requests a minute, export and write-back (default: no limit); keep under "
        "the EHR's published limit: every request counts, retries and status polls included",
    )
    parser.add_argument(
        "--profile", metavar="CODE", default=DEFAULT_PROFILE, help=f"condition profile (default {DEFAULT_PROFILE})"
    )
    parser.add_argument(
        "--strict-r4",
        action="store_true",
        help="validate every resource against the whole R4 model, as the command line does "
        "(default: the elements the check reads; about 3x slower)",
    )
    parser.add_argument("--today", metavar="YYYY-MM-DD", help="the date 'not yet due' is judged against")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="per-request timeout")
    add_auth_options(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (ids only)")


def _session(args: argparse.Namespace) -> tuple[Any, str | None, frozenset[str] | None]:
    """The HTTP session (SMART Backend Services as the sync job does it), a static token if any, and the
    types the token may create (None: not known, no limit)."""
    import requests

    from .._sync import Selection, job_scopes

    session = requests.Session()
    # the export's types only: the sync job's note searches are not made here; --plan-notes exports the notes
    scopes = job_scopes(Selection((), args.group, not args.group, None), args.write, notes=False)
    if getattr(args, "plan_notes", False):
        scopes = dataclasses.replace(scopes, searches=(*scopes.searches, "DocumentReference"))
    auth = authenticate_job(args, session, scopes)
    # no create granted: the run reports and writes nothing, and says so; some granted: the write-back
    # creates only those, the rest folded or named as not written, as the sync job does (issue 12, item 5)
    args.write, creatable = write_allowed_by(auth.granted, args.write, "population")
    return session, auth.token, creatable


def _check_args(args: argparse.Namespace) -> None:
    if bool(args.server) == bool(args.ndjson):
        raise UsageError("give exactly one source: --server URL (a Bulk Data export) or --ndjson DIR")
    if args.write and not args.server:
        raise UsageError("--write needs --server: drafts are written to a FHIR server")
    if args.ndjson and (args.group or args.since or args.type_filter or args.type or args.plan_notes):
        raise UsageError("--group, --since, --type, --type-filter and --plan-notes apply to an export (--server)")
    if args.max_writes_per_minute is not None and not args.write:
        raise UsageError("--max-writes-per-minute applies to --write")
    if args.max_writes_per_minute is not None and not args.max_writes_per_minute > 0:
        # refused before the export and the Spark job, not after them
        raise UsageError(f"--max-writes-per-minute must be a positive number, not {args.max_writes_per_minute:g}")
    if args.max_requests_per_minute is not None and not args.server:
        raise UsageError("--max-requests-per-minute applies to --server")


def run(args: argparse.Namespace) -> int:
    """``fhir-plugin population``: exit 0 when every patient is complete, 1 when the worklist is not empty."""
    from .._population._job import SparkSettings, iter_rows, ndjson_files, run_population, spark_session, warm_workers
    from .._population._report import WORKLIST_COLUMNS, render_html, render_terminal, summarize

    _check_args(args)
    # one pacer for every request of the run, export and write-back: the EHR meters the app
    pacer = RateLimiter(args.max_requests_per_minute, what="--max-requests-per-minute")
    import pyarrow as pa

    # Arrow's default allocator keeps what it frees: reading the results back, the driver grew with the
    # population (+100 MB from 10k to 100k patients); the system allocator gives it back
    pa.set_memory_pool(pa.system_memory_pool())
    today = parse_today(args.today) or date.today()
    now = datetime.now(UTC)
    load_profile(args.profile)  # a bad profile fails here, before Spark starts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export_issues: list[dict[str, Any]] = []
    session = token = creatable = None
    settings = SparkSettings(
        args.master, args.remote, driver_memory=args.driver_memory, warm_r4=bool(args.write or args.strict_r4)
    )
    started = time.monotonic()

    def start_spark() -> Any:
        spark = spark_session(settings)
        warm_workers(spark, args.profile)
        return spark

    spark_start: Future[Any] | None = None

    def start_spark_meanwhile() -> None:
        # the server is running the export and we only wait: Spark and its Python workers start meanwhile
        nonlocal spark_start
        spark_start = ThreadPoolExecutor(1, thread_name_prefix="spark-start").submit(start_spark)

    if args.server:
        from .._bulk import EXPORT_TYPES, PLAN_NOTE_FILTER, BulkExporter, ExportRequest

        session, token, creatable = _session(args)
        types = tuple(t.strip() for t in args.type.split(",") if t.strip()) if args.type else EXPORT_TYPES
        filters = tuple(args.type_filter)
        if args.plan_notes:
            types, filters = (*types, "DocumentReference"), (*filters, PLAN_NOTE_FILTER)
        request = ExportRequest(args.group, args.level, types, args.since, filters)
        exporter = BulkExporter(
            args.server,
            out / "export",
            session=session,
            token=token,
            request_timeout=args.timeout,
            max_wait=args.max_poll_wait,
            timeout=args.export_timeout,
            progress=sys.stderr,
            on_waiting=start_spark_meanwhile,
            pacer=pacer,
        )
        exported = time.monotonic()
        files, export_issues = exporter.run(request, fresh=args.fresh_export)
        print(f"The export took {time.monotonic() - exported:.1f} s ({len(files)} files).")
        source = f"a Bulk Data export of {args.server}"
        if not files:
            raise UsageError("the export holds no files: the server has no resources of the types asked for")
    else:
        files = ndjson_files(args.ndjson)
        source = f"the NDJSON files in {args.ndjson}"

    spark = spark_start.result() if spark_start is not None else start_spark()
    spark_ready = time.monotonic()
    try:
        result = run_population(
            spark,
            files,
            out,
            profile_code=args.profile,
            today=today,
            now=now,
            keep_drafts=args.write,
            strict_r4=args.strict_r4,
        )
    except Exception as exc:
        # out of memory: a task's (Py4J's or Spark Connect's error says so), or the local JVM's, which then
        # went away under the job (PySpark's socket to it refused or cut); anything else is a bug
        if not isinstance(exc, ConnectionError | EOFError) and "OutOfMemoryError" not in str(exc):
            raise
        raise PluginError(
            "the check on Spark ran out of memory or its JVM stopped (Spark's log above says which); give the "
            "local JVM more with --driver-memory, e.g. 4g (on a cluster: its executors' memory); the previous "
            "results in --out are as they were"
        ) from exc
    checked = time.monotonic()
    summary = summarize(iter_rows(result.parquet, WORKLIST_COLUMNS))
    page = render_html(
        summary,
        profile_code=args.profile,
        source=source,
        problems=result.problems,
        export_issues=export_issues,
        generated=now.strftime("%Y-%m-%d %H:%M UTC"),
    )
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / "report.html")
    # beside this run's results only this run's problems: written whole and renamed, an earlier run's removed
    problems_path = out / "problems.jsonl"
    if result.problems or export_issues:
        tmp = out / ".problems.jsonl.tmp"
        tmp.write_text("".join(json.dumps(p) + "\n" for p in result.problems + export_issues), encoding="utf-8")
        os.replace(tmp, problems_path)
    else:
        problems_path.unlink(missing_ok=True)
    print(render_terminal(summary, result.problems, export_issues))
    print(f"Wrote {result.parquet}, {result.jsonl} and {out / 'report.html'}.")
    job = checked - spark_ready
    print(
        f"Spark ready after {spark_ready - started:.1f} s{' (started during the export)' if spark_start else ''};"
        f" the check of {result.patients} patients took {job:.1f} s"
        f" ({result.patients / job if job > 0 else 0:.0f} patients/s), the report {time.monotonic() - checked:.1f} s."
    )

    if args.write:
        _write(args, result.parquet, session, token, out, iter_rows, creatable=creatable, pacer=pacer)
    return 0 if summary.worklist_total == 0 else 1


def _write(
    args: argparse.Namespace,
    parquet: Path,
    session: Any,
    token: str | None,
    out: Path,
    iter_rows: Any,
    *,
    creatable: frozenset[str] | None = None,
    pacer: RateLimiter | None = None,
) -> None:
    """The write-back through the writer the server and the grant call for (``creatable``: what the token may
    create), as the sync job writes: the drafts in the forms allowed, and what could not be written named."""
    from .._client import FhirClient
    from .._population._writeback import WRITE_LOG, WriteLog, write_back
    from .._strategies import detected_strategies

    with (
        FhirClient(args.server, session=session, token=token, timeout=args.timeout, pacer=pacer) as client,
        WriteLog(out / WRITE_LOG) as log,
    ):
        # the ledger (servers without conditional create) lives beside the write log (issue 12, writer c)
        writer = detected_strategies(client, ledger=out / LEDGER, creatable=creatable).writer
        summary = write_back(
            iter_rows(parquet, ("patient", "drafts_allowed", "drafts")),
            writer,
            log,
            RateLimiter(args.max_writes_per_minute, what="--max-writes-per-minute"),
            progress=sys.stderr,
        )
    print(
        f"Write-back: {summary.written} patients written ({summary.created} resources created, "
        f"{summary.existing} already there), {summary.skipped} written by an earlier run, "
        f"{len(summary.failed)} failed."
    )
    for form in summary.forms:
        print(f"Written as: {form}.")
    if any(f.startswith("CarePlan as DocumentReference") for f in summary.forms) and not getattr(
        args, "plan_notes", False
    ):
        print(
            "The plans went into plan-of-care notes: give the next run --plan-notes, so its worklist reads them as "
            "drafted plans rather than missing ones."
        )
    for draft in summary.not_written:
        print(f"Not written: {draft}.")
    for patient, why in summary.failed:
        print(f"write-back failed for {patient}: {why}", file=sys.stderr)
