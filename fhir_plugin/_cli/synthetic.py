"""``fhir-plugin synthetic``: save the synthetic patients as Bundle files, or load them into a server."""

from __future__ import annotations

import argparse
from datetime import date
from typing import Any

from .._errors import UsageError
from .._examples import example_cases, save_cases
from .._sources import load_into_server
from ._common import parse_today, subparser


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(
        sub, "synthetic", None, help="save the synthetic patients as Bundle files, or load them into a server"
    )
    parser.add_argument("--out", metavar="DIR", help="write one Bundle per patient plus expected.json here")
    parser.add_argument("--server", metavar="URL", help="load them into this FHIR server by one transaction")
    parser.add_argument("--today", metavar="YYYY-MM-DD", help="the date the records are dated back from")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:

    if not args.out and not args.server:
        raise UsageError("say where the synthetic patients go: --out DIR and/or --server URL")
    cases = example_cases(parse_today(args.today) or date.today())
    if args.out:
        written = save_cases(cases, args.out)
        print(f"wrote {len(written)} files ({len(cases)} patients) to {args.out}")
    if args.server:
        load_into_server(args.server, cases)
        print(f"loaded {len(cases)} patients into {args.server} (ids start with fp-)")
    return 0
