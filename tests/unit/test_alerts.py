"""Alerts: the pure evaluation of one second's window against thresholds, the debounce over consecutive
seconds, the fired/cleared transitions the master logs (once each), and the [alerts] table of the
configuration file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mcpherd.supervisor.alerts import ALERTS, AlertThresholds, Window, debounce, evaluate, transitions
from mcpherd.supervisor.config import ConfigError, load

DEFAULTS = AlertThresholds()
QUIET = Window(cpu_percent=10.0, memory_percent=40.0, requests=100, errors=0, p99_s=0.01, cache_lookups=100,
               cache_hits=95, slots_in_backoff=0, new_listen_drops=0)


def test_a_quiet_second_raises_nothing() -> None:
    assert evaluate(QUIET, DEFAULTS) == {}


def test_the_issue_defaults() -> None:
    assert (DEFAULTS.cpu_percent, DEFAULTS.memory_percent, DEFAULTS.p99_s, DEFAULTS.error_rate,
            DEFAULTS.cache_hit_ratio) == (85.0, 90.0, 5.0, 0.05, 0.70)


@pytest.mark.parametrize(("change", "name", "reason"), [
    ({"cpu_percent": 85.5}, "cpu", "CPU 86% > 85%"),
    ({"memory_percent": 93.0}, "memory", "memory 93% > 90%"),
    ({"p99_s": 6.0}, "p99_latency", "p99 6.00s > 5s"),
    ({"errors": 6}, "error_rate", "errors 6.0% > 5%"),
    ({"cache_hits": 60}, "cache_hit_ratio", "cache hit ratio 60% < 70%"),
    ({"slots_in_backoff": 2}, "restart_intensity", "2 worker slot(s) backing off after repeated crashes"),
    ({"new_listen_drops": 3}, "listen_drops", "3 connections dropped by full accept queues"),
])
def test_each_alert_fires_past_its_threshold_with_a_reason(change: dict[str, float], name: str, reason: str) -> None:
    assert evaluate(replace(QUIET, **change), DEFAULTS) == {name: reason}


@pytest.mark.parametrize("change", [
    {"cpu_percent": 85.0}, {"memory_percent": 90.0}, {"p99_s": 5.0}, {"errors": 5}, {"cache_hits": 70},
])
def test_exactly_at_a_threshold_is_not_past_it(change: dict[str, float]) -> None:
    assert evaluate(replace(QUIET, **change), DEFAULTS) == {}


def test_rates_say_nothing_below_min_requests() -> None:
    """Three errors out of three requests is not a 100% error rate worth waking anyone for."""
    few = replace(QUIET, requests=3, errors=3, p99_s=30.0, cache_lookups=3, cache_hits=0)
    assert evaluate(few, DEFAULTS) == {}
    assert set(evaluate(few, AlertThresholds(min_requests=3))) == {"error_rate", "p99_latency", "cache_hit_ratio"}


def test_the_cache_alert_needs_the_cache_to_be_used() -> None:
    assert evaluate(replace(QUIET, cache_lookups=0, cache_hits=0), DEFAULTS) == {}


def test_no_latency_measured_is_no_latency_alert() -> None:
    assert evaluate(replace(QUIET, p99_s=None), DEFAULTS) == {}


def test_an_idle_second_has_no_error_rate() -> None:
    assert evaluate(replace(QUIET, requests=0, errors=0, cache_lookups=0, cache_hits=0, p99_s=None), DEFAULTS) == {}


def test_machine_and_supervision_alerts_do_not_depend_on_traffic() -> None:
    idle = replace(QUIET, requests=0, errors=0, cache_lookups=0, cache_hits=0, p99_s=None, cpu_percent=99.0,
                   slots_in_backoff=1, new_listen_drops=1)
    assert set(evaluate(idle, DEFAULTS)) == {"cpu", "restart_intensity", "listen_drops"}


def test_disabled_alerts_never_fire() -> None:
    everything = Window(100.0, 100.0, 100, 100, 60.0, 100, 0, 4, 9)
    assert set(evaluate(everything, DEFAULTS)) == set(ALERTS)
    assert evaluate(everything, AlertThresholds(enabled=False)) == {}


def test_transitions_are_reported_once_and_in_a_stable_order() -> None:
    history = [{}, {"error_rate": "a", "cpu": "b"}, {"error_rate": "c", "cpu": "b"}, {"cpu": "b"}, {}, {}]
    seen = []
    for previous, current in zip(history, history[1:]):
        seen.append(transitions(previous, current))
    assert seen == [(["cpu", "error_rate"], []), ([], []), ([], ["error_rate"]), ([], ["cpu"]), ([], [])]


def test_a_changed_reason_is_not_a_new_alert() -> None:
    """The reason's figures move every second; the alert fired once and stays fired."""
    assert transitions({"p99_latency": "p99 6.00s > 5s"}, {"p99_latency": "p99 7.10s > 5s"}) == ([], [])


