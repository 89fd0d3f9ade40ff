"""``fhir-plugin check``: print the documentation report (exit 0 complete, 1 gaps or a code mismatch)."""

from __future__ import annotations

import argparse
import json
from datetime import date
from typing import Any

from .._check import check
from .._profile import load_profile
from .._render import render_summary, render_text
from ._common import checkables, parse_today, source_options, subparser


def add_parser(sub: Any, epilog: str) -> None:
    subparser(sub, "check", epilog, parents=[source_options()], help="print the documentation report")


def run(args: argparse.Namespace) -> int:
    today = parse_today(args.today) or date.today()
    profile = load_profile(args.profile)
    items, _client = checkables(args, today)
    reports = [check(item.record, profile, today=today, encounter_id=item.encounter_id) for item in items]
    if args.format == "json":
        data: Any = [r.to_json() for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    elif len(reports) == 1:
        print(render_text(reports[0]))
    else:
        print(render_summary(reports))
    return 0 if all(r.complete for r in reports) else 1
