"""``fhir-plugin sync``: the headless job — find the patients to check, check each, write the drafts, resume.

One run, in order:

1. **Which patients.**  Those whose Condition, Observation, Encounter or
   CarePlan changed since the checkpoint's high-water mark
   (``_lastUpdated=gt<mark>``, every page, the plugin's own drafts left out
   with ``_tag:not``), plus any patient that failed in an earlier run; or an
   explicit ``--patient`` list, a ``--group``'s members, or ``--all``.  With
   no mark yet, a changes run checks every patient.  The list is stored in
   the state file before any patient is touched.
2. **Each patient** (``--concurrency`` threads): read the record (one batch
   round trip), check it, build the drafts, and with ``--write`` send them as
   ONE transaction of conditional creates — all of a patient or nothing, and
   sending it twice writes nothing new.  The outcome is committed to the state
   file as soon as the patient is finished, and one JSON line is reported.
3. **The mark** moves only when the run finishes (changes and ``--all``
   runs): to the server's own time of the patient search (the searchset's
   ``meta.lastUpdated``, else its ``Date`` header) minus a safety margin, so
   a change committed while the search ran is seen next time.

A killed job, started again with the same options, finds its unfinished run
and does the patients not yet done (failed ones get another try); the lines of
those done before are replayed into the report, so the report of the resumed
run covers every patient once.  A patient whose transaction reached the
server but whose outcome was not recorded is sent again: a no-op.

Errors: a patient's own problem (malformed data, not found, a server error,
no answer after the client's retries) is that patient's ``error`` line and the
run goes on.  A refused token (``AuthError`` after one renewal,
``LaunchError``) stops the run, as does a server that stops answering
altogether (``--max-transport-errors`` patients in a row); the run stays
unfinished, to be resumed.

Report lines carry ids and statuses only — never names, birth dates or free text.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, TextIO

import requests

from ._backend_auth import ScopeRequest
from ._checkpoint import Checkpoint, Run
from ._client import FhirClient, search_matches
from ._errors import AuthError, LaunchError, PluginError, TransportError, UsageError
from ._profile import Profile
from ._read import NOTE_TYPES
from ._record import CLINICAL_TYPES, patient_id_of, subject_patient_id
from ._review import review
from ._strategies import WRITE_TYPES, detected_strategies
from ._vocab import DRAFT_TAG, READ_TYPES

__all__ = [
    "Selection",
    "SyncOptions",
    "SyncResult",
    "run_sync",
    "default_scope",
    "job_scopes",
    "parse_instant",
    "patient_line",
    "changed_patients",
    "group_members",
    "all_patients",
    "sync_patient",
    "PatientOutcome",
    "ServerClock",
]

log = logging.getLogger("fhir_plugin.sync")

#: the mark is the server time of the search minus this, so a change whose transaction
#: was still committing while we searched is not missed (re-checking is harmless)
SAFETY_MARGIN = timedelta(minutes=2)
#: page size for the patient searches (the server may cap it; ``next`` links are followed)
SEARCH_PAGE = 500
#: how many patients in a row may fail for want of an answer before the run stops
DEFAULT_MAX_TRANSPORT_ERRORS = 10
STATUSES = ("complete", "gaps", "refused", "error")


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class Selection:
    """Which patients a run checks: explicit ids, a Group, all, or (none of those) the changed ones."""

    patients: tuple[str, ...] = ()
    group: str | None = None
    all: bool = False
    since: str | None = None

    def __post_init__(self) -> None:
        given = sum((bool(self.patients), self.group is not None, self.all))
        if given > 1:
            raise UsageError("choose one of --patient, --group and --all")
        if self.since is not None and given:
            raise UsageError("--since applies to a changes run; leave out --patient, --group and --all")

    @property
    def mode(self) -> str:
        if self.patients:
            return "patients"
        if self.group is not None:
            return "group"
        return "all" if self.all else "changed"

    def signature(self) -> str:
        """What makes two runs the same job (a resumed run must be asked for the same thing)."""
        data: dict[str, Any] = {"mode": self.mode}
        if self.patients:
            data["patients"] = sorted(set(self.patients))
        if self.group is not None:
            data["group"] = self.group
        if self.since is not None:
            data["since"] = self.since
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class SyncOptions:
    selection: Selection = field(default_factory=Selection)
    write: bool = False
    concurrency: int = 4
    today: date | None = None
    fresh: bool = False
    max_transport_errors: int = DEFAULT_MAX_TRANSPORT_ERRORS
    #: the writer: ``auto`` detects it from the CapabilityStatement (issue 12); ledger = the ledger writer's file
    strategy: str = "auto"
    ledger: str | None = None
    #: the types the token lets the job create (None: no limit known); the rest are folded (issue 12, item 5)
    creatable: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 64:
            raise UsageError("--concurrency must be between 1 and 64")
        if self.max_transport_errors < 1:
            raise UsageError("--max-transport-errors must be at least 1")


@dataclass
class SyncResult:
    """What a run did: counts per status, drafts written, and whether it finished."""

    run: int
    mode: str
    total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    created: int = 0
    existing: int = 0
    replayed: int = 0
    elapsed: float = 0.0
    finished: bool = False
    mark: str | None = None

    @property
    def failed(self) -> int:
        return self.counts["error"]

    def add(self, line: Mapping[str, Any]) -> None:
        self.counts[line["status"]] += 1
        written = line.get("written") or {}
        self.created += len(written.get("created") or [])
        self.existing += len(written.get("existing") or [])

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": {
                "run": self.run,
                "mode": self.mode,
                "patients": self.total,
                **self.counts,
                "created": self.created,
                "existing": self.existing,
                "from_earlier_attempt": self.replayed,
                "finished": self.finished,
                "mark": self.mark,
                "elapsed_s": round(self.elapsed, 3),
            }
        }


# ---------------------------------------------------------------- pure parts


def _written(written: Mapping[str, Any]) -> dict[str, Any]:
    """What one patient's write did; ``forms`` and ``not_written`` when the drafts were folded (issue 12, writer d:
    nothing dropped silently, README "On the EHRs clinicians use")."""
    out: dict[str, Any] = {
        "created": list(written.get("created") or []),
        "existing": list(written.get("existing") or []),
    }
    for extra in ("forms", "not_written"):
        if written.get(extra):
            out[extra] = list(written[extra])
    return out


def patient_line(
    patient_id: str,
    *,
    status: str,
    report: Any = None,
    written: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One report line: ids and statuses only (element ids for gaps, the code-fit status)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    return {
        "patient": f"Patient/{patient_id}",
        "status": status,
        "gaps": [g.id for g in report.gaps()] if report is not None else [],
        "code_fit": report.code_fit.status if report is not None else None,
        "written": _written(written) if written is not None else None,
        "error": error,
    }


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_instant(value: datetime) -> str:
    """A FHIR instant in UTC with milliseconds: sorts as text, and HAPI takes it in ``_lastUpdated``."""
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%S.") + f"{_utc(value).microsecond // 1000:03d}Z"


def parse_instant(value: str, what: str = "--since") -> datetime:
    """A FHIR dateTime (date alone means midnight UTC) as an aware UTC datetime; UsageError if it is not one."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError as exc:
        raise UsageError(f"{what} wants a time like 2026-11-26T08:00:00Z, not {value!r}") from exc
    return _utc(parsed)


