"""The pacer shared by a client's threads: even spacing at the rate, and a 429's hold on every caller.

Time is a list the fake sleep appends to; no test sleeps.
"""

from __future__ import annotations

import math
import threading

import pytest

from fhir_plugin._errors import UsageError
from fhir_plugin._pace import RateLimiter


def test_threads_share_one_rate_their_slots_one_interval_apart():
    slept: list[float] = []  # the clock stays at 0, so each sleep is the slot its caller reserved
    pacer = RateLimiter(12, clock=lambda: 0.0, sleep=slept.append)  # 12 a minute: one every 5 s
    start = threading.Barrier(2)

    def five_calls() -> None:
        start.wait(timeout=5)
        for _ in range(5):
            pacer.wait()

    threads = [threading.Thread(target=five_calls) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)

    slots = sorted([0.0, *slept])  # the first caller's slot is now: it does not sleep
    assert slots == [5.0 * n for n in range(10)]  # ten calls, 60/12 s apart, no two in the same slot


def test_a_hold_stops_every_caller_until_it_has_passed_the_later_hold_winning():
    now = [0.0]
    slept: list[float] = []
    pacer = RateLimiter(None, clock=lambda: now[0], sleep=slept.append)
    pacer.hold_for(3)
    pacer.hold_for(1)  # a shorter hold does not cut the longer one short
    now[0] = 1.0
    pacer.wait()
    assert slept == [2.0]  # until 3 s, from 1 s
    now[0] = 3.5
    pacer.wait()
    assert slept == [2.0]  # passed: no more waiting


def test_a_hold_pushes_the_rates_schedule_back():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = RateLimiter(30, clock=lambda: now[0], sleep=sleep)  # one every 2 s
    pacer.wait()  # at 0; the next slot is 2
    pacer.hold_for(5)
    pacer.wait()  # held to 5, not 2
    pacer.wait()  # then 2 s after that
    assert slept == [5.0, 2.0]


def test_an_unused_pacer_costs_nothing():
    def boom(*_: object) -> float:
        raise AssertionError("an unused pacer read the clock or slept")

    pacer = RateLimiter(None, clock=boom, sleep=boom)
    for _ in range(1000):
        pacer.wait()


@pytest.mark.parametrize("rate", [0, -5, math.nan])
def test_a_rate_must_be_a_positive_number_named_as_the_caller_calls_it(rate):
    with pytest.raises(UsageError, match=r"^--max-requests-per-minute must be a positive number"):
        RateLimiter(rate, what="--max-requests-per-minute")


def test_the_write_back_still_takes_the_pacer_from_where_it_was():
    from fhir_plugin._population import _writeback

    assert _writeback.RateLimiter is RateLimiter
