"""The sync job's memory: a SQLite file holding runs, their patients, and the high-water marks.

What it must guarantee, and how:

- **Resumable.**  A run's patient list is stored when the run starts; each
  patient's outcome (done or failed, with its report line) is committed the
  moment the patient is finished.  A job killed at any point finds the
  unfinished run on restart and carries on with the patients not yet done.
  A patient whose transaction reached the server but whose outcome was not
  committed is sent again; its conditional creates make that a no-op.
- **Incremental.**  Per scope (FHIR base + profile + write or dry run) the
  file keeps the high-water mark: the server time as of which every change
  was seen.  It moves only when a run finishes.
- **One job at a time.**  ``fcntl.flock`` on ``<state>.lock``, taken without
  waiting: a second job on the same file is refused at once.  The kernel
  drops the lock when the holder dies, even by SIGKILL, so no stale lock is
  ever left behind to clear by hand.

The report lines stored here carry ids and statuses only (the same lines as
the JSON-lines report), never names, dates of birth or free text.

Tables::

    marks(scope PK, mark, updated)
    runs(id PK, scope, signature, started, finished, abandoned, since, mark)
    patients(run, position, patient, status pending|done|failed, line, updated; PK run+patient)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._errors import StateLocked, UsageError

__all__ = ["Checkpoint", "Run", "StateLocked", "DEFAULT_STATE"]

DEFAULT_STATE = "fhir-plugin-sync.sqlite"
_KEEP_RUNS = 10
_SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS marks (scope TEXT PRIMARY KEY, mark TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL,
    signature TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    abandoned INTEGER NOT NULL DEFAULT 0,
    since TEXT,
    mark TEXT
);
CREATE TABLE IF NOT EXISTS patients (
    run INTEGER NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    patient TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    line TEXT,
    updated TEXT,
    PRIMARY KEY (run, patient)
);
CREATE INDEX IF NOT EXISTS patients_by_status ON patients (run, status, position);
"""