def _bundle_time(bundle: Mapping[str, Any]) -> datetime | None:
    stamp = (bundle.get("meta") or {}).get("lastUpdated")
    if isinstance(stamp, str):
        try:
            return parse_instant(stamp, "meta.lastUpdated")
        except UsageError:
            return None
    return None


# ---------------------------------------------------------------- the server's clock


class ServerClock:
    """A ``requests`` response hook that remembers the latest ``Date`` header (the server's time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latest: datetime | None = None

    def __call__(self, response: requests.Response, **_: Any) -> requests.Response:
        value = response.headers.get("Date")
        if value:
            try:
                when = _utc(parsedate_to_datetime(value))
            except (TypeError, ValueError, IndexError):
                return response
            with self._lock:
                self.latest = when
        return response


# ---------------------------------------------------------------- which patients


def changed_patients(
    client: FhirClient,
    since: datetime,
    types: Sequence[str] = CLINICAL_TYPES,
) -> tuple[list[str], datetime | None]:
    """Distinct ids of the patients with a resource of ``types`` updated after ``since``, and the server's time.

    The plugin's own drafts are left out (``_tag:not``): writing them must not
    make the patient "changed" for the next run.  The time returned is the
    earliest ``meta.lastUpdated`` of the first pages (None if the server sets none).
    """
    found: dict[str, None] = {}
    server_time: datetime | None = None
    draft_tag = f"{DRAFT_TAG['system']}|{DRAFT_TAG['code']}"
    for rtype in types:
        params = [
            ("_lastUpdated", f"gt{format_instant(since)}"),
            ("_tag:not", draft_tag),
            ("_elements", "subject,patient"),
            ("_count", str(SEARCH_PAGE)),
        ]
        for number, page in enumerate(client.search_bundle_pages(rtype, params)):
            if number == 0:
                when = _bundle_time(page)
                if when is not None and (server_time is None or when < server_time):
                    server_time = when
            for resource in search_matches(page):
                pid = subject_patient_id(resource)
                if pid:
                    found.setdefault(pid, None)
    return list(found), server_time


def all_patients(client: FhirClient) -> tuple[list[str], datetime | None]:
    """Every Patient id on the server (ids only), and the server's time of the search."""
    ids: dict[str, None] = {}
    server_time: datetime | None = None
    for number, page in enumerate(
        client.search_bundle_pages("Patient", [("_elements", "id"), ("_count", str(SEARCH_PAGE))])
    ):
        if number == 0:
            server_time = _bundle_time(page)
        for resource in search_matches(page):
            if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
                ids.setdefault(resource["id"], None)
    return list(ids), server_time


