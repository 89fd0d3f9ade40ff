"""``fhir-plugin keygen``: a backend key pair for SMART Backend Services; the private key to a 0600 file,
the public JWKS (to host at the JWKS URL registered with the EHR) to standard output (issue 12)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .._errors import UsageError
from ._common import subparser


def add_parser(sub: Any, epilog: str) -> None:
    parser = subparser(sub, "keygen", epilog, help="make a backend key pair; print the public JWKS")
    parser.add_argument(
        "--out",
        metavar="FILE",
        required=True,
        help="where to write the private key (PEM, mode 0600; an existing file is refused)",
    )
    parser.add_argument(
        "--type",
        choices=("rsa", "ec"),
        default="rsa",
        help="rsa: RSA 2048 signing RS384 (default); ec: P-384 signing ES384",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from .._backend_auth import generate_signing_key

    key = generate_signing_key(args.type)
    try:
        # created 0600 from the start: the private key is never readable by others, not even briefly
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise UsageError(f"{args.out} exists; keygen never overwrites a key") from exc
    except OSError as exc:
        raise UsageError(f"cannot write the key to {args.out}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as out:
        out.write(key.key.as_pem(private=True))
    print(json.dumps({"keys": [key.public_jwk()]}, indent=2))
    return 0
