"""``fhir-plugin sync``: the headless job's options, its authentication, and the run (see ``_sync``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

import requests

from .._checkpoint import DEFAULT_STATE, Checkpoint
from .._client import FhirClient
from .._errors import UsageError
from .._ledger import DEFAULT_LEDGER
from .._pace import RateLimiter
from .._profile import DEFAULT_PROFILE, load_profile
from .._sync import (
    DEFAULT_MAX_TRANSPORT_ERRORS,
    Selection,
    ServerClock,
    SyncOptions,
    job_scopes,
    parse_instant,
    run_sync,
)
from ._common import (
    JobAuth,
    add_auth_options,
    authenticate_job,
    parse_today,
    strategy_options,
    subparser,
    write_allowed_by,
)


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(
        sub, "sync", epilog, help="headless job: check changed (or listed) patients, write drafts, resume"
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sync`` subcommand's options (the command line calls this when it builds its parser)."""
    parser.add_argument("--server", metavar="URL", required=True, help="FHIR R4 base URL")
    which = parser.add_argument_group("which patients (none of these: those changed since the last run)")
    which.add_argument("--patient", metavar="ID", action="append", default=[], help="a patient id (repeatable)")
    which.add_argument("--group", metavar="ID", help="the members of this FHIR Group")
    which.add_argument("--all", action="store_true", help="every Patient on the server")
    which.add_argument(
        "--since",
        metavar="INSTANT",
        help="changes after this time instead of the stored mark, e.g. 2026-11-01T00:00:00Z",
    )
    parser.add_argument(
        "--write", action="store_true", help="write each patient's drafts as one transaction (default: check only)"
    )
    strategy_options(parser, ledger_where=f"{DEFAULT_LEDGER} beside --state")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N", help="patients in flight (default 4)")
    parser.add_argument(
        "--max-requests-per-minute",
        type=float,
        metavar="N",
        help="at most N requests a minute, all threads together (default: no limit); keep under the EHR's "
        "published limit: every request counts, retries included",
    )
    parser.add_argument(
        "--state", metavar="FILE", default=DEFAULT_STATE, help=f"checkpoint file, SQLite (default ./{DEFAULT_STATE})"
    )
    parser.add_argument(
        "--report",
        metavar="FILE",
        default="-",
        help="JSON-lines report, one line per patient and a summary (default stdout)",
    )
    parser.add_argument("--fresh", action="store_true", help="drop an unfinished run in the state file and start anew")
    parser.add_argument(
        "--profile", metavar="CODE", default=DEFAULT_PROFILE, help=f"condition profile (default {DEFAULT_PROFILE})"
    )
    parser.add_argument("--today", metavar="YYYY-MM-DD", help="the date 'not yet due' is judged against")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per-request timeout")
    parser.add_argument(
        "--max-transport-errors",
        type=int,
        default=DEFAULT_MAX_TRANSPORT_ERRORS,
        metavar="N",
        help="stop the run after N patients in a row get no answer (default %(default)s)",
    )
    add_auth_options(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (ids only)")


def _session(
    args: argparse.Namespace,
    selection: Selection,
    concurrency: int,
) -> tuple[requests.Session, JobAuth]:
    """The HTTP session for the FHIR server (pooled for the threads, authenticated), a static token, the grant."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=max(10, concurrency + 2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session, authenticate_job(args, session, job_scopes(selection, args.write))


def run(args: argparse.Namespace) -> int:
    """``fhir-plugin sync``: exit 0 when every patient went through, 1 when some failed."""
    selection = Selection(tuple(args.patient), args.group, args.all, args.since)
    if selection.since is not None:
        parse_instant(selection.since)
    # the ledger lives beside the sync state unless named (issue 12, writer c)
    ledger = args.ledger or str(Path(args.state).with_name(DEFAULT_LEDGER))
    options = SyncOptions(
        selection,
        args.write,
        args.concurrency,
        parse_today(args.today),
        args.fresh,
        args.max_transport_errors,
        args.strategy,
        ledger,
    )
    # one pacer for the threads: the EHR meters the app, and a 429 holds them all (checked before signing in)
    pacer = RateLimiter(args.max_requests_per_minute, what="--max-requests-per-minute")
    profile = load_profile(args.profile)
    session, auth = _session(args, selection, options.concurrency)
    # what the token was granted decides whether and what this run writes (issue 12, item 5)
    write, creatable = write_allowed_by(auth.granted, args.write, "sync")
    options = dataclasses.replace(options, write=write, creatable=creatable)
    token = auth.token
    clock = ServerClock()
    session.hooks["response"].append(clock)
    try:
        with (
            Checkpoint(args.state) as checkpoint,
            FhirClient(args.server, session=session, token=token, timeout=args.timeout, pacer=pacer) as client,
        ):
            out = sys.stdout if args.report == "-" else _open_report(args.report)
            try:
                result = run_sync(
                    client, checkpoint, options, profile=profile, out=out, progress_stream=sys.stderr, clock=clock
                )
            finally:
                if out is not sys.stdout:
                    out.close()
    finally:
        session.close()
    counts = ", ".join(f"{n} {status}" for status, n in result.counts.items() if n)
    print(
        f"fhir-plugin sync: {result.total} patients ({counts or 'none'}); {result.created} drafts created, "
        f"{result.existing} already there; {result.elapsed:.1f} s",
        file=sys.stderr,
    )
    return 1 if result.failed else 0


def _open_report(path: str) -> TextIO:
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {path}: {exc.strerror or exc}") from exc
