"""A per-client rate limit on the FHIR proxy: at most N calls in any window of S seconds.

EHRs meter apps: eClinicalWorks publishes 250 calls a minute; past the limit a
call is answered 429 with ``Retry-After``.  The sandbox does the same so a
client's pacing and its handling of 429 are tested against a real refusal.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["Throttle", "parse_rate_limit"]


def parse_rate_limit(text: str) -> tuple[int, float]:
    """``CALLS`` or ``CALLS/SECONDS`` (``250`` = 250 a minute, ``5/1`` = 5 a second); ValueError otherwise."""
    calls, _, seconds = text.partition("/")
    try:
        n, s = int(calls), float(seconds or 60)
    except ValueError:
        raise ValueError(f"a rate limit is CALLS or CALLS/SECONDS, not {text!r}") from None
    if n < 1 or not s > 0:
        raise ValueError("a rate limit needs at least one call in a positive number of seconds")
    return n, s


class Throttle:
    """Sliding window per client: each client keeps the times of its last ``calls`` admitted calls."""

    def __init__(self, calls: int, seconds: float, clock: Callable[[], float]) -> None:
        self.calls = calls
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._admitted: dict[str, deque[float]] = {}

    def admit(self, client_id: str) -> int:
        """0 when the call may go ahead (it is counted); else the whole seconds to wait (Retry-After)."""
        now = self._clock()
        with self._lock:
            times = self._admitted.setdefault(client_id, deque(maxlen=self.calls))
            if len(times) == self.calls and now - times[0] < self.seconds:
                return max(1, math.ceil(times[0] + self.seconds - now))
            times.append(now)
            return 0
