"""The metrics region of a shared-memory cell: what a worker's Recorder writes is what the master reads,
and folding keeps counters exact and monotonic across process replacement on a lane."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fake_cluster import FakeCluster
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mcpherd.shared import layout, metrics
from mcpherd.supervisor.metrics import ClusterMetrics, LiveLane

TOOLS = ["search", "fetch", "sum"]


@pytest.fixture
def segment() -> Iterator[layout.Segment]:
    segment = layout.Segment.create(2)
    yield segment
    segment.close()


def start_process(cell: layout.Cell, pid: int, started_at: int) -> None:
    """What fork_worker does to a lane for a new process."""
    cell.clear()
    cell.set(layout.F_PID, pid)
    cell.set(layout.F_STARTED_AT, started_at)


def test_layout_fits_in_the_cell_metrics_words() -> None:
    assert metrics.METRICS_WORDS <= layout.WORDS - layout.METRICS_BASE
    assert metrics.HIST_WORDS == len(metrics.REQUEST_BOUNDS) + 2 == 16
    assert metrics.PROPAGATION_WORDS == len(metrics.PROPAGATION_BOUNDS) + 2 == 12
    assert len(metrics.METHODS) == 18 and metrics.METHODS[-1] == "other"


def test_recorder_writes_only_its_own_lane_and_region(segment: layout.Segment) -> None:
    recorder = metrics.Recorder(segment.cell(1), [f"t{i}" for i in range(40)])
    for method in metrics.METHODS:
        recorder.request(method, True, 100.0)
        recorder.request(method, False, 0.0)
    for i in range(40):
        recorder.answered("tools/call", True, 100_000_000_000, f"t{i}", waited=False)
    recorder.propagation(100.0)
    words = segment.words
    untouched = [0, layout.WORDS - 1, layout.WORDS + layout.METRICS_BASE + metrics.METRICS_WORDS,
                 2 * layout.WORDS, 4 * layout.WORDS - 1]
    assert [words[i] for i in untouched] == [0] * len(untouched)
    last_used = layout.WORDS + layout.METRICS_BASE + metrics.METRICS_WORDS - 1
    assert words[last_used] == 100 * 10**9  # the propagation sum is the last word in use


def test_snapshot_reads_exactly_what_the_recorder_wrote(segment: layout.Segment) -> None:
    cell = segment.cell(0)
    recorder = metrics.Recorder(cell, TOOLS)
    recorder.request("tools/call", True, 0.003)
    recorder.request("tools/call", True, 0.0005)  # on a bound: le is inclusive
    recorder.request("tools/call", False, 20.0)
    recorder.request("notifications/initialized", True, 0.0)
    recorder.request("notifications/cancelled", True, 0.0)
    recorder.request("no/such/method", False, 0.001)
    recorder.request("responses", True, 0.0)
    recorder.enter()  # the next call suspended before answering: it was in flight
    recorder.answered("tools/call", True, 20_000_000, "fetch", waited=True)
    recorder.answered("tools/call", False, 200_000_000, "unlisted", waited=False)
    recorder.propagation(0.0003)
    totals = metrics.snapshot(cell, TOOLS)
    assert totals.requests_of("tools/call", "ok") == 3
    assert totals.requests_of("tools/call", "error") == 2
    assert totals.requests_of("notifications", "ok") == 2
    assert totals.requests_of("other", "error") == 1
    assert totals.requests_of("responses", "ok") == 1
    assert sum(totals.requests) == 9
    calls = totals.durations[metrics.METHODS.index("tools/call")]
    assert calls.buckets == [1, 0, 0, 1, 0, 1, 0, 0, 1] + [0] * 5 + [1]
    assert calls.sum_ns == 3_000_000 + 500_000 + 20_000_000_000 + 20_000_000 + 200_000_000
    assert calls.cumulative()[-1] == calls.count == 5
    assert metrics.gauges(cell).inflight == 0
    assert set(totals.tools) == {"search", "fetch", "sum", "other"}
    assert totals.tools["fetch"].buckets[5] == 1 and totals.tools["fetch"].sum_ns == 20_000_000
    assert totals.tools["search"].count == 0
    assert totals.tools["other"].buckets[8] == 1
    assert totals.propagation.buckets[3] == 1 and totals.propagation.sum_ns == 300_000
    assert totals.counters["errors"] == 3


def test_gauges_and_process_counters(segment: layout.Segment) -> None:
    cell = segment.cell(0)
    recorder = metrics.Recorder(cell, [])
    recorder.enter()
    recorder.enter()
    recorder.leave()
    recorder.leave()
    recorder.leave()  # unpaired: stays at zero instead of wrapping
    recorder.enter()
    recorder.gauges(connections=5, streams=2)
    recorder.transferred(received=100, sent=2500)
    recorder.cache(hits=3, misses=1, evictions=1)
    recorder.http_error()
    recorder.busy(1500)
    recorder.event_applied(42)
    live = metrics.gauges(cell)
    assert (live.inflight, live.connections, live.streams) == (1, 5, 2)
    assert cell.get(layout.F_EVENTS_APPLIED) == 42
    counters = metrics.snapshot(cell).counters
    assert counters == {"http_requests": 0, "errors": 1, "bytes_in": 100, "bytes_out": 2500, "cache_hits": 3,
                        "cache_misses": 1, "cache_evictions": 1, "busy_ns": 1500}


def test_snapshot_of_a_lane_without_recorder_or_with_another_version(segment: layout.Segment) -> None:
    cell = segment.cell(0)
    cell.set(layout.F_REQUESTS, 7)
    assert metrics.snapshot(cell).counters["http_requests"] == 7
    metrics.Recorder(cell, []).request("ping", True, 0.0)
    cell.set(layout.METRICS_BASE + metrics.M_VERSION, metrics.METRICS_VERSION + 1)
    assert sum(metrics.snapshot(cell).requests) == 0


def test_unnamed_tool_slots_are_hidden_live_and_folded_as_other(segment: layout.Segment) -> None:
    cell = segment.cell(0)
    metrics.Recorder(cell, TOOLS).answered("tools/call", True, 1_000_000, "sum", waited=False)
    assert metrics.snapshot(cell).tools == {}  # the names have not reached the master yet
    assert metrics.snapshot(cell, unnamed_tool=metrics.OTHER_TOOL).tools["other"].count == 1


def test_tool_slots_are_the_first_31_distinct_names(segment: layout.Segment) -> None:
    names = [f"tool-{i}" for i in range(40)] + ["tool-0"]
    assert metrics.tool_slots(["b", "a", "b"]) == ["b", "a"]
    assert metrics.tool_slots(names) == [f"tool-{i}" for i in range(31)]
    cluster = FakeCluster()
    collector = ClusterMetrics(cluster)
    cell = segment.cell(0)
    recorder = metrics.Recorder(cell, ["dup", "dup", *names])
    collector.set_tool_names(0, ["dup", "dup", *names])  # the Hello carries every name, as the app lists them
    recorder.answered("tools/call", True, 1_000_000, "tool-29", waited=False)
    recorder.answered("tools/call", True, 1_000_000, "tool-30", waited=False)
    tools = collector.totals([LiveLane(0, 0, 1, cell)]).tools
    assert (tools["tool-29"].count, tools["other"].count) == (1, 1)
    assert "tool-30" not in tools


def test_fold_keeps_counters_monotonic_across_replacement(segment: layout.Segment) -> None:
    cluster = FakeCluster()
    collector = ClusterMetrics(cluster)
    cell = segment.cell(0)
    start_process(cell, pid=1000, started_at=1)
    collector.set_tool_names(0, ["a", "b"])
    recorder = metrics.Recorder(cell, ["a", "b"])
    cluster.lanes = [LiveLane(0, 0, 1000, cell)]
    for _ in range(5):
        recorder.answered("tools/call", True, 10_000_000, "b", waited=False)
    before = collector.totals(cluster.live_lanes())
    cluster.lanes = []  # reaped
    collector.fold(0, cell)
    collector.fold(0, cell)  # a second fold of the same process counts nothing
    assert collector.totals([]).requests_of("tools/call", "ok") == 5
    start_process(cell, pid=1001, started_at=2)  # the lane is reused by a process with other tools
    collector.set_tool_names(0, ["c", "b"])
    recorder = metrics.Recorder(cell, ["c", "b"])
    cluster.lanes = [LiveLane(0, 0, 1001, cell)]
    after = collector.totals(cluster.live_lanes())
    assert after.requests == before.requests and after.tools["b"] == before.tools["b"]
    recorder.answered("tools/call", False, 10_000_000, "b", waited=False)
    recorder.answered("tools/call", False, 10_000_000, "c", waited=False)
    total = collector.totals(cluster.live_lanes())
    assert total.requests_of("tools/call", "ok") == 5 and total.requests_of("tools/call", "error") == 2
    assert (total.tools["a"].count, total.tools["b"].count, total.tools["c"].count) == (0, 6, 1)


Scraped = dict[str, list[Sample]]


def scrape(collector: ClusterMetrics) -> Scraped:
    """Family name -> its samples, parsed back from the exposition text."""
    text = generate_latest(collector.registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(scraped: Scraped, sample_name: str, **labels: str) -> float:
    [found] = [s.value for samples in scraped.values() for s in samples
               if s.name == sample_name and s.labels == labels]
    return found


def test_scrape_has_the_same_series_after_10000_restarts(segment: layout.Segment) -> None:
    cluster = FakeCluster()
    collector = ClusterMetrics(cluster)
    cell = segment.cell(0)
    pid = os.getpid()  # psutil must find a live process for the per-worker gauges

    def new_process(generation: int) -> metrics.Recorder:
        start_process(cell, pid=pid, started_at=generation)
        collector.set_tool_names(0, TOOLS)
        cluster.lanes = [LiveLane(0, 0, pid, cell)]
        return metrics.Recorder(cell, TOOLS)

    new_process(0)
    first = scrape(collector)
    for generation in range(1, 10_001):
        cluster.lanes = []
        collector.fold(0, cell)
        cluster.restarts += 1
        recorder = new_process(generation)
        recorder.answered("tools/call", True, 2_000_000, "search", waited=False)
    last = scrape(collector)
    assert first.keys() == last.keys()
    assert {name: len(samples) for name, samples in first.items()} == \
           {name: len(samples) for name, samples in last.items()}
    assert value(last, "mcpherd_requests_total", method="tools/call", outcome="ok") == 10_000
    assert sum(s.value for s in last["mcpherd_requests"]) == 10_000
    assert value(last, "mcpherd_worker_restarts_total") == 10_000
    assert value(last, "mcpherd_tool_duration_seconds_count", tool="search") == 10_000
    assert value(last, "mcpherd_tool_duration_seconds_bucket", tool="search", le="0.001") == 0
    assert value(last, "mcpherd_tool_duration_seconds_bucket", tool="search", le="0.0025") == 10_000
    assert value(last, "mcpherd_tool_duration_seconds_sum", tool="search") == pytest.approx(20.0)
    assert value(last, "mcpherd_tool_duration_seconds_count", tool="fetch") == 0
    assert len(collector.processes) == 1
