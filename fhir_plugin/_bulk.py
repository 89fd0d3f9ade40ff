"""A FHIR Bulk Data Access client (``$export``): kick off, poll, download, resume, delete.

Bulk Data Access IG v2 (https://hl7.org/fhir/uv/bulkdata/export.html):

* kick-off: ``GET [base]/$export``, ``[base]/Patient/$export`` or ``[base]/Group/[id]/$export`` with
  ``Prefer: respond-async``; the server answers 202 with the status URL in ``Content-Location``;
* status: 202 while in progress (``X-Progress``, ``Retry-After``), 200 with the manifest
  (``transactionTime``, ``requiresAccessToken``, ``output`` and ``error`` file lists), 4xx/5xx
  with an OperationOutcome when the export failed, 404/410 once it expired or was deleted;
* files: NDJSON, fetched with the bearer token when ``requiresAccessToken`` is true;
* ``DELETE`` on the status URL ends the job and lets the server drop the files.

Resumable: the status URL, the manifest and every finished file are recorded in
``export.json`` in the download folder, so a job started again polls the same export
(it never kicks off a second one) and fetches only the files not finished.  A file is
written to ``NAME.part`` and renamed when complete; a server that honours ``Range``
continues a part file, one that does not (HAPI) sends it again from the start.

Why not a library: ``smart-fetch`` sends through its own async ``httpx`` client with
its own SMART authentication, and Pathling's bulk reader runs in the JVM with its own
auth configuration; neither takes our ``requests`` session (SMART Backend Services,
token renewal, the token kept to its server).  See docs/population.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests

from ._client import _is_outcome, _normal_base, _outcome_text, resolve_url, retry_after_seconds
from ._errors import NotFound, ServerError, TransportError, UsageError
from ._pace import RateLimiter
from ._vocab import PLAN_NOTE_TYPE

__all__ = [
    "ExportRequest",
    "ExportFile",
    "Manifest",
    "BulkExporter",
    "kickoff_url",
    "parse_manifest",
    "EXPORT_TYPES",
    "PLAN_NOTE_FILTER",
    "STATE_FILE",
]

log = logging.getLogger("fhir_plugin.bulk")

#: the resource types the population check reads (SPEC §3), and the Patient for the banner
EXPORT_TYPES = ("Patient", "Encounter", "Condition", "Observation", "CarePlan")
#: the plugin's plan-of-care notes only (``--plan-notes``): where its plan is on an EHR without CarePlan create
PLAN_NOTE_FILTER = f"DocumentReference?type={PLAN_NOTE_TYPE['system']}|{PLAN_NOTE_TYPE['code']}"
STATE_FILE = "export.json"
#: answers in a row that say "later" (a status other than 202, a 429 or a gateway's 5xx on any request, a
#: dropped connection) before the step is given up: the export as failed, a download until the next run
_RETRIES = 5
#: answers that speak for the whole server, not the request: wait (``Retry-After``) and send it again
_LATER = frozenset({429, 502, 503, 504})
_CHUNK = 1 << 16


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the level (``system``, ``patient``, or a Group's id), the types, and filters."""

    group: str | None = None
    level: str = "patient"  # "system" | "patient"; a group id overrides it
    types: tuple[str, ...] = EXPORT_TYPES
    since: str | None = None
    type_filters: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportFile:
    type: str
    url: str
    count: int | None = None


@dataclass(frozen=True)
class Manifest:
    """The completed export's manifest (Bulk Data IG, "Response - Complete Status")."""

    transaction_time: str
    requires_token: bool
    output: tuple[ExportFile, ...]
    error: tuple[ExportFile, ...] = ()


