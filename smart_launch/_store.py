"""Server-side state behind three methods: ``get``, ``set``, ``unset`` (client-js's storage shape).

The browser holds only an opaque random session id; everything else (the
pending ``state`` and PKCE verifier, the token, the launch context) lives
here, as JSON values with an expiry.

- ``SqliteStore`` (the default) is one file, so several uvicorn workers share
  it; every call opens its own short connection (WAL, busy timeout), which
  keeps it safe across threads and processes.
- ``MemoryStore`` is for tests and single-process demos.

``unset`` reports whether it removed a live value.  That is what makes a
``state`` single-use across workers: of two callbacks racing with one
``state``, only the one whose ``unset`` returns True goes on.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["SessionStore", "MemoryStore", "SqliteStore", "open_store"]


@runtime_checkable
class SessionStore(Protocol):
    """Where the app keeps launch state and tokens, keyed by strings it mints."""

    def get(self, key: str) -> dict[str, Any] | None:
        """The value stored under ``key``, or None when absent or expired."""

    def set(self, key: str, value: dict[str, Any], *, ttl: float) -> None:
        """Store ``value`` (JSON-serialisable) under ``key`` for ``ttl`` seconds, replacing any old value."""

    def unset(self, key: str) -> bool:
        """Remove ``key``; True when a live value was removed (atomic: one caller wins)."""


class MemoryStore:
    """A dict behind a lock; values are copied in and out through JSON like the SQLite store's."""

    def __init__(self, clock: Any = time.time) -> None:
        self._data: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[1] <= self._clock():
                del self._data[key]
                return None
            return json.loads(item[0])

    def set(self, key: str, value: dict[str, Any], *, ttl: float) -> None:
        text = json.dumps(value)
        with self._lock:
            self._data[key] = (text, self._clock() + ttl)

    def unset(self, key: str) -> bool:
        with self._lock:
            item = self._data.pop(key, None)
            return item is not None and item[1] > self._clock()

    def keys(self) -> list[str]:
        """Live keys (tests use this to look inside; the app never lists)."""
        with self._lock:
            now = self._clock()
            return [k for k, (_, exp) in self._data.items() if exp > now]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS smart_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS smart_state_expires ON smart_state (expires);
"""


class SqliteStore:
    """One SQLite file shared by every worker; expired rows are swept as new ones are written."""

    def __init__(self, path: str | Path, *, clock: Any = time.time, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._timeout = busy_timeout
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        try:  # the file holds tokens: owner-only
            self.path.chmod(0o600)
        except OSError:
            pass

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        return conn

    def get(self, key: str) -> dict[str, Any] | None:
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT value FROM smart_state WHERE key = ? AND expires > ?", (key, self._clock())
            ).fetchone()
        finally:
            conn.close()
        return json.loads(row[0]) if row else None

    def set(self, key: str, value: dict[str, Any], *, ttl: float) -> None:
        text = json.dumps(value)
        now = self._clock()
        conn = self._connect()
        try:
            conn.execute("DELETE FROM smart_state WHERE expires <= ?", (now,))
            conn.execute(
                "INSERT OR REPLACE INTO smart_state (key, value, expires) VALUES (?, ?, ?)", (key, text, now + ttl)
            )
        finally:
            conn.close()

    def unset(self, key: str) -> bool:
        conn = self._connect()
        try:
            cur = conn.execute("DELETE FROM smart_state WHERE key = ? AND expires > ?", (key, self._clock()))
            removed = cur.rowcount > 0
            conn.execute("DELETE FROM smart_state WHERE key = ?", (key,))  # an expired leftover, if any
        finally:
            conn.close()
        return removed


def open_store(where: str | Path) -> SessionStore:
    """``"memory"`` (or ``":memory:"``) for a MemoryStore; anything else is the SQLite file's path."""
    if str(where) in ("memory", ":memory:"):
        return MemoryStore()
    return SqliteStore(where)
