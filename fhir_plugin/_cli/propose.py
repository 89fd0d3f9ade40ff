"""``fhir-plugin propose [--write]``: the report and the drafts; with ``--write``, the drafts sent to the server."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, date, datetime
from typing import Any

from .._profile import load_profile
from .._review import review
from ._common import checkables, parse_today, source_options, strategy_options, subparser


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(
        sub, "propose", epilog, parents=[source_options()], help="report plus draft Condition and CarePlan"
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="send the drafts to --server in the form it accepts (default: dry run, print the Bundle)",
    )
    strategy_options(parser)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when drafts were made (or written), 2 when the one patient's were refused, 1 when some were."""
    today = parse_today(args.today) or date.today()
    profile = load_profile(args.profile)
    items, client = checkables(args, today, write=args.write)
    writer = None
    if args.write:
        from .._strategies import detected_strategies

        writer = detected_strategies(client, strategy=args.strategy, ledger=args.ledger).writer
    now = datetime.now(UTC)
    outputs: list[dict[str, Any]] = []
    refused = 0
    for item in items:
        result = review(item.record, profile, today=today, now=now, encounter_id=item.encounter_id)
        report = result.report
        if result.drafts is None and result.settled:  # SPEC §7.1: already written, or a plan exists
            print(f"fhir-plugin: {report.patient}: nothing new to draft: {result.settled}", file=sys.stderr)
            outputs.append({"report": report.to_json(), "drafts": None, "settled": result.settled})
        elif result.drafts is None:
            refused += 1
            print(f"fhir-plugin: {result.refused}", file=sys.stderr)
            outputs.append({"report": report.to_json(), "drafts": None, "refused": result.refused})
        elif writer is not None:
            written = writer.write(result.drafts)
            outputs.append({"report": report.to_json(), "written": written.to_json()})
            if args.format == "text":
                print(f"{report.patient}: " + written.summary())
        else:
            outputs.append({"report": report.to_json(), "drafts": result.drafts})
    if args.format == "json" or not args.write:
        print(json.dumps(outputs[0] if len(outputs) == 1 else outputs, indent=2))
    if refused:
        return 2 if refused == len(items) and len(items) == 1 else 1
    return 0