def kickoff_url(base: str, request: ExportRequest) -> tuple[str, list[tuple[str, str]]]:
    """The kick-off path under ``base`` and its query parameters. Pure."""
    if request.group:
        if "/" in request.group or not request.group.strip():
            raise UsageError(f"--group wants a Group id, not {request.group!r}")
        path = f"Group/{request.group}/$export"
    elif request.level == "system":
        path = "$export"
    elif request.level == "patient":
        path = "Patient/$export"
    else:
        raise UsageError(f"the export level is system or patient, not {request.level!r}")
    params = [("_outputFormat", "application/fhir+ndjson")]
    if request.types:
        params.append(("_type", ",".join(request.types)))
    if request.since:
        params.append(("_since", request.since))
    params += [("_typeFilter", f) for f in request.type_filters]
    return resolve_url(base, path), params


def _files(items: Any) -> tuple[ExportFile, ...]:
    out = []
    for item in items or []:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            out.append(ExportFile(str(item.get("type", "")), item["url"], item.get("count")))
    return tuple(out)


def parse_manifest(body: Any) -> Manifest:
    """The manifest from a 200 status answer; a body that is not one is a ServerError. Pure."""
    if not isinstance(body, dict) or not isinstance(body.get("output"), list):
        raise ServerError("the export's status answered 200 without a manifest (no 'output' list)")
    return Manifest(
        str(body.get("transactionTime", "")),
        bool(body.get("requiresAccessToken", False)),
        _files(body.get("output")),
        _files(body.get("error")),
    )


def _file_name(index: int, item: ExportFile) -> str:
    kind = "".join(c for c in item.type if c.isalnum()) or "Resource"
    return f"{index:03d}-{kind}.ndjson"


@dataclass
class _State:
    """What ``export.json`` holds: enough to resume without a second kick-off."""

    status_url: str | None = None
    manifest: dict[str, Any] | None = None
    done: list[str] = field(default_factory=list)
    deleted: bool = False


