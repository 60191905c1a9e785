"""Alerts: a pure evaluation of one second's measurements against thresholds from the configuration.

`evaluate` returns the alerts active now with a one-line reason each; the master compares with the
previous set and logs only transitions (fired, cleared), shows the active set in `status` and on the
dashboard, and exports `mcpherd_alert_active{alert}` for every known alert (0 or 1), so Prometheus
Alertmanager can route them.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

ALERTS = ("cpu", "memory", "p99_latency", "error_rate", "cache_hit_ratio", "restart_intensity", "listen_drops")


class AlertThresholds(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    enabled: bool = True
    cpu_percent: float = 85.0  # the machine's CPU use
    memory_percent: float = 90.0  # the machine's memory use
    p99_s: float = 5.0  # request latency over the last second
    error_rate: float = 0.05  # share of requests answered with an error over the last second
    cache_hit_ratio: float = 0.70  # only while the cache is used
    min_requests: int = 20  # below this many requests in the window, rates say nothing
    fire_after_s: int = 3  # a condition must hold this many consecutive seconds to fire...
    clear_after_s: int = 10  # ...and be gone this long to clear: a flapping metric alerts once


@dataclass(frozen=True, slots=True)
class Window:
    """One second of the cluster, as the master measured it."""

    cpu_percent: float
    memory_percent: float
    requests: int
    errors: int
    p99_s: float | None
    cache_lookups: int
    cache_hits: int
    slots_in_backoff: int
    new_listen_drops: int


def evaluate(window: Window, thresholds: AlertThresholds) -> dict[str, str]:
    if not thresholds.enabled:
        return {}
    active: dict[str, str] = {}
    if window.cpu_percent > thresholds.cpu_percent:
        active["cpu"] = f"CPU {window.cpu_percent:.0f}% > {thresholds.cpu_percent:g}%"
    if window.memory_percent > thresholds.memory_percent:
        active["memory"] = f"memory {window.memory_percent:.0f}% > {thresholds.memory_percent:g}%"
    if window.p99_s is not None and window.requests >= thresholds.min_requests and window.p99_s > thresholds.p99_s:
        active["p99_latency"] = f"p99 {window.p99_s:.2f}s > {thresholds.p99_s:g}s"
    if window.requests >= thresholds.min_requests and window.errors / window.requests > thresholds.error_rate:
        active["error_rate"] = f"errors {window.errors / window.requests:.1%} > {thresholds.error_rate:.0%}"
    if window.cache_lookups >= thresholds.min_requests:
        ratio = window.cache_hits / window.cache_lookups
        if ratio < thresholds.cache_hit_ratio:
            active["cache_hit_ratio"] = f"cache hit ratio {ratio:.0%} < {thresholds.cache_hit_ratio:.0%}"
    if window.slots_in_backoff:
        active["restart_intensity"] = f"{window.slots_in_backoff} worker slot(s) backing off after repeated crashes"
    if window.new_listen_drops:
        active["listen_drops"] = f"{window.new_listen_drops} connections dropped by full accept queues"
    return active


def debounce(conditions: dict[str, str], active: dict[str, str], streaks: dict[str, int],
             thresholds: AlertThresholds) -> dict[str, str]:
    """The alerts active after this second, given the raw conditions and the consecutive-second
    `streaks` (positive: condition present, negative: absent), which it updates in place."""
    for name in ALERTS:
        present = name in conditions
        previous = streaks.get(name, 0)
        streaks[name] = (max(previous, 0) + 1) if present else (min(previous, 0) - 1)
    result = {}
    for name in ALERTS:
        if name in active and -streaks[name] < thresholds.clear_after_s:
            result[name] = conditions.get(name, active[name])
        elif name not in active and streaks[name] >= thresholds.fire_after_s:
            result[name] = conditions[name]
    return result


def transitions(previous: dict[str, str], current: dict[str, str]) -> tuple[list[str], list[str]]:
    """(fired, cleared) alert names, in ALERTS order."""
    fired = [name for name in ALERTS if name in current and name not in previous]
    cleared = [name for name in ALERTS if name in previous and name not in current]
    return fired, cleared
