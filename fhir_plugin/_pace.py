"""The pacer: a request rate that several threads share, and a hold that stops them all.

EHRs throttle per client, not per request or per thread (eClinicalWorks publishes 250
calls a minute; others answer 429 with ``Retry-After``, RFC 6585 §4).  Threads that each
keep to a rate, or each wait out their own 429, still overrun the server together; one
``RateLimiter`` shared by them spaces every call evenly and, once the server says "later",
holds every caller until then.  No I/O here: the clock and the sleep are passed in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ._errors import UsageError

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``per_minute`` calls a minute, evenly spaced across threads (None: no rate), and a shared hold.

    ``wait()`` reserves the caller's slot under a lock and sleeps outside it, so threads
    queue one interval apart instead of waking together.  ``what`` names the setting in
    the error a bad rate raises (a command-line flag, a parameter).
    """

    def __init__(
        self,
        per_minute: float | None,
        *,
        what: str = "the rate limit",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_minute is not None and not per_minute > 0:  # ``not >`` refuses NaN too
            raise UsageError(f"{what} must be a positive number, not {per_minute:g}")
        self.per_minute = per_minute
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next: float | None = None  # the earliest free slot after the last one reserved
        self._held_until: float | None = None  # a server's Retry-After, for every caller

    def wait(self) -> None:
        """Return when the caller's turn has come: its slot at the rate, and after any hold."""
        if not self._interval and self._held_until is None:
            return  # unused: no lock, no clock (the attribute read is atomic; a hold set meanwhile is next time's)
        with self._lock:
            now = self._clock()
            slot = now
            if self._held_until is not None:
                if now < self._held_until:
                    slot = self._held_until
                else:
                    self._held_until = None  # passed: back to the lock-free path
            if self._interval:
                if self._next is not None:
                    slot = max(slot, self._next)
                self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)

    def hold_for(self, seconds: float) -> None:
        """Make every caller of ``wait()`` wait until ``seconds`` from now (the later of any holds)."""
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            if self._held_until is None or until > self._held_until:
                self._held_until = until