def group_members(client: FhirClient, group_id: str) -> list[str]:
    """The Patient ids among a Group's active members (FHIR Group.member.entity)."""
    group = client.read("Group", group_id)
    ids: dict[str, None] = {}
    for member in group.get("member") or []:
        if not isinstance(member, dict) or member.get("inactive") is True:
            continue
        pid = patient_id_of((member.get("entity") or {}).get("reference"))
        if pid:
            ids.setdefault(pid, None)
    return list(ids)


# ---------------------------------------------------------------- one patient

_RUN_FATAL = (AuthError, LaunchError)


@dataclass(frozen=True)
class PatientOutcome:
    """A patient's report line, and whether its error was the server not answering at all."""

    line: dict[str, Any]
    no_answer: bool = False

    @property
    def failed(self) -> bool:
        return bool(self.line["status"] == "error")


def sync_patient(
    client: FhirClient,
    profile: Profile,
    patient_id: str,
    *,
    today: date,
    write: bool,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    strategy: str = "auto",
    ledger: str | None = None,
    creatable: frozenset[str] | None = None,
) -> PatientOutcome:
    """Read, check, draft and (with ``write``) send one patient's drafts; the outcome as a report line.

    A problem of this patient's is its ``error`` line.  A refused token is
    raised instead: no other patient would fare better.
    """
    try:
        strategies = detected_strategies(client, strategy=strategy, ledger=ledger, creatable=creatable)
        result = review(strategies.reader.read(patient_id), profile, today=today, now=now())
        if result.refused is not None:  # a code mismatch; a settled record (SPEC §7.1) just has nothing new
            return PatientOutcome(patient_line(patient_id, status="refused", report=result.report))
        written = strategies.writer.write(result.drafts).to_json() if write and result.drafts else None
        status = "complete" if result.report.complete else "gaps"
        return PatientOutcome(patient_line(patient_id, status=status, report=result.report, written=written))
    except _RUN_FATAL:
        raise
    except PluginError as exc:
        return PatientOutcome(
            patient_line(patient_id, status="error", error=_sentence(str(exc))),
            no_answer=isinstance(exc, TransportError),
        )
    except Exception as exc:  # a bug: report it for this patient, never its data
        log.debug("internal error on Patient/%s: %s", patient_id, type(exc).__name__)
        return PatientOutcome(
            patient_line(patient_id, status="error", error=f"internal error ({type(exc).__name__}); please report it.")
        )


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


# ---------------------------------------------------------------- progress


