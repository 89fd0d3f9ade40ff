"""``fhir-plugin cds-feedback``: what clinicians did with the CDS cards — accepted, overridden, and why."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .._errors import UsageError
from ._common import subparser


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(
        sub,
        "cds-feedback",
        epilog,
        help="count the CDS cards issued and the feedback on them (accepted / overridden, reasons)",
    )
    parser.add_argument(
        "--store",
        metavar="FILE",
        default=os.environ.get("CDS_FEEDBACK_STORE", "var/cds-feedback.sqlite"),
        help="the service's SQLite file (default $CDS_FEEDBACK_STORE or var/cds-feedback.sqlite)",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="report format")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from smart_launch._cds_feedback import FeedbackStore, feedback_report

    if not Path(args.store).is_file():
        raise UsageError(f"no CDS feedback store at {args.store}: the service has not answered a hook yet")
    store = FeedbackStore(args.store)
    try:
        counts = store.counts()
    finally:
        store.close()
    print(json.dumps(counts, indent=2) if args.format == "json" else feedback_report(counts))
    return 0
