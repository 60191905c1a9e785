"""The master's Prometheus endpoint: `ClusterMetrics` turns retired totals plus every live lane's cell
into metric families; `MetricsServer` serves them over HTTP/1.1 from the master's selectors loop.

Counters are monotonic across worker death, restart, recycling and reload because the master folds a
reaped process's lane into `retired` (once: a fold is keyed by the lane's pid and start time) before
the lane is reused; a scrape sums `retired` and the live lanes. Its cost depends on the live lanes
and the set of tool names ever deployed, never on how many processes came and went.

Exposed families (written by prometheus_client's generate_latest, served as CONTENT_TYPE_LATEST):

    mcpherd_requests_total{method,outcome}            counter   JSON-RPC messages answered
    mcpherd_request_duration_seconds{method}          histogram
    mcpherd_tool_duration_seconds{tool}               histogram
    mcpherd_event_propagation_seconds                 histogram master publish -> worker applied
    mcpherd_http_requests_total, mcpherd_errors_total counter
    mcpherd_received_bytes_total, mcpherd_sent_bytes_total, mcpherd_busy_seconds_total
    mcpherd_cache_{hits,misses,evictions}_total       counter
    mcpherd_inflight_requests, mcpherd_open_connections, mcpherd_sse_streams   gauge (live workers)
    mcpherd_workers, mcpherd_worker_restarts_total, mcpherd_reloads_total      from the master
    mcpherd_worker_{cpu_percent,rss_bytes,event_loop_lag_seconds,heartbeat_age_seconds}{slot,pid}

`MetricsServer` (supervisor/metrics_http.py, re-exported here) serves `ClusterMetrics.scrape` at
/metrics from the master's selectors loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from mcpherd.shared import layout
from mcpherd.supervisor.alerts import ALERTS
from mcpherd.shared.metrics import (METHODS, OTHER_TOOL, OUTCOMES, PROPAGATION_BOUNDS, REQUEST_BOUNDS, Histogram,
                                    Totals, gauges, snapshot, tool_slots)
from mcpherd.supervisor.metrics_http import MetricsServer, Reply, Route

__all__ = ["Cluster", "ClusterMetrics", "LiveLane", "MetricsServer", "Reply", "Route"]


class LiveLane(NamedTuple):
    lane: int  # layout.lane_index(slot, lane): the key of set_tool_names and fold
    slot: int
    pid: int
    cell: layout.Cell


class Cluster(Protocol):
    """What the master tells the collector at scrape time."""

    def live_lanes(self) -> list[LiveLane]: ...  # every forked process not yet reaped and folded
    def worker_count(self) -> int: ...
    def restarts_total(self) -> int: ...
    def reloads_total(self) -> int: ...
    def scale_events(self) -> dict[str, int]: ...
    def restart_latency_s(self) -> float: ...
    def redis_up(self) -> bool | None: ...  # None: no Redis configured
    def redis_ping_s(self) -> float | None: ...  # None: no Redis configured, or no PING answered yet
    def alerts_active(self) -> dict[str, str]: ...


class ClusterMetrics:
    """Retired totals, tool names per lane and the psutil handles of live workers; a prometheus_client
    collector registered in `registry` (a fresh one unless given)."""

    def __init__(self, cluster: Cluster, registry: CollectorRegistry | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.cluster = cluster
        self.clock_ns = clock_ns
        self.retired = Totals()
        self.tool_names: dict[int, list[str]] = {}
        self.folded: dict[int, tuple[int, int]] = {}  # lane -> (pid, started_at) of its last fold
        self.processes: dict[int, psutil.Process] = {}  # pid -> handle (cpu_percent needs the same one)
        self.registry = CollectorRegistry() if registry is None else registry
        self.registry.register(self)

    def set_tool_names(self, lane: int, names: list[str]) -> None:
        """The names a lane's process sent in its Hello, mapped to slots as its Recorder maps them."""
        self.tool_names[lane] = tool_slots(names)

    def fold(self, lane: int, cell: layout.Cell) -> None:
        """Add a reaped process's counters to `retired`. Call after waitpid, before the lane is reused;
        a second call for the same process is ignored rather than counted twice."""
        identity = (cell.get(layout.F_PID), cell.get(layout.F_STARTED_AT))
        if identity == self.folded.get(lane):
            return
        self.retired = self.retired + snapshot(cell, self.tool_names.pop(lane, ()), unnamed_tool=OTHER_TOOL)
        self.folded[lane] = identity

    def totals(self, lanes: Iterable[LiveLane]) -> Totals:
        total = self.retired
        for live in lanes:
            total = total + snapshot(live.cell, self.tool_names.get(live.lane, ()))
        return total

    def scrape(self) -> Reply:
        return Reply(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))

    def describe(self) -> list[Metric]:
        return []  # no registration-time collect: the families are fixed and ours alone

    def collect(self) -> Iterator[Metric]:
        lanes = self.cluster.live_lanes()
        total = self.totals(lanes)
        yield from _request_families(total)
        yield from _counter_families(total)
        yield from self._cluster_families(lanes)
        yield from self._worker_families(lanes)

    def _cluster_families(self, lanes: list[LiveLane]) -> Iterator[Metric]:
        live = [gauges(lane.cell) for lane in lanes]
        yield GaugeMetricFamily("mcpherd_inflight_requests", "Requests being handled by live workers.",
                                value=sum(g.inflight for g in live))
        yield GaugeMetricFamily("mcpherd_open_connections", "Open client connections of live workers.",
                                value=sum(g.connections for g in live))
        yield GaugeMetricFamily("mcpherd_sse_streams", "Open SSE streams of live workers.",
                                value=sum(g.streams for g in live))
        yield GaugeMetricFamily("mcpherd_workers", "Worker processes serving now.", value=self.cluster.worker_count())
        yield CounterMetricFamily("mcpherd_worker_restarts", "Workers restarted after dying unexpectedly.",
                                  value=self.cluster.restarts_total())
        yield CounterMetricFamily("mcpherd_reloads", "Reloads (SIGHUP) of the worker generation.",
                                  value=self.cluster.reloads_total())
        scale = CounterMetricFamily("mcpherd_scale_events", "Autoscaler decisions that changed the worker count.",
                                    labels=["direction"])
        for direction, count in sorted(self.cluster.scale_events().items()):
            scale.add_metric([direction], count)
        yield scale
        active = self.cluster.alerts_active()
        alert = GaugeMetricFamily("mcpherd_alert_active", "1 while the alert is firing.", labels=["alert"])
        for name in ALERTS:
            alert.add_metric([name], 1 if name in active else 0)
        yield alert
        redis_up = self.cluster.redis_up()
        if redis_up is not None:
            yield GaugeMetricFamily("mcpherd_redis_up", "1 while this host's Redis subscription is live and "
                                    "Redis answers in time.", value=int(redis_up))
        ping_s = self.cluster.redis_ping_s()
        if ping_s is not None:
            yield GaugeMetricFamily("mcpherd_redis_ping_seconds", "Slowest PING round trip to Redis among "
                                    "this host's last 10 (one a second).", value=ping_s)
        yield GaugeMetricFamily("mcpherd_restart_latency_seconds", "Death of a worker to its replacement "
                                "accepting, last measured per cluster.", value=self.cluster.restart_latency_s())

    def _worker_families(self, lanes: list[LiveLane]) -> Iterator[Metric]:
        names = ["slot", "pid"]
        cpu = GaugeMetricFamily("mcpherd_worker_cpu_percent", "CPU use since the previous scrape (100 = one CPU).",
                                labels=names)
        rss = GaugeMetricFamily("mcpherd_worker_rss_bytes", "Resident memory of the worker.", labels=names)
        lag = GaugeMetricFamily("mcpherd_worker_event_loop_lag_seconds", "How late the last heartbeat ran.",
                                labels=names)
        age = GaugeMetricFamily("mcpherd_worker_heartbeat_age_seconds", "Time since the loop last beat.", labels=names)
        now_ns = self.clock_ns()
        for lane in lanes:
            labels = [str(lane.slot), str(lane.pid)]
            usage = self._usage(lane.pid)
            if usage is not None:
                cpu.add_metric(labels, usage[0])
                rss.add_metric(labels, usage[1])
            live = gauges(lane.cell)
            lag.add_metric(labels, live.loop_lag_s)
            if live.heartbeat_ns:
                age.add_metric(labels, max(0, now_ns - live.heartbeat_ns) / 1e9)
        for pid in self.processes.keys() - {lane.pid for lane in lanes}:
            del self.processes[pid]  # reaped: one handle per live worker, never more
        yield from (cpu, rss, lag, age)

    def _usage(self, pid: int) -> tuple[float, int] | None:
        """(CPU percent since the last call, RSS bytes); the first call for a pid reports 0% CPU."""
        try:
            process = self.processes.get(pid)
            if process is None:
                process = self.processes[pid] = psutil.Process(pid)
            with process.oneshot():
                return process.cpu_percent(None), int(process.memory_info().rss)
        except psutil.Error:
            self.processes.pop(pid, None)
            return None


