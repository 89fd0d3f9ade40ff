"""Write-back for a population: each allowed patient's drafts through the writer strategy, resumable, rate-limited.

Idempotent twice over: the writer's conditional creates (``ifNoneExist`` on identifiers
derived from patient + encounter + code, SPEC §7) never make a second copy, and a SQLite
log in the output folder records every patient written, so a job killed half-way and
started again skips those and sends only the rest.  A patient whose write failed is
not logged, and is tried again next time.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .._errors import PluginError
from .._pace import RateLimiter
from .._write import DraftWriter

__all__ = ["RateLimiter", "WriteLog", "WriteSummary", "write_back", "WRITE_LOG"]

WRITE_LOG = "writeback.sqlite"


class WriteLog:
    """The patients already written (SQLite, committed after every patient)."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path))
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS written (patient TEXT PRIMARY KEY, created INTEGER, existing INTEGER, at REAL)"
        )
        self._db.commit()

    def done(self, patient: str) -> bool:
        return self._db.execute("SELECT 1 FROM written WHERE patient = ?", (patient,)).fetchone() is not None

    def record(self, patient: str, created: int, existing: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO written VALUES (?, ?, ?, ?)", (patient, created, existing, time.time())
        )
        self._db.commit()

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM written").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> WriteLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class WriteSummary:
    written: int = 0
    skipped: int = 0
    created: int = 0
    existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: each draft written in another form than drafted ("CarePlan as DocumentReference ..."), once
    forms: list[str] = field(default_factory=list)
    #: each draft no form could carry, with why (issue 12, writer d: nothing dropped silently), once
    not_written: list[str] = field(default_factory=list)


def write_back(
    rows: Iterable[Mapping[str, Any]],
    writer: DraftWriter,
    log: WriteLog,
    limiter: RateLimiter,
    *,
    progress: TextIO | None = None,
) -> WriteSummary:
    """Write the drafts of every row whose drafts are allowed and not yet logged; a failure skips that patient."""
    summary = WriteSummary()
    for row in rows:
        if not row.get("drafts_allowed") or not row.get("drafts"):
            continue
        patient = str(row["patient"])
        if log.done(patient):
            summary.skipped += 1
            continue
        limiter.wait()
        try:
            result = writer.write(json.loads(row["drafts"]))
        except PluginError as exc:
            summary.failed.append((patient, str(exc)))
            continue
        log.record(patient, len(result.created), len(result.existing))
        summary.written += 1
        summary.created += len(result.created)
        summary.existing += len(result.existing)
        for draft, form in result.folded:
            if f"{draft} as {form}" not in summary.forms:
                summary.forms.append(f"{draft} as {form}")
        for draft, why in result.not_written:
            if f"{draft} ({why})" not in summary.not_written:
                summary.not_written.append(f"{draft} ({why})")
        if progress is not None:
            print(
                f"write-back: {patient} ({len(result.created)} created, {len(result.existing)} already there)",
                file=progress,
                flush=True,
            )
    return summary
