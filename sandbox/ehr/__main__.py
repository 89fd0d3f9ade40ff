"""``python -m sandbox.ehr --port 9090 --fhir-upstream http://127.0.0.1:8080/fhir [--auto-approve] [--clients FILE]``"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

import uvicorn

from ._app import create_app
from ._clients import ClientConfigError, ClientRegistry
from ._config import EhrConfig
from ._throttle import parse_rate_limit

EXAMPLE_CLIENTS = Path(__file__).with_name("clients.example.json")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _rate_limit(text: str) -> tuple[int, float]:
    try:
        return parse_rate_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.ehr", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--public-url", help="the base URL apps use to reach this EHR (default http://HOST:PORT)")
    parser.add_argument("--fhir-upstream", required=True, help="the HAPI FHIR base, e.g. http://127.0.0.1:8080/fhir")
    parser.add_argument("--clients", type=Path, default=EXAMPLE_CLIENTS, help="client registry JSON")
    parser.add_argument("--auto-approve", action="store_true", help="approve every authorize request unseen")
    parser.add_argument(
        "--personality",
        choices=("hapi", "epic-like", "oracle-like"),
        default="hapi",
        help="shape the FHIR proxy like a vendor's server (default hapi)",
    )
    parser.add_argument("--v1-only", action="store_true", help="advertise and grant SMART v1 scopes only")
    parser.add_argument("--token-lifetime", type=int, default=300, help="access token lifetime, seconds")
    parser.add_argument(
        "--rate-limit",
        type=_rate_limit,
        metavar="CALLS[/SECONDS]",
        help="at most CALLS FHIR calls per app in any SECONDS (default 60), then 429 with Retry-After: "
        "a metered EHR (eClinicalWorks: 250)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        clients = ClientRegistry.from_file(args.clients)
    except ClientConfigError as exc:
        print(f"sandbox EHR: {exc}", file=sys.stderr)
        return 2
    base_url = args.public_url or f"http://{args.host}:{args.port}"
    if not _is_loopback(args.host) or not base_url.startswith(("http://127.", "http://localhost", "https://")):
        # authlib refuses plain http off loopback; a sandbox in a container has no TLS.
        os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")
    config = EhrConfig(
        base_url=base_url,
        fhir_upstream=args.fhir_upstream,
        clients=clients,
        auto_approve=args.auto_approve,
        permission_v1_only=args.v1_only,
        personality=args.personality,
        access_token_lifetime=args.token_lifetime,
        rate_limit=args.rate_limit,
    )
    print(
        f"sandbox EHR on {config.base_url} (FHIR base {config.fhir_base_url}, upstream {config.fhir_upstream}, "
        f"{len(clients.all())} clients{', auto-approve' if args.auto_approve else ''})",
        flush=True,
    )
    # access_log off: uvicorn's access log prints query strings, which may carry patient data.
    uvicorn.run(create_app(config), host=args.host, port=args.port, access_log=False, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
