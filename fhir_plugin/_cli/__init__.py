"""The ``fhir-plugin`` command line: check, propose (and write) drafts, sync a server headless.

One module per command; each has ``add_parser`` (its options) and ``run``
(what it does).  This module only wires them and turns errors into exit codes.

Errors are one sentence on stderr and an exit code, never a traceback
(``--debug`` shows it).  Exit codes:

  0   every record checked is complete (check) / drafts made or written (propose) / stopped cleanly (serve)
      / the report printed (cds-feedback)
  1   documentation gaps or a code mismatch found (check) / some patient's drafts refused (propose)
      / some patient failed (sync; its report line says why) / the worklist is not empty (population)
  2   usage error (bad option, unknown profile or encounter, drafts refused for a mismatch,
      serve without SMART_ALLOWED_ISSUERS)
  3   a profile under profiles/ is malformed
  4   a patient record is malformed (bad JSON, wrong resource types, not R4)
  5   the FHIR server could not be reached or timed out
  6   the FHIR server answered with an error
  7   the patient (or resource) was not found
  8   the server refused the token (401/403)
  9   the token request failed (SMART Backend Services: discovery, client assertion, token endpoint)
  10  another sync job is using the same --state file (sync)
  11  any other plugin error;  70  an internal error (a bug: please report it with --debug output)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .._errors import PluginError
from .._version import __version__
from . import cds_feedback, check, keygen, population, propose, sandbox, serve, sync, synthetic

__all__ = ["main"]

_EXIT_HELP = __doc__.split("Exit codes:", 1)[1] if __doc__ else ""
_COMMANDS = {
    "check": check,
    "propose": propose,
    "synthetic": synthetic,
    "sync": sync,
    "serve": serve,
    "sandbox": sandbox,
    "cds-feedback": cds_feedback,
    "population": population,
    "keygen": keygen,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-plugin",
        description="Check a patient's FHIR R4 record for the documentation an ICD-10-CM code needs "
        "(default M62.561) and draft a provisional Condition and a phased CarePlan.",
        epilog="Exit codes:" + _EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fhir-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS.values():
        module.add_parser(sub, "Exit codes:" + _EXIT_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(_COMMANDS[args.command].run(args))
    except PluginError as exc:
        if args.debug:
            raise
        print(f"fhir-plugin: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fhir-plugin: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one sentence, the traceback only with --debug
        if args.debug:
            raise
        print(
            f"fhir-plugin: internal error ({type(exc).__name__}); run again with --debug for details", file=sys.stderr
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
