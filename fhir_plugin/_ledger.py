"""The ledger writer's memory: a SQLite file mapping each draft identifier to the id the server gave it.

Why it exists (issue 12, writer c): a server without conditional create cannot
de-duplicate a rerun for us, and its search index may not show a resource just
created.  So the writer records its *intent* before every create and the
created id after it:

- ``intent`` row, no id: a create may or may not have reached the server (the
  process died between the create and the ledger update).  The writer then
  searches the patient's resources before creating again, so nothing is doubled.
- ``created`` row with an id: the resource is known; a rerun reads it back
  instead of creating it.

Rows are keyed on the FHIR base URL and the draft identifier (which already
names patient, encounter and code, ``_drafts.draft_identifiers``); they hold
ids only, never patient data.  Each change is committed at once, so a
SIGKILL loses at most the row being written.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ._errors import UsageError

__all__ = ["Ledger", "LedgerEntry", "DEFAULT_LEDGER"]

#: beside the sync job's state file (``_checkpoint.DEFAULT_STATE``) by default
DEFAULT_LEDGER = "fhir-plugin-ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS drafts (
    base TEXT NOT NULL,
    draft TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('intent', 'created')),
    ref TEXT,
    updated TEXT NOT NULL,
    PRIMARY KEY (base, draft)
);
"""


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows of one draft: only intended, or created as ``ref`` (``Type/id``)."""

    state: str
    ref: str | None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Ledger:
    """Draft identifier → created id, per FHIR server; safe to share between the sync job's threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise UsageError(f"the draft ledger {self.path} cannot be opened ({exc})") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get(self, base: str, draft: str) -> LedgerEntry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state, ref FROM drafts WHERE base = ? AND draft = ?", (base, draft)
            ).fetchone()
        return LedgerEntry(row[0], row[1]) if row else None

    def intend(self, base: str, draft: str) -> None:
        """Record that a create of ``draft`` is about to be sent (committed before the request)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO drafts (base, draft, state, ref, updated) VALUES (?, ?, 'intent', NULL, ?) "
                "ON CONFLICT (base, draft) DO UPDATE SET state = 'intent', ref = NULL, "
                "updated = excluded.updated",
                (base, draft, _now()),
            )

    def record(self, base: str, draft: str, ref: str) -> None:
        """Record that ``draft`` exists on the server as ``ref`` (created now, or found by a search)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO drafts (base, draft, state, ref, updated) VALUES (?, ?, 'created', ?, ?) "
                "ON CONFLICT (base, draft) DO UPDATE SET state = 'created', ref = excluded.ref, "
                "updated = excluded.updated",
                (base, draft, ref, _now()),
            )

    def forget(self, base: str, draft: str) -> None:
        """Drop a row whose resource the server no longer has (deleted by someone), so it is looked for anew."""
        with self._lock:
            self._db.execute("DELETE FROM drafts WHERE base = ? AND draft = ?", (base, draft))