class Progress:
    """A bar on a terminal, a plain line now and then otherwise; always on stderr, never with data."""

    def __init__(self, total: int, done: int, stream: TextIO, *, every: float = 10.0) -> None:
        self.total = total
        self.done = done
        self.failed = 0
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self._first = done
        self._last_draw = 0.0
        self._every = every
        self._step = max(1, total // 20)

    def _rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self._first) / elapsed if elapsed > 0 else 0.0

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.1 or self.done == self.total:
                self._last_draw = now
                self.draw()
        elif self.done == self.total or self.done % self._step == 0 or now - self._last_draw >= self._every:
            self._last_draw = now
            self.stream.write(
                f"fhir-plugin sync: {self.done} of {self.total} patients done"
                f"{f' ({self.failed} failed)' if self.failed else ''}, {self._rate():.1f}/s\n"
            )
            self.stream.flush()

    def draw(self) -> None:
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        failed = f" {self.failed} failed" if self.failed else ""
        self.stream.write(f"\r\x1b[Ksync [{bar}] {self.done}/{self.total} {self._rate():.1f}/s{failed}")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------- the run


def _scope(client: FhirClient, profile: Profile, write: bool) -> str:
    return f"{client.base_url}|{profile.code}|{'write' if write else 'dry-run'}"


def _select(
    client: FhirClient, checkpoint: Checkpoint, scope: str, selection: Selection, clock: ServerClock | None
) -> tuple[list[str], str | None, str | None]:
    """The run's patients, the mark it started from, and the mark it will set (None: it sets none)."""
    if selection.mode == "patients":
        return [p.split("/")[-1] for p in selection.patients], None, None
    if selection.mode == "group":
        return group_members(client, selection.group or ""), None, None
    stored = checkpoint.mark(scope)
    since_text = selection.since if selection.since is not None else stored
    if selection.mode == "all" or since_text is None:
        ids, server_time = all_patients(client)
        since = None
    else:
        since = parse_instant(since_text)
        ids, server_time = changed_patients(client, since)
        # patients that failed before get another try, even with nothing new in their record
        ids = list(dict.fromkeys(ids + checkpoint.outstanding_failures(scope)))
    if server_time is None:
        server_time = clock.latest if clock is not None and clock.latest is not None else None
    if server_time is None:
        log.warning("the server gave no time with its search; the local clock sets the mark")
        server_time = datetime.now(UTC)
    mark = server_time - SAFETY_MARGIN
    if since is not None and mark < since:
        mark = since
    if since is not None and stored is not None and since > parse_instant(stored, "the stored mark"):
        # --since later than the mark skipped the changes in between: the mark must not pass over them
        return ids, format_instant(since), None
    return ids, (format_instant(since) if since else None), format_instant(mark)


def run_sync(
    client: FhirClient,
    checkpoint: Checkpoint,
    options: SyncOptions,
    *,
    profile: Profile,
    out: TextIO,
    progress_stream: TextIO | None = None,
    clock: ServerClock | None = None,
) -> SyncResult:
    """One sync run (new or resumed) against ``client``, remembered in ``checkpoint``, reported to ``out``."""
    started = time.monotonic()
    today = options.today or date.today()
    scope = _scope(client, profile, options.write)
    signature = options.selection.signature()
    run = checkpoint.unfinished_run(scope)
    if run is not None and run.signature != signature and not options.fresh:
        left = checkpoint.counts(run)
        raise UsageError(
            f"{checkpoint.path} holds an unfinished sync run ({run.signature}, started {run.started}, "
            f"{left['pending'] + left['failed']} patients left) that asked for other patients; "
            "run that command again to finish it, or add --fresh to drop it"
        )
    if run is not None and options.fresh:
        log.info("dropping unfinished run %d (--fresh)", run.id)
        checkpoint.abandon(run)
        run = None
    if run is None:
        ids, since, mark = _select(client, checkpoint, scope, options.selection, clock)
        run = checkpoint.start_run(scope, signature, ids, since=since, mark=mark)
        log.info("sync run %d: %d patients to check (%s)", run.id, len(ids), options.selection.mode)
    else:
        log.info("resuming sync run %d", run.id)

    result = SyncResult(run.id, options.selection.mode, mark=run.mark)
    for line in checkpoint.done_lines(run):  # replay what an earlier attempt of this run finished
        _emit(out, line, None)
        result.add(line)
        result.replayed += 1
    todo = checkpoint.todo(run)
    result.total = result.replayed + len(todo)
    progress = Progress(result.total, result.replayed, progress_stream) if progress_stream is not None else None
    fatal = _work(client, checkpoint, run, todo, options, profile, today, out, result, progress)
    if progress is not None:
        progress.close()
    result.finished = fatal is None
    if fatal is None:
        checkpoint.finish_run(run, set_mark=options.selection.mode in ("changed", "all"))
    result.elapsed = time.monotonic() - started
    _emit(out, result.to_json(), None)
    if fatal is not None:
        raise fatal
    return result


