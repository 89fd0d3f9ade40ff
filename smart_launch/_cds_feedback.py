"""Where the CDS service keeps what it must remember: cards issued, feedback received, JWT ids seen.

SQLite (a file by default, ``:memory:`` for tests), safe across threads and
across uvicorn workers sharing the file.  It holds card uuids, service ids,
outcomes and override reasons — never a token, a name or any clinical text.
CDS Hooks 2.0 "Feedback": each entry names a card ``uuid``, an ``outcome``
(accepted / overridden), the accepted suggestions and an ``overrideReason``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fhir_plugin import UsageError

__all__ = ["FeedbackStore", "feedback_report", "OUTCOMES"]

OUTCOMES = ("accepted", "overridden")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS card (uuid TEXT PRIMARY KEY, service TEXT NOT NULL, kind TEXT NOT NULL,
                                 indicator TEXT NOT NULL, issued REAL NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,
                                     card TEXT NOT NULL, outcome TEXT NOT NULL, suggestions INTEGER NOT NULL,
                                     reason_system TEXT, reason_code TEXT, has_comment INTEGER NOT NULL,
                                     outcome_time TEXT, received REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jti (iss TEXT NOT NULL, jti TEXT NOT NULL, until REAL NOT NULL,
                                PRIMARY KEY (iss, jti));
"""


class FeedbackStore:
    """The service's SQLite file: cards issued, feedback, and JWT ids (for ``jti`` replay refusal)."""

    def __init__(self, path: str | Path = ":memory:", *, clock: Callable[[], float] = time.time) -> None:
        self.path = ":memory:" if str(path) in (":memory:", "memory") else str(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        """Opened on first use, so an app that never answers a hook makes no file."""
        with self._lock:
            if self._conn is None:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
                self._conn.executescript(_SCHEMA)
            return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---------------------------------------------------------------- JWT ids
    def remember(self, iss: str, jti: str, until: float) -> bool:
        """False when ``jti`` was seen before for ``iss`` (a replay); expired ids are swept."""
        with self._lock:
            self._db.execute("DELETE FROM jti WHERE until < ?", (self._clock(),))
            try:
                self._db.execute("INSERT INTO jti (iss, jti, until) VALUES (?, ?, ?)", (iss, jti, until))
            except sqlite3.IntegrityError:
                return False
            return True

    # ---------------------------------------------------------------- cards and feedback
    def issued(self, service: str, cards: Iterable[Mapping[str, Any]]) -> None:
        rows = [
            (
                c["uuid"],
                service,
                str((c.get("source") or {}).get("topic", {}).get("code", "")),
                c["indicator"],
                self._clock(),
            )
            for c in cards
            if c.get("uuid")
        ]
        if rows:
            with self._lock:
                self._db.executemany("INSERT OR IGNORE INTO card VALUES (?, ?, ?, ?, ?)", rows)

    def add_feedback(self, service: str, body: Any) -> int:
        """Store a feedback body (``{"feedback": [...]}``); UsageError when it is not one. Returns entries stored."""
        entries = body.get("feedback") if isinstance(body, dict) else None
        if not isinstance(entries, list) or not entries:
            raise UsageError("the feedback body must be an object with a non-empty 'feedback' array")
        rows = []
        for entry in entries:
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("card"), str)
                or entry.get("outcome") not in OUTCOMES
            ):
                raise UsageError("each feedback entry needs a card uuid and an outcome of accepted or overridden")
            accepted = entry.get("acceptedSuggestions") or []
            reason: dict[str, Any] = entry["overrideReason"] if isinstance(entry.get("overrideReason"), dict) else {}
            coding: dict[str, Any] = reason["reason"] if isinstance(reason.get("reason"), dict) else {}
            rows.append(
                (
                    service,
                    entry["card"],
                    entry["outcome"],
                    len(accepted) if isinstance(accepted, list) else 0,
                    coding.get("system"),
                    coding.get("code"),
                    int(bool(reason.get("userComment"))),
                    str(entry.get("outcomeTimestamp") or "") or None,
                    self._clock(),
                )
            )
        with self._lock:
            self._db.executemany(
                "INSERT INTO feedback (service, card, outcome, suggestions, reason_system, "
                "reason_code, has_comment, outcome_time, received) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return len(rows)

    def counts(self) -> dict[str, Any]:
        """The small report: cards issued and outcomes per service and card kind, override reasons counted."""
        with self._lock:
            issued = self._db.execute("SELECT service, kind, COUNT(*) FROM card GROUP BY service, kind").fetchall()
            outcomes = self._db.execute(
                "SELECT f.service, COALESCE(c.kind, '?'), f.outcome, COUNT(*) FROM feedback f "
                "LEFT JOIN card c ON c.uuid = f.card GROUP BY 1, 2, 3"
            ).fetchall()
            reasons = self._db.execute(
                "SELECT COALESCE(reason_code, '(none given)'), COUNT(*) FROM feedback WHERE outcome = 'overridden' "
                "GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
        services: dict[str, dict[str, dict[str, int]]] = {}

        def row(service: str, kind: str) -> dict[str, int]:
            return services.setdefault(service, {}).setdefault(kind, {"issued": 0, "accepted": 0, "overridden": 0})

        for service, kind, n in issued:
            row(service, kind)["issued"] = n
        for service, kind, outcome, n in outcomes:
            row(service, kind)[outcome] = n
        return {"services": services, "override_reasons": dict(reasons)}


def feedback_report(counts: Mapping[str, Any]) -> str:
    """``counts()`` as a short text table for ``fhir-plugin cds-feedback``."""
    lines = [f"{'service':<28} {'card':<22} {'issued':>6} {'accepted':>8} {'overridden':>10}"]
    for service, kinds in sorted(counts["services"].items()):
        for kind, n in sorted(kinds.items()):
            lines.append(f"{service:<28} {kind:<22} {n['issued']:>6} {n['accepted']:>8} {n['overridden']:>10}")
    if len(lines) == 1:
        lines.append("(no cards or feedback recorded yet)")
    if counts["override_reasons"]:
        lines.append("")
        lines.append("override reasons")
        lines += [f"  {code:<30} {n:>5}" for code, n in counts["override_reasons"].items()]
    return "\n".join(lines)
