"""Where the command line takes a static bearer token from: --token, --token-file or FHIR_TOKEN.

``--token`` stays for compatibility, but its value is in the process list
(``ps``, ``/proc/<pid>/cmdline``) for every local user to read (issue 11), so
the help says so and ``--token-file`` reads it from a file instead.
"""

from __future__ import annotations

import argparse
import os

from ._errors import UsageError

__all__ = ["TOKEN_HELP", "TOKEN_FILE_HELP", "read_token"]

TOKEN_HELP = (
    "bearer token for the server; other local users can see it in the process list, "
    "so prefer --token-file or env FHIR_TOKEN"
)
TOKEN_FILE_HELP = "file holding the bearer token (read once; surrounding whitespace ignored)"


def read_token(args: argparse.Namespace) -> str | None:
    """The token from ``--token``, else ``--token-file``, else env ``FHIR_TOKEN``; None when none is given."""
    path = getattr(args, "token_file", None)
    if args.token and path:
        raise UsageError("give either --token or --token-file, not both")
    if args.token:
        return args.token
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the token file {path} ({type(exc).__name__})") from None
        if not token or any(c.isspace() for c in token):
            raise UsageError(f"the token file {path} must hold one token and nothing else")
        return token
    return os.environ.get("FHIR_TOKEN") or None
