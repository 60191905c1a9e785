"""Once a second: the cluster's window (rates, latency, errors, cache), alerts, and the dashboard feed.

Everything here is computed once per tick for every viewer: the dashboard's SSE stream (`/events`
on the metrics address) receives the same bytes whether one page or fifty are open. The page itself
(`/`) is a static document shipped in the package: no CDN, no build step, nothing fetched at runtime.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import psutil

from mcpherd.shared import metrics
from mcpherd.supervisor import alerts, status
from mcpherd.supervisor.metrics_http import Reply

if TYPE_CHECKING:
    from mcpherd.supervisor.master import Master

log = logging.getLogger("mcpherd.master")
HISTORY_S = 600  # ten minutes of one-second points
TIMELINE = 200
PAGE = Path(__file__).with_name("dashboard.html")


class Observer:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_S)
        self.timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE)
        self.active: dict[str, str] = {}
        self.streaks: dict[str, int] = {}  # consecutive seconds each condition held (+) or not (-)
        self.previous: metrics.Totals | None = None
        self.previous_drops = 0
        self.previous_at = time.monotonic()
        self.snapshot = b"{}"
        self._p50: float | None = None
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def record(self, kind: str, text: str) -> None:
        """Something an operator wants on the timeline: a reload, a restart, a scale decision, an alert."""
        self.timeline.append({"at": time.time(), "kind": kind, "text": text})

    def tick(self, document: dict[str, Any]) -> None:
        master = self.master
        totals, now = master.cluster_totals(), time.monotonic()
        window = self._window(totals, document)
        # A tick comes at least a second after the last one, later when the loop was busy: a rate per second.
        elapsed, self.previous, self.previous_at = max(1.0, now - self.previous_at), totals, now
        conditions = alerts.evaluate(window, master.config.alerts)
        current = alerts.debounce(conditions, self.active, self.streaks, master.config.alerts)
        fired, cleared = alerts.transitions(self.active, current)
        for name in fired:
            log.warning("alert %s fired: %s", name, current[name])
            self.record("alert", f"{name} fired: {current[name]}")
        for name in cleared:
            log.info("alert %s cleared", name)
            self.record("alert", f"{name} cleared")
        self.active = current
        point = {"at": time.time(), "rps": round(window.requests / elapsed, 1), "p99_ms": _ms(window.p99_s),
                 "p50_ms": _ms(self._p50), "error_rate": window.errors / window.requests if window.requests else 0.0,
                 "inflight": sum(w["inflight"] for w in document["workers"]),
                 "cache_hit_ratio": window.cache_hits / window.cache_lookups if window.cache_lookups else None}
        self.history.append(point)
        self.snapshot = msgspec.json.encode({"status": document, "history": list(self.history),
                                             "timeline": list(self.timeline), "alerts": self.active})

    def _window(self, totals: metrics.Totals, document: dict[str, Any]) -> alerts.Window:
        before = self.previous or totals
        requests = sum(totals.requests) - sum(before.requests)
        errors = sum(totals.requests[0::2]) - sum(before.requests[0::2])  # outcome 0 is "error"
        merged = _merge([a for a in totals.durations]), _merge([b for b in before.durations])
        delta = metrics.Histogram([a - b for a, b in zip(merged[0].buckets, merged[1].buckets, strict=True)])
        self._p50 = _seconds(status.quantile_ms(delta, 0.5))
        hits = totals.counters["cache_hits"] - before.counters["cache_hits"]
        misses = totals.counters["cache_misses"] - before.counters["cache_misses"]
        drops = self.master.listen_overflows + self.master.listen_drops
        new_drops, self.previous_drops = drops - self.previous_drops, drops
        return alerts.Window(psutil.cpu_percent(None), psutil.virtual_memory().percent, max(0, requests),
                             max(0, errors), _seconds(status.quantile_ms(delta, 0.99)), max(0, hits + misses),
                             max(0, hits), sum(1 for w in document["workers"] if w["state"] == "backoff"),
                             max(0, new_drops))

    def page(self) -> Reply:
        return Reply(200, "text/html; charset=utf-8", PAGE.read_bytes())

    def feed(self) -> Reply:
        return Reply(200, "application/json", self.snapshot)


def _merge(histograms: list[metrics.Histogram]) -> metrics.Histogram:
    total = histograms[0]
    for histogram in histograms[1:]:
        total = total + histogram
    return total


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
