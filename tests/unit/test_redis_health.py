"""The bridge's judgement of Redis (supervisor/bridge.py `Health`), fed round trips and failures by hand:
when a slow or failing Redis stops being relied on, and when it is relied on again."""

from __future__ import annotations

from mcpherd.supervisor.bridge import ON_TIME_PINGS, SLOW_PINGS, SLOW_WINDOW, Health

TIMEOUT = 0.25
FAST, SLOW = 0.001, 0.8


def test_a_few_late_pings_in_a_window_are_hiccups() -> None:
    health = Health(TIMEOUT)
    for seconds in [SLOW, FAST, FAST, FAST, SLOW] + [FAST] * (SLOW_WINDOW - 1) + [SLOW]:
        assert health.pinged(seconds) is None
    assert health.trusted  # two late ones within any ten, never three


def test_three_late_pings_within_ten_lose_trust_and_say_why() -> None:
    health = Health(TIMEOUT)
    reasons = [health.pinged(s) for s in [SLOW, FAST, FAST, SLOW, FAST, FAST, SLOW]]
    assert reasons[:-1] == [None] * 6
    assert reasons[-1] == "3 of the last 7 PINGs took longer than 250 ms (slowest 800 ms)"
    assert not health.trusted
    assert health.slowest_s == SLOW


def test_trust_returns_after_on_time_pings_in_a_row_only() -> None:
    health = Health(TIMEOUT)
    for _ in range(SLOW_PINGS):
        health.pinged(SLOW)
    assert not health.trusted
    # One late answer in between starts the count again.
    assert [health.pinged(s) for s in [FAST, FAST, SLOW, FAST, FAST]] == [None] * 5
    assert not health.trusted
    assert health.pinged(FAST) == f"{ON_TIME_PINGS} PINGs in a row answered within 250 ms"
    assert health.trusted
    assert health.slowest_s == 0.0  # a clean window: the old late ones do not count against it again


def test_a_failed_write_loses_trust_at_once_and_only_pings_restore_it() -> None:
    health = Health(TIMEOUT)
    assert health.write_failed() is True
    assert health.write_failed() is False  # already down: nothing new to report
    assert not health.trusted
    for _ in range(ON_TIME_PINGS - 1):
        assert health.pinged(FAST) is None
    assert health.pinged(FAST) is not None
    assert health.trusted