@dataclass(frozen=True)
class Run:
    """One sync run as stored: what it was asked to do and the mark it will set when it finishes."""

    id: int
    scope: str
    signature: str
    started: str
    since: str | None
    mark: str | None
    finished: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Checkpoint:
    """An open state file, locked for this process until ``close()``.  Use it from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_file = self._take_lock(self.path)
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif version[0] != _SCHEMA_VERSION:
                raise UsageError(f"{self.path} was written by another version of fhir-plugin (schema {version[0]})")
        except sqlite3.DatabaseError as exc:
            self._release()
            raise UsageError(f"{self.path} is not a fhir-plugin sync state file ({exc})") from exc
        except BaseException:
            self._release()
            raise

    # -- the lock

    @staticmethod
    def _take_lock(path: Path) -> Any:
        lock_path = path.with_name(path.name + ".lock")
        try:
            handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held open: the lock lives with it
        except OSError as exc:
            raise UsageError(f"cannot open the lock file {lock_path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                handle.close()
                raise UsageError(f"cannot lock {lock_path}: {exc.strerror or exc}") from exc
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StateLocked(
                f"another sync job ({holder}) is using {path}; wait for it to finish, "
                "or give this one its own --state file"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    def _release(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None  # type: ignore[assignment]
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        """Close the database and let another job take the file."""
        self._release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transactions

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: Any, *rest: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self) -> Checkpoint._Tx:
        return Checkpoint._Tx(self._db)

    # -- runs

    def unfinished_run(self, scope: str) -> Run | None:
        """The run of this scope that was started and not finished (there is at most one), or None."""
        row = self._db.execute(
            "SELECT id, scope, signature, started, since, mark, finished FROM runs "
            "WHERE scope = ? AND finished IS NULL ORDER BY id DESC LIMIT 1",
            (scope,),
        ).fetchone()
        return Run(*row) if row else None

    def last_finished_run(self, scope: str) -> Run | None:
        row = self._db.execute(
            "SELECT id, scope, signature, started, since, mark, finished FROM runs "
            "WHERE scope = ? AND finished IS NOT NULL AND abandoned = 0 ORDER BY id DESC LIMIT 1",
            (scope,),
        ).fetchone()
        return Run(*row) if row else None

    def start_run(
        self, scope: str, signature: str, patients: Iterable[str], *, since: str | None, mark: str | None
    ) -> Run:
        """Store a new run and its patient list (in the given order, each once) in one transaction."""
        started = _now()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE scope = ? AND finished IS NULL", (scope,)).fetchone():
                raise UsageError(f"{self.path} already holds an unfinished run for this server and profile")
            cur = db.execute(
                "INSERT INTO runs (scope, signature, started, since, mark) VALUES (?, ?, ?, ?, ?)",
                (scope, signature, started, since, mark),
            )
            run_id = int(cur.lastrowid or 0)
            seen: set[str] = set()
            rows: list[tuple[int, int, str]] = []
            for pid in patients:
                if pid not in seen:
                    seen.add(pid)
                    rows.append((run_id, len(rows), pid))
            db.executemany("INSERT INTO patients (run, position, patient, status) VALUES (?, ?, ?, 'pending')", rows)
        return Run(run_id, scope, signature, started, since, mark)

    def abandon(self, run: Run) -> None:
        """Close an unfinished run without moving the mark (``--fresh``)."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET finished = ?, abandoned = 1 WHERE id = ?", (_now(), run.id))

    def finish_run(self, run: Run, *, set_mark: bool) -> None:
        """Close the run; with ``set_mark``, its mark becomes the scope's high-water mark (never moving back),
        in the same commit."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET finished = ? WHERE id = ?", (_now(), run.id))
            # keep the report lines of the last few runs; older runs keep only their failures
            db.execute(
                "DELETE FROM patients WHERE status = 'done' AND run IN (SELECT id FROM runs WHERE scope = ? "
                "AND finished IS NOT NULL AND id NOT IN (SELECT id FROM runs WHERE scope = ? "
                "ORDER BY id DESC LIMIT ?))",
                (run.scope, run.scope, _KEEP_RUNS),
            )
            if set_mark and run.mark:
                db.execute(
                    "INSERT INTO marks (scope, mark, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope) DO UPDATE SET mark = max(mark, excluded.mark), updated = excluded.updated",
                    (run.scope, run.mark, _now()),
                )

    def mark(self, scope: str) -> str | None:
        """The scope's high-water mark: every change up to it has been checked (None before the first run)."""
        row = self._db.execute("SELECT mark FROM marks WHERE scope = ?", (scope,)).fetchone()
        return row[0] if row else None

    # -- patients

    def counts(self, run: Run) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) FROM patients WHERE run = ? GROUP BY status", (run.id,))
        out = {"pending": 0, "done": 0, "failed": 0}
        out.update({status: n for status, n in rows})
        return out

    def todo(self, run: Run) -> list[str]:
        """The patients still to do, in run order: pending ones, and failed ones (they get another try)."""
        rows = self._db.execute(
            "SELECT patient FROM patients WHERE run = ? AND status != 'done' ORDER BY position", (run.id,)
        )
        return [pid for (pid,) in rows]

    def done_lines(self, run: Run) -> Iterator[dict[str, Any]]:
        """The stored report lines of the patients already done, in run order."""
        rows = self._db.execute(
            "SELECT line FROM patients WHERE run = ? AND status = 'done' ORDER BY position", (run.id,)
        )
        for (line,) in rows:
            yield json.loads(line)

    def failed(self, run: Run) -> list[str]:
        rows = self._db.execute(
            "SELECT patient FROM patients WHERE run = ? AND status = 'failed' ORDER BY position", (run.id,)
        )
        return [pid for (pid,) in rows]

    def outstanding_failures(self, scope: str) -> list[str]:
        """Patients whose latest outcome in a finished run of this scope is a failure (to try again)."""
        rows = self._db.execute(
            "SELECT patient FROM (SELECT p.patient, p.status, ROW_NUMBER() OVER "
            "(PARTITION BY p.patient ORDER BY p.run DESC) AS latest FROM patients p JOIN runs r ON r.id = p.run "
            "WHERE r.scope = ? AND r.finished IS NOT NULL AND r.abandoned = 0 AND p.status != 'pending') "
            "WHERE latest = 1 AND status = 'failed' ORDER BY patient",
            (scope,),
        )
        return [pid for (pid,) in rows]

    def record(self, run: Run, patient: str, *, failed: bool, line: dict[str, Any]) -> None:
        """Commit one patient's outcome now (called as each patient finishes)."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE patients SET status = ?, line = ?, updated = ? WHERE run = ? AND patient = ?",
                ("failed" if failed else "done", json.dumps(line, separators=(",", ":")), _now(), run.id, patient),
            )
            if cur.rowcount != 1:
                raise UsageError(f"patient {patient} is not part of sync run {run.id}")