def _emit(out: TextIO, line: Mapping[str, Any], progress: Progress | None) -> None:
    if progress is not None and progress.tty and getattr(out, "isatty", lambda: False)():
        progress.clear()
    out.write(json.dumps(line, separators=(", ", ": ")) + "\n")
    out.flush()


def _work(
    client: FhirClient,
    checkpoint: Checkpoint,
    run: Run,
    todo: list[str],
    options: SyncOptions,
    profile: Profile,
    today: date,
    out: TextIO,
    result: SyncResult,
    progress: Progress | None,
) -> PluginError | None:
    """Check the ``todo`` patients on a bounded pool; record and report each as it finishes.

    At most ``2 × concurrency`` patients are queued at a time, so memory stays
    flat however long the list.  Returns the error that stopped the run, if any.
    """
    pending = iter(todo)
    inflight: dict[Future[PatientOutcome], str] = {}
    fatal: PluginError | None = None
    interrupted = False
    transport_streak = 0

    def task(pid: str) -> PatientOutcome:
        return sync_patient(
            client,
            profile,
            pid,
            today=today,
            write=options.write,
            strategy=options.strategy,
            ledger=options.ledger,
            creatable=options.creatable,
        )

    with ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="fhir-plugin-sync") as pool:

        def fill() -> None:
            while fatal is None and not interrupted and len(inflight) < 2 * options.concurrency:
                pid = next(pending, None)
                if pid is None:
                    return
                inflight[pool.submit(task, pid)] = pid

        fill()
        while inflight:
            try:
                finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                interrupted = True
                for future in list(inflight):
                    if future.cancel():
                        del inflight[future]
                continue
            for future in finished:
                pid = inflight.pop(future)
                try:
                    outcome = future.result()
                except _RUN_FATAL as exc:  # this patient stays pending: the resumed run does it
                    fatal = fatal or exc
                    for queued in list(inflight):  # those not started yet stay pending too
                        if queued.cancel():
                            del inflight[queued]
                    continue
                transport_streak = transport_streak + 1 if outcome.no_answer else 0
                checkpoint.record(run, pid, failed=outcome.failed, line=outcome.line)
                _emit(out, outcome.line, progress)
                result.add(outcome.line)
                log.debug("Patient/%s: %s (%d gaps)", pid, outcome.line["status"], len(outcome.line["gaps"]))
                if progress is not None:
                    progress.advance(outcome.failed)
                if transport_streak >= options.max_transport_errors and fatal is None:
                    fatal = TransportError(
                        f"stopped after {transport_streak} patients in a row got no answer from "
                        f"{client.base_url}; run the same command again to resume"
                    )
            fill()
    if interrupted:
        raise KeyboardInterrupt
    return fatal


# ---------------------------------------------------------------- the command line


def job_scopes(selection: Selection, write: bool, *, notes: bool = True) -> ScopeRequest:
    """What the job does with each type, for the SMART scopes it asks (spelled v2 or v1 by ``_backend_auth``).

    Least privilege: the review's types are searched, and with ``notes`` (the
    sync job's readers) the plugin's plan notes and their Provenance, so a dry
    run reads a folded plan as drafted, as a writing run does; with ``--write``
    the drafts and the plan note they may fold into are created (and found
    again: the ledger writer searches for each, and reads back by id each it
    made but a Provenance); a Group is read by id.
    """
    creates = WRITE_TYPES if write else ()
    reads = tuple(t for t in WRITE_TYPES if t != "Provenance") if write else ()
    if selection.mode == "group":
        reads += ("Group",)
    return ScopeRequest(READ_TYPES + (NOTE_TYPES if notes else ()), reads, creates)


def default_scope(selection: Selection, write: bool) -> str:
    """SMART v2 system scopes for what the job reads and (with --write) creates: least privilege."""
    return job_scopes(selection, write).v2()
