"""The ``fhir-plugin`` command line: check, propose (and write) drafts, sync a server headless.

Errors are one sentence on stderr and an exit code, never a traceback
(``--debug`` shows it).  Exit codes:

  0   every record checked is complete (check) / drafts made or written (propose) / stopped cleanly (serve)
  1   documentation gaps or a code mismatch found (check) / some patient's drafts refused (propose)
      / some patient failed (sync; its report line says why)
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
import json
import logging
import sys
from datetime import date, datetime, timezone
from typing import Any, Sequence

from . import __version__
from ._errors import PluginError, UsageError
from ._token_arg import TOKEN_FILE_HELP, TOKEN_HELP, read_token

__all__ = ["main"]

_EXIT_HELP = __doc__.split("Exit codes:", 1)[1] if __doc__ else ""
log = logging.getLogger("fhir_plugin.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-plugin",
        description="Check a patient's FHIR R4 record for the documentation an ICD-10-CM code needs "
                    "(default M62.561) and draft a provisional Condition and a phased CarePlan.",
        epilog="Exit codes:" + _EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fhir-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    source = common.add_argument_group("where the records come from (neither: the embedded synthetic patients)")
    source.add_argument("--server", metavar="URL", help="FHIR R4 base URL, e.g. http://127.0.0.1:8080/fhir")
    source.add_argument("--bundle", metavar="FILE", action="append", default=[],
                        help="a FHIR Bundle JSON file (repeatable)")
    common.add_argument("--patient", metavar="ID", action="append", default=[],
                        help="patient id to check (repeatable; required with --server)")
    common.add_argument("--encounter", metavar="ID", help="encounter to check at (default: the latest)")
    common.add_argument("--profile", metavar="CODE", default="M62.561", help="condition profile (default M62.561)")
    common.add_argument("--token", metavar="TOKEN", help=TOKEN_HELP)
    common.add_argument("--token-file", metavar="FILE", help=TOKEN_FILE_HELP)
    common.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per-request timeout")
    common.add_argument("--today", metavar="YYYY-MM-DD", help="the date 'not yet due' is judged against")
    common.add_argument("--format", choices=("text", "json"), default="text", help="report format")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (ids only)")

    sub.add_parser("check", parents=[common], help="print the documentation report",
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Exit codes:" + _EXIT_HELP)
    propose = sub.add_parser("propose", parents=[common], help="report plus draft Condition and CarePlan",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Exit codes:" + _EXIT_HELP)
    propose.add_argument("--write", action="store_true",
                         help="send the drafts to --server as one transaction (default: dry run, print the Bundle)")
    synthetic = sub.add_parser("synthetic", help="save the synthetic patients as Bundle files, or load them into a server")
    synthetic.add_argument("--out", metavar="DIR", help="write one Bundle per patient plus expected.json here")
    synthetic.add_argument("--server", metavar="URL", help="load them into this FHIR server by one transaction")
    synthetic.add_argument("--today", metavar="YYYY-MM-DD", help="the date the records are dated back from")
    synthetic.add_argument("--debug", action="store_true", help="show tracebacks")
    from ._sync import add_arguments as sync_arguments

    sync = sub.add_parser("sync", help="headless job: check changed (or listed) patients, write drafts, resume",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Exit codes:" + _EXIT_HELP)
    sync_arguments(sync)
    serve = sub.add_parser("serve", help="run the SMART app (settings from SMART_* environment variables)",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Exit codes:" + _EXIT_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes; they share the SQLite session store")
    serve.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (ids only)")
    demo = sub.add_parser("sandbox", help="try the app: sandbox HAPI + synthetic patients + sandbox EHR + the app")
    demo.add_argument("--hapi-port", type=int, default=8080, help="sandbox HAPI port (default 8080)")
    demo.add_argument("--ehr-port", type=int, default=9090, help="sandbox EHR port (default 9090)")
    demo.add_argument("--app-port", type=int, default=8000, help="SMART app port (default 8000)")
    demo.add_argument("--auto-approve", action="store_true", help="skip the EHR's approval page")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _today(value: str | None) -> date:
    if value is None:
        return date.today()
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise UsageError(f"--today wants a date like 2026-11-26, not {value!r}") from exc


def _checkables(args: argparse.Namespace, today: date) -> tuple[list[Any], Any]:
    from ._sources import Checkable, from_embedded, from_files, require_patients

    if args.server and args.bundle:
        raise UsageError("give either --server or --bundle, not both")
    if args.write and not args.server:
        raise UsageError("--write needs --server: drafts are written to a FHIR server")
    if args.encounter and len(args.patient) != 1:
        raise UsageError("--encounter applies to one patient: name it with --patient")
    if args.server:
        from ._client import FhirClient

        require_patients(args.patient)
        client = FhirClient(args.server, token=read_token(args), timeout=args.timeout)
        items = [Checkable(client.read_patient_record(pid.split("/")[-1]), args.encounter) for pid in args.patient]
        return items, client
    if args.bundle:
        items = from_files(args.bundle, args.patient)
    else:
        items = from_embedded(today, args.patient)
    if args.encounter:
        items = [Checkable(items[0].record, args.encounter)]
    return items, None


def _synthetic(args: argparse.Namespace) -> int:
    from .synthetic import generate_cases, load_into_server, save_cases

    if not args.out and not args.server:
        raise UsageError("say where the synthetic patients go: --out DIR and/or --server URL")
    cases = generate_cases(_today(args.today))
    if args.out:
        written = save_cases(cases, args.out)
        print(f"wrote {len(written)} files ({len(cases)} patients) to {args.out}")
    if args.server:
        load_into_server(args.server, cases)
        print(f"loaded {len(cases)} patients into {args.server} (ids start with fp-)")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "synthetic":
        return _synthetic(args)
    if args.command == "sync":
        from ._sync import sync_command

        return sync_command(args)
    if args.command == "sandbox":
        from sandbox.demo import run_sandbox

        return run_sandbox(hapi_port=args.hapi_port, ehr_port=args.ehr_port, app_port=args.app_port,
                           auto_approve=args.auto_approve)
    if args.command == "serve":
        from smart_launch import serve

        return serve(args.host, args.port, workers=args.workers, log_level="debug" if args.debug else "info")
    from ._check import check
    from ._profile import load_profile
    from ._render import render_summary, render_text

    today = _today(args.today)
    profile = load_profile(args.profile)
    items, client = _checkables(args, today)
    reports = [check(item.record, profile, today=today, encounter_id=item.encounter_id) for item in items]
    if args.command == "check":
        if args.format == "json":
            data: Any = [r.to_json() for r in reports]
            print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        elif len(reports) == 1:
            print(render_text(reports[0]))
        else:
            print(render_summary(reports))
        return 0 if all(r.complete for r in reports) else 1
    return _propose(args, profile, reports, client)


def _propose(args: argparse.Namespace, profile: Any, reports: list[Any], client: Any) -> int:
    from ._drafts import DraftsRefused, build_drafts
    from ._write import write_drafts

    now = datetime.now(timezone.utc)
    outputs: list[dict[str, Any]] = []
    refused = 0
    for report in reports:
        try:
            bundle = build_drafts(report, profile, now=now)
        except DraftsRefused as exc:
            refused += 1
            print(f"fhir-plugin: {exc}", file=sys.stderr)
            outputs.append({"report": report.to_json(), "drafts": None, "refused": str(exc)})
            continue
        if args.write:
            result = write_drafts(client, bundle)
            outputs.append({"report": report.to_json(), "written": result.to_json()})
            if args.format == "text":
                print(f"{report.patient}: " + result.summary())
        else:
            outputs.append({"report": report.to_json(), "drafts": bundle})
    if args.format == "json" or not args.write:
        print(json.dumps(outputs[0] if len(outputs) == 1 else outputs, indent=2))
    if refused:
        return 2 if refused == len(reports) and len(reports) == 1 else 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "write"):
        args.write = False
    try:
        return _run(args)
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
        print(f"fhir-plugin: internal error ({type(exc).__name__}); run again with --debug for details",
              file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
