"""``fhir-plugin sandbox``: the whole demo — sandbox HAPI, synthetic patients, sandbox EHR, the app."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import subparser


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(
        sub, "sandbox", None, help="try the app: sandbox HAPI + synthetic patients + sandbox EHR + the app"
    )
    parser.add_argument("--hapi-port", type=int, default=8080, help="sandbox HAPI port (default 8080)")
    parser.add_argument("--ehr-port", type=int, default=9090, help="sandbox EHR port (default 9090)")
    parser.add_argument("--app-port", type=int, default=8000, help="SMART app port (default 8000)")
    parser.add_argument("--auto-approve", action="store_true", help="skip the EHR's approval page")
    parser.add_argument(
        "--frame-ancestors",
        default=None,
        metavar="ORIGINS",
        help="origins allowed to frame the app (CSP frame-ancestors), space or comma separated; "
        "default: SMART_FRAME_ANCESTORS, else the sandbox EHR's own pages "
        "(http://localhost:EHR_PORT and http://127.0.0.1:EHR_PORT)",
    )
    parser.add_argument(
        "--personality",
        choices=("hapi", "epic-like", "oracle-like"),
        default="hapi",
        help="shape the sandbox EHR's FHIR server like a vendor's (default hapi; issue 12)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    import os

    from sandbox.demo import run_sandbox

    ancestors = args.frame_ancestors if args.frame_ancestors is not None else os.environ.get("SMART_FRAME_ANCESTORS")
    return run_sandbox(
        hapi_port=args.hapi_port,
        ehr_port=args.ehr_port,
        app_port=args.app_port,
        auto_approve=args.auto_approve,
        personality=args.personality,
        frame_ancestors=tuple(ancestors.replace(",", " ").split()) if ancestors else None,
    )