def _histogram_family(name: str, documentation: str, labels: list[str], bounds: tuple[float, ...],
                      series: Iterable[tuple[list[str], Histogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    les = _le_labels(bounds)
    for values, histogram in series:
        family.add_metric(values, list(zip(les, histogram.cumulative(), strict=True)), histogram.sum_ns / 1e9)
    return family


def _le_labels(bounds: tuple[float, ...]) -> list[str]:
    """Bucket labels spelled as prometheus_client spells them (Go's float formatting)."""
    return [floatToGoString(bound) for bound in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]


def _request_families(total: Totals) -> Iterator[Metric]:
    requests = CounterMetricFamily("mcpherd_requests", "JSON-RPC messages answered, by method and outcome.",
                                   labels=["method", "outcome"])
    for m, method in enumerate(METHODS):
        for o, outcome in enumerate(OUTCOMES):
            requests.add_metric([method, outcome], total.requests[m * len(OUTCOMES) + o])
    yield requests
    yield _histogram_family("mcpherd_request_duration_seconds", "Time to answer a JSON-RPC message.", ["method"],
                            REQUEST_BOUNDS, (([method], total.durations[m]) for m, method in enumerate(METHODS)))
    yield _histogram_family("mcpherd_tool_duration_seconds", "Tool call duration, by tool.", ["tool"],
                            REQUEST_BOUNDS, (([name], total.tools[name]) for name in sorted(total.tools)))
    yield _histogram_family("mcpherd_event_propagation_seconds", "From the master publishing a cluster event to "
                            "a worker applying it.", [], PROPAGATION_BOUNDS, [([], total.propagation)])


_COUNTERS = (  # family name, Totals.counters key, scale, help
    ("mcpherd_http_requests", "http_requests", 1, "HTTP requests answered."),
    ("mcpherd_errors", "errors", 1, "Requests answered with a JSON-RPC error or an HTTP error status."),
    ("mcpherd_received_bytes", "bytes_in", 1, "Request bytes received."),
    ("mcpherd_sent_bytes", "bytes_out", 1, "Response bytes sent."),
    ("mcpherd_busy_seconds", "busy_ns", 1e-9, "Time worker loops spent handling requests."),
    ("mcpherd_cache_hits", "cache_hits", 1, "Cache lookups answered from the cache."),
    ("mcpherd_cache_misses", "cache_misses", 1, "Cache lookups that had to compute."),
    ("mcpherd_cache_evictions", "cache_evictions", 1, "Cache entries evicted."),
)


def _counter_families(total: Totals) -> Iterator[Metric]:
    for name, key, scale, documentation in _COUNTERS:
        yield CounterMetricFamily(name, documentation, value=total.counters[key] * scale)
