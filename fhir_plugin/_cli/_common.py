"""What several commands share: the source options, ``--today``, and reading the records to check."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

import requests

from .._errors import UsageError
from .._profile import DEFAULT_PROFILE
from .._sources import Checkable, from_embedded, from_files, require_patients
from .._token_arg import TOKEN_FILE_HELP, TOKEN_HELP, read_token

if TYPE_CHECKING:
    from .._backend_auth import ScopeRequest

__all__ = ["source_options", "parse_today", "checkables", "subparser"]


def subparser(sub: Any, name: str, epilog: str | None, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser that shows the exit codes under its help when given them."""
    if epilog:
        kwargs.update(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    return parser


def source_options() -> argparse.ArgumentParser:
    """The options ``check`` and ``propose`` share: where the records come from and how to report."""
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_argument_group("where the records come from (neither: the embedded synthetic patients)")
    source.add_argument("--server", metavar="URL", help="FHIR R4 base URL, e.g. http://127.0.0.1:8080/fhir")
    source.add_argument(
        "--bundle", metavar="FILE", action="append", default=[], help="a FHIR Bundle JSON file (repeatable)"
    )
    common.add_argument(
        "--patient",
        metavar="ID",
        action="append",
        default=[],
        help="patient id to check (repeatable; required with --server)",
    )
    common.add_argument("--encounter", metavar="ID", help="encounter to check at (default: the latest)")
    common.add_argument(
        "--profile", metavar="CODE", default=DEFAULT_PROFILE, help=f"condition profile (default {DEFAULT_PROFILE})"
    )
    common.add_argument("--token", metavar="TOKEN", help=TOKEN_HELP)
    common.add_argument("--token-file", metavar="FILE", help=TOKEN_FILE_HELP)
    common.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per-request timeout")
    common.add_argument("--today", metavar="YYYY-MM-DD", help="the date 'not yet due' is judged against")
    common.add_argument("--format", choices=("text", "json"), default="text", help="report format")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (ids only)")
    return common


def parse_today(value: str | None) -> date | None:
    """``--today`` as a date (None when not given: the caller decides what today is)."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise UsageError(f"--today wants a date like 2026-11-26, not {value!r}") from exc


def checkables(args: argparse.Namespace, today: date, *, write: bool = False) -> tuple[list[Checkable], Any]:
    """The records the options name, and the FHIR client they came through (None for files)."""
    if args.server and args.bundle:
        raise UsageError("give either --server or --bundle, not both")
    if write and not args.server:
        raise UsageError("--write needs --server: drafts are written to a FHIR server")
    if args.encounter and len(args.patient) != 1:
        raise UsageError("--encounter applies to one patient: name it with --patient")
    if args.server:
        from .._client import FhirClient
        from .._strategies import detected_strategies

        require_patients(args.patient)
        client = FhirClient(args.server, token=read_token(args), timeout=args.timeout)
        reader = detected_strategies(client).reader
        items = [Checkable(reader.read(pid.split("/")[-1]), args.encounter) for pid in args.patient]
        return items, client
    if args.bundle:
        items = from_files(args.bundle, args.patient)
    else:
        items = from_embedded(today, args.patient)
    if args.encounter:
        items = [Checkable(items[0].record, args.encounter)]
    return items, None


def strategy_options(parser: argparse.ArgumentParser, *, ledger_where: str | None = None) -> None:
    """``--strategy`` and ``--ledger``: how drafts are written, for servers whose CapabilityStatement is wrong."""
    from .._ledger import DEFAULT_LEDGER
    from .._strategies import STRATEGIES, STRATEGY_ENV

    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=os.environ.get(STRATEGY_ENV) or "auto",
        help="how drafts are written: auto = from the server's CapabilityStatement (default; "
        f"env {STRATEGY_ENV}), or force transaction, per-resource or ledger",
    )
    parser.add_argument(
        "--ledger",
        metavar="FILE",
        default=None if ledger_where else DEFAULT_LEDGER,
        help=f"the ledger writer's SQLite file of draft ids (default {ledger_where or DEFAULT_LEDGER})",
    )


def add_auth_options(parser: argparse.ArgumentParser) -> None:
    """The options of a job that talks to a server on its own: a static token, or SMART Backend Services."""
    auth = parser.add_argument_group("authentication (none: an open server)")
    auth.add_argument("--token", metavar="TOKEN", help=TOKEN_HELP)
    auth.add_argument("--token-file", metavar="FILE", help=TOKEN_FILE_HELP)
    auth.add_argument(
        "--client-id", metavar="ID", help="SMART Backend Services client id (or env FHIR_CLIENT_ID); needs --key"
    )
    auth.add_argument(
        "--key",
        metavar="FILE",
        help="the client's private key, PEM or JWK, RSA (RS384) or EC P-384 (ES384) (or env FHIR_CLIENT_KEY)",
    )
    auth.add_argument(
        "--kid",
        metavar="KID",
        help="key id to put in the assertion header (default: the JWK's kid, else its RFC 7638 thumbprint)",
    )
    auth.add_argument(
        "--scope",
        metavar="SCOPES",
        help="scopes to ask for, as they are (default: system scopes for what the run reads and writes, in "
        "SMART v2 or v1 as the server's smart-configuration says; v1 again if v2 is refused)",
    )
    auth.add_argument(
        "--token-url",
        metavar="URL",
        help="token endpoint (default: discovered from {server}/.well-known/smart-configuration)",
    )


@dataclass(frozen=True)
class JobAuth:
    """How a job is authenticated: a static token (or None), and the scope a backend token was granted."""

    token: str | None = None
    #: the granted scope string (SMART Backend Services only; None: not known, nothing to narrow)
    granted: str | None = None


def authenticate_job(args: argparse.Namespace, session: requests.Session, wanted: ScopeRequest | str) -> JobAuth:
    """Make ``session`` carry SMART Backend Services tokens when a client id and key are given; otherwise the
    static token of ``--token``/``--token-file``/``FHIR_TOKEN`` (or none: an open server).

    The scopes asked are ``--scope`` as given, else ``wanted`` spelled as the
    server's SMART configuration says (issue 12, item 5: v2, or v1, or v1 after
    v2 is refused); the first token is fetched now, so its granted scope is known.
    """
    from .._backend_auth import load_signing_key, negotiated_session

    client_id = args.client_id or os.environ.get("FHIR_CLIENT_ID")
    key_path = args.key or os.environ.get("FHIR_CLIENT_KEY")
    if not (client_id or key_path):
        return JobAuth(token=read_token(args))
    if not (client_id and key_path):
        raise UsageError("SMART Backend Services needs both --client-id and --key")
    if args.token or args.token_file:
        raise UsageError("give either --token (or --token-file) or --client-id with --key, not both")
    _, _, granted = negotiated_session(
        args.server,
        client_id,
        load_signing_key(key_path, kid=args.kid),
        args.scope or wanted,
        token_url=args.token_url,
        timeout=args.timeout,
        session=session,
    )
    return JobAuth(granted=granted)


def authenticate(args: argparse.Namespace, session: requests.Session, wanted: ScopeRequest | str) -> str | None:
    """``authenticate_job`` for a job that only needs the static token back (None: the session authenticates)."""
    return authenticate_job(args, session, wanted).token


def write_allowed_by(granted: str | None, write: bool, job: str) -> tuple[bool, frozenset[str] | None]:
    """Whether a ``--write`` run writes, and which types it may create, from the granted scope (issue 12, item 5).

    No create granted: the run goes on read-only, and says so on stderr — the
    review is still worth having, and the operator learns what to register.
    Some granted: only those are created; the rest are folded or named as not
    written in each result (``_strategies``).
    """
    from .._backend_auth import granted_creates
    from .._strategies import WRITE_TYPES

    if not write or granted is None:
        return write, None
    creatable = granted_creates(granted, WRITE_TYPES)
    if not creatable:
        print(
            f"fhir-plugin {job}: the token grants no create scope (granted: {granted or 'nothing'}); "
            "this run checks and reports but writes nothing",
            file=sys.stderr,
        )
        return False, None
    missing = [t for t in WRITE_TYPES if t not in creatable]
    if missing:
        print(
            f"fhir-plugin {job}: the token grants no create scope for {', '.join(missing)}; "
            "the drafts go in the forms it allows, and each result names what was not written",
            file=sys.stderr,
        )
    return True, creatable