def run_debounce(seconds: list[dict[str, str]], thresholds: AlertThresholds = DEFAULTS) -> list[dict[str, str]]:
    """The active alerts after each second, given each second's raw conditions (the master's loop)."""
    active: dict[str, str] = {}
    streaks: dict[str, int] = {}
    out = []
    for conditions in seconds:
        active = debounce(conditions, active, streaks, thresholds)
        out.append(active)
    return out


def test_a_condition_fires_after_fire_after_s_consecutive_seconds() -> None:
    hot = {"cpu": "CPU 90% > 85%"}
    assert [bool(a) for a in run_debounce([hot, hot, {}, hot, hot, hot])] == [False, False, False, False, False, True]


def test_an_alert_clears_after_clear_after_s_quiet_seconds_and_a_blip_does_not_clear_it() -> None:
    hot = {"error_rate": "errors 9.0% > 5%"}
    seconds = [hot] * 3 + [{}] * 9 + [hot] + [{}] * 10
    active = [bool(a) for a in run_debounce(seconds)]
    assert active == [False, False, True] + [True] * 9 + [True] + [True] * 9 + [False]
    fired_and_cleared = [transitions(before, after) for before, after in
                         zip([{}, *run_debounce(seconds)], run_debounce(seconds))]
    assert sum(len(f) for f, _ in fired_and_cleared) == 1 and sum(len(c) for _, c in fired_and_cleared) == 1


def test_a_flapping_condition_alerts_once() -> None:
    """On for a second, off for a second, for a minute: one alert, held, never a storm of log lines."""
    flapping = [{"p99_latency": "p99 6.00s > 5s"} if i % 2 else {} for i in range(60)]
    thresholds = AlertThresholds(fire_after_s=1, clear_after_s=3)
    states = run_debounce(flapping, thresholds)
    changes = sum(1 for before, after in zip([{}, *states], states) if before.keys() != after.keys())
    assert changes == 1 and "p99_latency" in states[-1]


def test_the_reason_follows_the_latest_second_while_the_alert_holds() -> None:
    states = run_debounce([{"cpu": "CPU 90% > 85%"}] * 3 + [{"cpu": "CPU 97% > 85%"}, {}])
    assert states[2] == {"cpu": "CPU 90% > 85%"} and states[3] == {"cpu": "CPU 97% > 85%"}
    assert states[4] == {"cpu": "CPU 97% > 85%"}, "quiet for a second: still active, with its last reason"


def test_without_debounce_alerts_follow_each_second() -> None:
    hot = {"listen_drops": "3 connections dropped by full accept queues"}
    instant = AlertThresholds(fire_after_s=1, clear_after_s=1)
    assert [bool(a) for a in run_debounce([hot, {}, hot], instant)] == [True, False, True]


def test_thresholds_come_from_the_alerts_table(tmp_path: Path) -> None:
    path = tmp_path / "mcpherd.toml"
    path.write_text("[alerts]\nerror_rate = 0.01\nmin_requests = 5\ncpu_percent = 95\n")
    config = load(str(path), {})
    assert config.alerts == AlertThresholds(error_rate=0.01, min_requests=5, cpu_percent=95.0)
    assert load(None, {}).alerts == DEFAULTS


def test_an_unknown_alert_key_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "mcpherd.toml"
    path.write_text("[alerts]\nerror_ratio = 0.01\n")
    with pytest.raises(ConfigError, match="error_ratio"):
        load(str(path), {})
