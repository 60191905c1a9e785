"""The `status` document (stable: tests and tools rely on its keys) and the rates behind it.

    master   pid, version, generation, started_at, uptime_s, bind, workers_target, autoscale {...},
             listen {overflows, drops}, reloads, reload_failed, upgrade_failed
    workers  one entry per slot that is wanted or still has a process: slot, pid, cpu, generation,
             state (starting / ready / draining / backoff / stopped), started_at, rss_bytes,
             cpu_percent, requests_total, requests_per_s, inflight, connections, streams, p50_ms,
             p99_ms, restarts, last_restart_reason, last_restart_latency_ms, heartbeat_age_s,
             loop_lag_ms, events_applied, busy_ratio
    totals   requests_total, requests_per_s, errors_total, cache_hit_ratio (null before any lookup)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from mcpherd.shared import layout, metrics
from mcpherd.supervisor.slots import Proc, Slot, State

if TYPE_CHECKING:
    from mcpherd.supervisor.master import Master


@dataclass
class Sample:
    at: float
    requests: int
    busy_ns: int
    cpu_s: float = 0.0
    rate: float = 0.0
    busy_ratio: float = 0.0
    cpu_share: float = 0.0


class Rates:
    """Per-process request rate and busy ratio over the last sampling interval (about 1 s).

    The busy ratio is the larger of the loop's own account (F_BUSY_NS: time inside request handlers)
    and the worker's CPU time over wall time: tools running in the worker's thread pool leave its loop
    idle while they saturate its CPU, and parsing and writing happen outside the handlers. Each worker
    is pinned to one CPU, so the CPU share of a saturated worker is 1 whatever its tools do.
    """

    def __init__(self) -> None:
        self.samples: dict[int, Sample] = {}
        self.cpu: dict[int, psutil.Process] = {}

    def update(self, procs: list[Proc], now: float) -> None:
        live = {p.pid for p in procs}
        for pid in [pid for pid in self.samples if pid not in live]:
            del self.samples[pid]
            self.cpu.pop(pid, None)
        for proc in procs:
            requests, busy = proc.cell.get(layout.F_REQUESTS), proc.cell.get(layout.F_BUSY_NS)
            cpu = self._cpu_seconds(proc.pid)
            previous = self.samples.get(proc.pid)
            if previous is None:
                self.samples[proc.pid] = Sample(now, requests, busy, cpu)
            elif now - previous.at >= 1.0:
                elapsed = now - previous.at
                loop, share = (busy - previous.busy_ns) / 1e9 / elapsed, max(0.0, cpu - previous.cpu_s) / elapsed
                self.samples[proc.pid] = Sample(now, requests, busy, cpu, (requests - previous.requests) / elapsed,
                                                min(1.0, max(loop, share)), share)

    def rate(self, pid: int) -> float:
        sample = self.samples.get(pid)
        return sample.rate if sample else 0.0

    def busy_ratio(self, pid: int) -> float:
        sample = self.samples.get(pid)
        return sample.busy_ratio if sample else 0.0

    def usage(self, pid: int) -> tuple[int, float]:
        """(rss bytes, cpu percent over the last sampling interval: the same for every caller)."""
        sample = self.samples.get(pid)
        try:
            return self._process(pid).memory_info().rss, (sample.cpu_share * 100 if sample else 0.0)
        except psutil.Error:
            return 0, 0.0

    def _cpu_seconds(self, pid: int) -> float:
        try:
            times = self._process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def _process(self, pid: int) -> psutil.Process:
        return self.cpu.get(pid) or self.cpu.setdefault(pid, psutil.Process(pid))


def quantile_ms(histogram: metrics.Histogram, q: float) -> float | None:
    """Linear interpolation inside the bucket holding the q-th observation (as Prometheus does)."""
    total = histogram.count
    if not total:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for upper, count in zip((*metrics.REQUEST_BOUNDS, float("inf")), histogram.buckets):
        if seen + count >= rank and count:
            if upper == float("inf"):
                return lower * 1000
            return (lower + (upper - lower) * (rank - seen) / count) * 1000
        seen += count
        lower = upper
    return lower * 1000


def build(master: Master) -> dict[str, Any]:
    now, wall, now_ns = time.monotonic(), time.time(), time.monotonic_ns()
    workers = [_worker(master, slot, now, now_ns) for slot in master.slots
               if slot.wanted or slot.processes() or slot.restarts_total]
    requests = sum(w["requests_total"] for w in workers) + master.metrics_retired_requests()
    hits, misses = master.cache_totals()
    return {
        "master": {
            "pid": master.pid, "version": _version(), "generation": master.generation,
            "started_at": master.started_at, "uptime_s": round(wall - master.started_at, 3),
            "bind": [g.address for g in master.groups], "workers_target": master.target,
            "autoscale": master.autoscale_status(),
            "listen": {"overflows": master.listen_overflows, "drops": master.listen_drops},
            "reloads": master.reloads, "reload_failed": master.reload_failed or None,
            "upgrade_failed": master.upgrade.failed or None,
            "alerts": master.alerts_status(),
        },
        "workers": workers,
        "totals": {
            "requests_total": requests,
            "requests_per_s": round(sum(w["requests_per_s"] for w in workers), 1),
            "errors_total": master.errors_total(),
            "cache_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        },
    }


def _worker(master: Master, slot: Slot, now: float, now_ns: int) -> dict[str, Any]:
    proc = slot.current or slot.successor or (slot.retiring[0] if slot.retiring else None)
    entry: dict[str, Any] = {
        "slot": slot.index, "cpu": slot.cpu, "state": _state(slot, proc, now), "restarts": slot.restarts_total,
        "last_restart_reason": slot.last_restart_reason or None,
        "last_restart_latency_ms": round(slot.last_restart_latency_ms, 2) if slot.last_restart_latency_ms else None,
    }
    if proc is None:
        return entry | {"pid": None, "generation": None, "started_at": None, "rss_bytes": 0, "cpu_percent": 0.0,
                        "requests_total": 0, "requests_per_s": 0.0, "inflight": 0, "connections": 0, "streams": 0,
                        "p50_ms": None, "p99_ms": None, "heartbeat_age_s": None, "loop_lag_ms": None,
                        "events_applied": None, "busy_ratio": 0.0}
    rss, cpu = master.rates.usage(proc.pid)
    gauges = metrics.gauges(proc.cell)
    totals = metrics.snapshot(proc.cell)
    merged = totals.durations[0]
    for histogram in totals.durations[1:]:
        merged = merged + histogram
    p50, p99 = quantile_ms(merged, 0.5), quantile_ms(merged, 0.99)
    return entry | {
        "pid": proc.pid, "generation": proc.generation,
        "started_at": round(time.time() - (now - proc.spawned_at), 3),
        "rss_bytes": rss, "cpu_percent": round(cpu, 1),
        "requests_total": proc.cell.get(layout.F_REQUESTS), "requests_per_s": round(master.rates.rate(proc.pid), 1),
        "inflight": gauges.inflight, "connections": gauges.connections, "streams": gauges.streams,
        "p50_ms": round(p50, 3) if p50 is not None else None, "p99_ms": round(p99, 3) if p99 is not None else None,
        "heartbeat_age_s": round(proc.heartbeat_age(now_ns), 3), "loop_lag_ms": round(gauges.loop_lag_s * 1000, 3),
        "events_applied": proc.cell.get(layout.F_EVENTS_APPLIED),
        "busy_ratio": round(master.rates.busy_ratio(proc.pid), 3),
    }


def _state(slot: Slot, proc: Proc | None, now: float) -> str:
    if proc is None:
        return "backoff" if slot.in_backoff(now) else "stopped"
    if proc is not slot.current:
        return State.DRAINING.value if proc.state is State.DRAINING else proc.state.value
    return proc.state.value


def _version() -> str:
    from mcpherd import __version__

    return __version__
