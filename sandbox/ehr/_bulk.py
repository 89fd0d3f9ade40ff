"""Bulk Data export through the sandbox EHR (FHIR Bulk Data Access 2.0).  No I/O.

A vendor's EHR lets a backend client (SMART Backend Services, ``system/`` scopes)
export what its scopes read, at the levels the vendor offers (Epic: Group only;
Oracle Health: Group and Patient), and serves the status and the files only to
the client that started the export, with its token.  The proxy forwards to HAPI;
this module decides what is allowed and rewrites the manifest:

- :func:`export_call` names the call a path makes (kick-off, status, or none);
- :func:`check_kickoff` refuses a kick-off the token or the vendor does not allow;
- :class:`Exports` remembers which client owns which export and which files;
- :func:`rewrite_manifest` moves the file URLs to the proxy and says the token is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ._access import Denied
from ._scopes import ResourceScope

__all__ = ["ExportCall", "Exports", "export_call", "check_kickoff", "job_id", "rewrite_manifest", "STATUS_PATH"]

#: HAPI's status URL (``[base]/$export-poll-status?_jobId=…``), which the proxy serves at its own base
STATUS_PATH = "$export-poll-status"


@dataclass(frozen=True)
class ExportCall:
    """A Bulk Data call: ``kickoff`` (with its level and group) or ``status``."""

    kind: str  # kickoff | status
    level: str = ""  # system | patient | group
    group: str | None = None


def export_call(path: str) -> ExportCall | None:
    """The Bulk Data call a FHIR path makes, or None when it is not one."""
    parts = [p for p in path.strip("/").split("/") if p]
    if parts == ["$export"]:
        return ExportCall("kickoff", "system")
    if parts == ["Patient", "$export"]:
        return ExportCall("kickoff", "patient")
    if len(parts) == 3 and parts[0] == "Group" and parts[2] == "$export":
        return ExportCall("kickoff", "group", parts[1])
    if parts == [STATUS_PATH]:
        return ExportCall("status")
    return None


def _types(params: Iterable[tuple[str, str]]) -> list[str]:
    return [t.strip() for k, v in params if k == "_type" for t in v.split(",") if t.strip()]


def check_kickoff(
    call: ExportCall, params: Iterable[tuple[str, str]], scopes: Iterable[ResourceScope], levels: frozenset[str]
) -> None:
    """Denied unless the vendor offers this level and the token's ``system/`` scopes read every type asked.

    No ``_type`` asks for every type, which only ``system/*`` read allows.
    """
    if call.level not in levels:
        offered = " or ".join(
            {"group": "Group/[id]/$export", "patient": "Patient/$export", "system": "$export"}[lv]
            for lv in ("group", "patient", "system")
            if lv in levels
        )
        raise Denied(f"this EHR exports at {offered} only", 400)
    system = [s for s in scopes if s.context == "system"]
    if not system:
        raise Denied("a Bulk Data export needs system/ scopes (SMART Backend Services)", 403)
    wanted = _types(params) or ["*"]
    for rtype in wanted:
        if not any("r" in s.permissions and s.resource_type in ("*", rtype) for s in system):
            raise Denied(f"the granted scopes do not allow exporting {rtype}", 403)


def job_id(url_or_query: str) -> str | None:
    """The ``_jobId`` of a status URL or query string."""
    query = urlsplit(url_or_query).query if "?" in url_or_query else url_or_query
    values = parse_qs(query).get("_jobId") or []
    return values[0] if len(values) == 1 and values[0] else None


def _binary_id(url: str, upstream: str) -> str | None:
    """The id of an upstream ``Binary/[id]`` URL (where HAPI keeps an export's files)."""
    prefix = upstream.rstrip("/") + "/Binary/"
    if not url.startswith(prefix):
        return None
    rid = url[len(prefix) :]
    return rid if rid and "/" not in rid and "?" not in rid else None


def rewrite_manifest(
    manifest: Mapping[str, Any], move: Callable[[str], str], upstream: str
) -> tuple[dict[str, Any], list[str]]:
    """The manifest with every URL on the proxy and ``requiresAccessToken`` true; the Binary ids it lists."""
    out = dict(manifest)
    files: list[str] = []
    for key in ("output", "error", "deleted"):
        items = []
        for item in manifest.get(key) or []:
            if not isinstance(item, Mapping):
                continue
            item = dict(item)
            url = item.get("url")
            if isinstance(url, str):
                rid = _binary_id(url, upstream)
                if rid is not None:
                    files.append(rid)
                item["url"] = move(url)
            items.append(item)
        if key in manifest:
            out[key] = items
    if isinstance(manifest.get("request"), str):
        out["request"] = move(manifest["request"])
    out["requiresAccessToken"] = True  # the proxy serves the files to the exporting client's token only
    return out, files


class Exports:
    """Which client started which export, and which files each may fetch (in memory, like the EHR's tokens).

    Bounded, so a sandbox left running does not grow with every export: past ``max_jobs``
    exports or ``max_files`` files the oldest are forgotten, and their status URL and files
    then answer 404 to every app, as an expired export's do (closed, never open to another app).
    """

    def __init__(self, max_jobs: int = 1_000, max_files: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, str] = {}
        self._files: dict[str, str] = {}
        self._max_jobs = max_jobs
        self._max_files = max_files

    @staticmethod
    def _bound(owners: dict[str, str], most: int) -> None:
        while len(owners) > most:
            del owners[next(iter(owners))]  # dicts keep insertion order: the oldest first

    def started(self, job: str, client_id: str) -> None:
        with self._lock:
            self._jobs[job] = client_id
            self._bound(self._jobs, self._max_jobs)

    def owner(self, job: str) -> str | None:
        with self._lock:
            return self._jobs.get(job)

    def listed(self, files: Iterable[str], client_id: str) -> None:
        with self._lock:
            for rid in files:
                self._files[rid] = client_id
            self._bound(self._files, self._max_files)

    def file_owner(self, binary_id: str) -> str | None:
        """The client whose export produced this Binary; None when it is no export's file."""
        with self._lock:
            return self._files.get(binary_id)
