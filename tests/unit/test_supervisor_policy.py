"""The supervisor's pure policies (supervisor/policy.py) on a fake clock: OTP restart intensity with
exponential back-off and recycling limits with jitter."""

from __future__ import annotations

import random
from collections import deque

import pytest

from mcpherd.supervisor.policy import (
    Intensity,
    recycle_limit,
    record_restart,
    restart_decision,
)

OTP = Intensity(max_restarts=5, window_s=30.0, backoff_initial_s=1.0, backoff_max_s=60.0)


def restarts_at(*times: float, window_s: float = 30.0) -> deque[float]:
    history: deque[float] = deque()
    for now in times:
        record_restart(history, now, window_s)
    return history


def test_record_restart_keeps_only_the_window_and_appends_in_order() -> None:
    history = restarts_at(0.0, 10.0, 29.0)
    assert list(history) == [0.0, 10.0, 29.0]
    record_restart(history, 30.0, 30.0)  # exactly window_s old: still inside
    assert list(history) == [0.0, 10.0, 29.0, 30.0]
    record_restart(history, 40.5, 30.0)  # 0.0 and 10.0 are now older than 30 s
    assert list(history) == [29.0, 30.0, 40.5]


def test_record_restart_memory_is_bounded_by_the_window_not_by_the_number_of_restarts() -> None:
    history = restarts_at(*(i * 0.5 for i in range(10_000)), window_s=2.0)
    assert list(history) == [4997.5, 4998.0, 4998.5, 4999.0, 4999.5]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_up_to_max_restarts_within_the_window_restart_at_once(count: int) -> None:
    history = restarts_at(*range(count))
    decision = restart_decision(history, float(count - 1), OTP, strikes=0)
    assert (decision.delay_s, decision.tripped) == (0.0, False)
    assert decision.reason == f"{count} restarts in 30s"


def test_the_restart_after_max_restarts_trips_the_intensity() -> None:
    history = restarts_at(0, 1, 2, 3, 4, 5)
    decision = restart_decision(history, 5.0, OTP, strikes=0)
    assert (decision.delay_s, decision.tripped) == (1.0, True)
    assert decision.reason == "6 restarts in 30s exceeds 5: backing off 1s"


def test_restarts_spread_wider_than_the_window_never_trip() -> None:
    now = 0.0
    history: deque[float] = deque()
    for _ in range(100):  # one restart every 6.1 s: at most 5 inside any 30 s window
        now += 6.1
        record_restart(history, now, OTP.window_s)
        assert not restart_decision(history, now, OTP, strikes=0).tripped


def test_old_entries_still_in_the_history_are_not_counted() -> None:
    history = deque([0.0, 1.0, 2.0, 3.0, 4.0, 40.0])  # not pruned: the decision must not count them
    decision = restart_decision(history, 40.0, OTP, strikes=0)
    assert not decision.tripped and decision.reason == "1 restarts in 30s"


@pytest.mark.parametrize(("strikes", "delay"), [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0),
                                                (30, 60.0)])
def test_back_off_doubles_with_each_consecutive_trip_up_to_the_maximum(strikes: int, delay: float) -> None:
    history = restarts_at(0, 1, 2, 3, 4, 5)
    decision = restart_decision(history, 5.0, OTP, strikes)
    assert decision.tripped and decision.delay_s == delay
    assert decision.reason.endswith(f"backing off {delay:g}s")


def test_max_restarts_zero_trips_on_the_first_restart() -> None:
    strict = Intensity(max_restarts=0, window_s=10.0)
    decision = restart_decision(restarts_at(3.0), 3.0, strict, strikes=0)
    assert decision.tripped and decision.reason == "1 restarts in 10s exceeds 0: backing off 1s"


def test_a_fork_storm_is_bounded_by_the_back_off() -> None:
    """Replay the master's use (master._record_death): a worker that dies 10 ms after every fork,
    restarted when the policy allows; strikes count consecutive trips and reset otherwise."""
    now, history, strikes, delays = 0.0, deque[float](), 0, []
    while now < 120.0:
        now += 0.01
        record_restart(history, now, OTP.window_s)
        decision = restart_decision(history, now, OTP, strikes)
        strikes = strikes + 1 if decision.tripped else 0
        delays.append(decision.delay_s)
        now += decision.delay_s
    assert delays[:10] == [0, 0, 0, 0, 0, 1, 2, 4, 8, 16]  # 6 forks at once, then doubling back-off
    assert len(delays) <= 31  # two minutes of a crashing app: about 15 forks a minute, not thousands


def test_recycle_limit_is_zero_when_recycling_is_off() -> None:
    rng = random.Random(1)
    assert recycle_limit(0, 0, rng) == 0
    assert recycle_limit(0, 50, rng) == 0
    assert recycle_limit(-5, 50, rng) == 0


def test_recycle_limit_without_jitter_is_exact() -> None:
    rng = random.Random(1)
    assert {recycle_limit(1000, 0, rng) for _ in range(100)} == {1000}


def test_recycle_limit_jitter_spreads_over_the_whole_inclusive_range() -> None:
    rng = random.Random(7)
    limits = [recycle_limit(1000, 10, rng) for _ in range(2000)]
    assert set(limits) == set(range(1000, 1011))


def test_recycle_limit_is_deterministic_for_a_seeded_rng() -> None:
    first = recycle_limit(100, 50, random.Random(3))
    assert [recycle_limit(100, 50, random.Random(3)) for _ in range(5)] == [first] * 5