class BulkExporter:
    """One export into one folder; ``run`` does it all, resuming what ``export.json`` records.

    ``session`` carries the authentication (the sync job's SMART Backend Services session,
    or none); a static ``token`` is added only to requests under the FHIR base.  ``max_wait``
    caps one wait between polls (HAPI asks for 120 s); ``timeout`` ends the polling.  ``pacer``
    (``_pace.RateLimiter``) paces every request, kick-off, polls and downloads alike, and a 429's
    ``Retry-After`` holds it (the write-back's client may share it: the EHR meters the app).
    """

    def __init__(
        self,
        base_url: str,
        folder: str | Path,
        *,
        session: requests.Session | None = None,
        token: str | None = None,
        request_timeout: float = 60.0,
        max_wait: float = 120.0,
        timeout: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        progress: TextIO | None = None,
        on_waiting: Callable[[], None] | None = None,
        pacer: RateLimiter | None = None,
    ) -> None:
        self.base = _normal_base(base_url)
        self._pacer = pacer if pacer is not None else RateLimiter(None, clock=clock, sleep=sleep)
        #: called once, when the server first says the export is still running (the caller's time to prepare)
        self._on_waiting = on_waiting
        self.folder = Path(folder)
        self._session = session or requests.Session()
        self._token = token
        self._request_timeout = request_timeout
        self._max_wait = max_wait
        self._timeout = timeout
        self._sleep = sleep
        self._clock = clock
        self._progress = progress
        self.kickoffs = 0  # for tests: a resumed run kicks off nothing

    # ---- state -------------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.folder / STATE_FILE

    def _load(self) -> _State:
        try:
            data = json.loads(self._state_path().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"{self._state_path()} is not a readable export state; delete the folder to start a new export ({exc})"
            ) from exc
        return _State(
            **{k: data.get(k) for k in ("status_url", "manifest", "deleted") if k in data},
            done=list(data.get("done") or []),
        )

    def _save(self, state: _State) -> None:
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        os.replace(tmp, self._state_path())  # never a half-written state file

    # ---- HTTP --------------------------------------------------------------------------------
    def _headers(self, url: str, accept: str, with_token: bool = True) -> dict[str, str]:
        headers = {"Accept": accept}
        if with_token and self._token:
            resolve_url(self.base, url)  # the token never leaves its server
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _get(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        params: Sequence[tuple[str, str]] = (),
        stream: bool = False,
        session: requests.Session | None = None,
    ) -> requests.Response:
        self._pacer.wait()
        try:
            response = (session or self._session).request(
                method, url, headers=headers, params=list(params) or None, timeout=self._request_timeout, stream=stream
            )
        except requests.RequestException as exc:
            raise TransportError(f"the export at {self.base} could not be reached ({type(exc).__name__})") from exc
        if response.status_code in (429, 503):  # the whole server's "later", as FhirClient reads it
            held = retry_after_seconds(response.headers.get("Retry-After"))
            if held is not None:
                self._pacer.hold_for(min(held, self._max_wait))
        return response

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """How long to wait before trying again: the server's ``Retry-After``, else 1, 2, 4… s; capped by max_wait."""
        asked = retry_after_seconds(retry_after)
        return min(self._max_wait, asked if asked is not None else 2.0**attempt)

    def _retried(
        self,
        what: str,
        method: str,
        url: str,
        *,
        reconnect: bool,
        headers: dict[str, str],
        params: Sequence[tuple[str, str]] = (),
        stream: bool = False,
        session: requests.Session | None = None,
    ) -> requests.Response:
        """One request (``_get``), sent again while the server says "later" (``_LATER``) and, with
        ``reconnect``, while the connection fails: ``_RETRIES`` times in a row at most, then its
        last answer (or error) stands.

        Without ``reconnect`` a dropped connection is final: a kick-off that may have reached the
        server is not sent twice (two export jobs).
        """
        attempt = 0
        while True:
            try:
                response = self._get(method, url, headers=headers, params=params, stream=stream, session=session)
            except TransportError:
                if not reconnect or attempt >= _RETRIES:
                    raise
                wait, said = self._wait(attempt, None), "the connection failed"
            else:
                if response.status_code not in _LATER or attempt >= _RETRIES:
                    return response
                wait, said = self._wait(attempt, response.headers.get("Retry-After")), f"HTTP {response.status_code}"
                response.close()
            self._say(f"export: {what}: {said}; trying again in {wait:.0f} s")
            self._sleep(wait)
            attempt += 1

    @staticmethod
    def _outcome(response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            return None

    def _say(self, text: str) -> None:
        if self._progress is not None:
            print(text, file=self._progress, flush=True)

    # ---- the steps ---------------------------------------------------------------------------
    def kickoff(self, request: ExportRequest) -> str:
        """Start the export; return its status URL."""
        url, params = kickoff_url(self.base, request)
        headers = self._headers(url, "application/fhir+json")
        headers["Prefer"] = "respond-async"
        response = self._retried("the kick-off", "GET", url, headers=headers, params=params, reconnect=False)
        self.kickoffs += 1
        if response.status_code != 202:
            outcome = self._outcome(response)
            said = _outcome_text(outcome) if _is_outcome(outcome) else ""
            raise ServerError(
                f"the server refused the $export kick-off (HTTP {response.status_code}{': ' + said if said else ''})",
                status=response.status_code,
                outcome=outcome,
            )
        location = response.headers.get("Content-Location")
        if not location:
            raise ServerError("the $export kick-off answered 202 without a Content-Location status URL")
        return resolve_url(self.base, location)

    def poll(self, status_url: str) -> Manifest:
        """Poll until the export completes, honouring Retry-After (capped by ``max_wait``).

        A status answer that says "later" without failing the job — a gateway's 502/503/504,
        or a 5xx whose OperationOutcome is ``transient`` (the IG's sign that the job goes on)
        — is polled again, at most ``_RETRIES`` times in a row; so is a dropped connection (the
        export goes on on the server; past the limit the run ends, and the next one polls it again).
        """
        started = self._clock()
        transient = 0
        while True:
            try:
                response = self._get("GET", status_url, headers=self._headers(status_url, "application/json"))
            except TransportError as exc:
                transient += 1
                if transient > _RETRIES:
                    raise TransportError(f"{exc}; run again to keep waiting for the same export") from exc
                self._pause(started, self._wait(transient - 1, None), "the connection to the server failed")
                continue
            if response.status_code == 200:
                return parse_manifest(self._outcome(response))
            if response.status_code in (404, 410):
                raise NotFound(
                    "the export expired or was deleted on the server; start a new one with --fresh-export",
                    status=response.status_code,
                    outcome=self._outcome(response),
                )
            transient = transient + 1 if _transient(response, self._outcome(response)) else 0
            if response.status_code not in (202, 429) and not 0 < transient <= _RETRIES:
                raise ServerError(
                    f"the export failed on the server (HTTP {response.status_code})",
                    status=response.status_code,
                    outcome=self._outcome(response),
                )
            state = (
                f"the server answered HTTP {response.status_code}, not a verdict on the export"
                if transient
                else response.headers.get("X-Progress") or "in progress"
            )
            self._pause(started, self._wait(0, response.headers.get("Retry-After")), state)

    def _pause(self, started: float, wait: float, state: str) -> None:
        """One wait between polls, said on the progress display; past ``timeout`` the polling ends."""
        elapsed = self._clock() - started
        if elapsed + wait > self._timeout:
            raise TransportError(
                f"the export did not finish within {self._timeout:.0f} s; run again to keep waiting for the same export"
            )
        self._say(f"export: {state} ({elapsed:.0f} s; next look in {wait:.0f} s)")
        if self._on_waiting is not None:
            waiting, self._on_waiting = self._on_waiting, None
            waiting()
        self._sleep(wait)

    def download(self, manifest: Manifest, state: _State) -> list[Path]:
        """Fetch every output file not yet done; record each as it finishes."""
        paths = []
        token_session = self._session if manifest.requires_token else requests.Session()
        for index, item in enumerate(manifest.output):
            target = self.folder / _file_name(index, item)
            paths.append(target)
            if target.name in state.done and target.exists():
                continue
            self._fetch(item, target, token_session, manifest.requires_token)
            state.done.append(target.name)
            self._save(state)
            self._say(f"export: downloaded {target.name} ({len(state.done)}/{len(manifest.output)})")
        return paths

    def _fetch(self, item: ExportFile, target: Path, session: requests.Session, with_token: bool) -> None:
        """One file, its ``.part`` continued after a cut-off (``Range``), ``_RETRIES`` times in a row at most."""
        cut = 0
        while True:
            try:
                self._fetch_once(item, target, session, with_token)
                return
            except TransportError:
                if cut >= _RETRIES:
                    raise
            wait = self._wait(cut, None)
            self._say(f"export: downloading {target.name} was cut off; going on in {wait:.0f} s")
            self._sleep(wait)
            cut += 1

    def _fetch_once(self, item: ExportFile, target: Path, session: requests.Session, with_token: bool) -> None:
        part = target.with_name(target.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        headers = self._headers(item.url, "application/fhir+ndjson", with_token)
        if have:
            headers["Range"] = f"bytes={have}-"
        response = self._retried(
            f"downloading {target.name}",
            "GET",
            item.url,
            headers=headers,
            stream=True,
            session=session,
            reconnect=False,  # _fetch goes on from the part file
        )
        with response:
            if response.status_code in (404, 410):
                raise NotFound(
                    f"the export's file {target.name} ({item.type}) expired on the server; start a new "
                    "export with --fresh-export",
                    status=response.status_code,
                )
            if response.status_code not in (200, 206):
                raise ServerError(
                    f"downloading {target.name} ({item.type}) failed (HTTP {response.status_code})",
                    status=response.status_code,
                )
            mode = "ab" if response.status_code == 206 and have else "wb"  # a 200 sends the file whole
            try:
                with open(part, mode) as out:
                    for chunk in response.iter_content(_CHUNK):
                        out.write(chunk)
            except requests.RequestException as exc:
                raise TransportError(
                    f"downloading {target.name} was cut off ({type(exc).__name__}); run again to resume"
                ) from exc
        os.replace(part, target)

    def errors(self, manifest: Manifest) -> list[dict[str, Any]]:
        """The export's error files (OperationOutcomes, NDJSON), read and returned as issues."""
        issues: list[dict[str, Any]] = []
        for item in manifest.error:
            headers = self._headers(item.url, "application/fhir+ndjson", manifest.requires_token)
            response = self._retried("reading an error file", "GET", item.url, headers=headers, reconnect=True)
            if response.status_code != 200:
                issues.append(
                    {
                        "file": item.url.rsplit("/", 1)[-1],
                        "line": None,
                        "problem": f"the export's error file could not be read (HTTP {response.status_code})",
                    }
                )
                continue
            for lineno, line in enumerate(response.text.splitlines(), 1):
                if line.strip():
                    issues.append({"file": item.url.rsplit("/", 1)[-1], "line": lineno, "problem": _issue_text(line)})
        return issues

    def delete(self, status_url: str) -> bool:
        """Tell the server the job is done (it may then drop the files); a 404 means it already has.

        A courtesy, not the run's result: when the server cannot be reached the files are kept
        and the run goes on (False; the next run in this folder asks again), and the server
        expires the job in its own time.
        """
        try:
            response = self._retried(
                "deleting the job",
                "DELETE",
                status_url,
                headers=self._headers(status_url, "application/json"),
                reconnect=True,
            )
        except TransportError as exc:
            log.warning("deleting the export job failed: %s", exc)
            return False
        if response.status_code >= 400 and response.status_code not in (404, 410):
            log.warning("deleting the export job answered HTTP %s", response.status_code)
        return True

    def run(self, request: ExportRequest, *, fresh: bool = False) -> tuple[list[Path], list[dict[str, Any]]]:
        """The whole export into ``folder``: the NDJSON paths and the export's own error issues."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = _State() if fresh else self._load()
        if fresh:
            for old in self.folder.glob("*.ndjson*"):
                old.unlink()
        if state.manifest is None:
            if state.status_url is None:
                state.status_url = self.kickoff(request)
                self._save(state)
            manifest = self.poll(state.status_url)
            state.manifest = asdict(manifest)
            self._save(state)
        manifest = _manifest_from_state(state.manifest)
        paths = self.download(manifest, state)
        issues = self.errors(manifest) if manifest.error else []
        if state.status_url and not state.deleted and self.delete(state.status_url):
            state.deleted = True
            self._save(state)
        return paths, issues


def _transient(response: requests.Response, outcome: Any) -> bool:
    """A status answer that is no verdict on the export: a gateway's 502/503/504, or a 5xx marked ``transient``."""
    if response.status_code in (502, 503, 504):
        return True
    codes = (
        {i.get("code") for i in (outcome or {}).get("issue") or [] if isinstance(i, dict)}
        if _is_outcome(outcome)
        else set()
    )
    return response.status_code >= 500 and "transient" in codes


def _manifest_from_state(data: dict[str, Any]) -> Manifest:
    return Manifest(
        data["transaction_time"],
        data["requires_token"],
        tuple(ExportFile(**f) for f in data["output"]),
        tuple(ExportFile(**f) for f in data["error"]),
    )


def _issue_text(line: str) -> str:
    """One OperationOutcome line of an error file as a sentence (the diagnostics of its issues)."""
    try:
        outcome = json.loads(line)
    except ValueError:
        return line[:300]
    texts: Iterable[str] = (
        str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code"))
        for i in (outcome.get("issue") or [])
        if isinstance(i, dict)
    )
    return "; ".join(texts)[:300] or "an OperationOutcome without issues"
