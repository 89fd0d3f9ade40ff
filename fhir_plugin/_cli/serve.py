"""``fhir-plugin serve``: run the SMART app (settings from ``SMART_*`` environment variables)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import subparser


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(sub, "serve", epilog, help="run the SMART app (settings from SMART_* environment variables)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes; they share the SQLite session store")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (ids only)")


def run(args: argparse.Namespace) -> int:
    from smart_launch import serve

    return serve(args.host, args.port, workers=args.workers, log_level="debug" if args.debug else "info")
