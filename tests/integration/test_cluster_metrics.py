"""The cluster's Prometheus counters are exact and monotonic, whatever happens to its workers.

A worker's counters live in its shared-memory lane and restart at zero with each process; the master
folds a reaped process's lane into retired totals. So after N requests answered, mcpherd_requests_total
must have grown by exactly N, with workers killed, recycled and reloaded in between, and no scrape may
ever see a counter go down (or double-count a lane between a death and its fold).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable
from functools import partial

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Cluster, RawHttp, initialize, mcp_headers, modern_call, rpc_body, wait_until

Series = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


def monotonic_series(text: str) -> dict[Series, float]:
    """Every sample of the counter and histogram families of one scrape."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) if family.type in ("counter", "histogram")
            for sample in family.samples}


def requests_by_label(series: dict[Series, float]) -> Counter[tuple[str, str]]:
    """mcpherd_requests_total by (method, outcome)."""
    counts: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in series.items():
        if name == "mcpherd_requests_total":
            label = dict(labels)
            counts[label["method"], label["outcome"]] = int(value)
    return counts


def delta(after: dict[Series, float], before: dict[Series, float], name: str) -> float:
    def total(series: dict[Series, float]) -> float:
        return sum(value for (sample, _), value in series.items() if sample == name)

    return total(after) - total(before)


def one_round(url: str) -> Counter[tuple[str, str]]:
    """15 JSON-RPC messages of both eras, each era's requests on fresh connections (so, on any worker);
    returns what each should add to mcpherd_requests_total."""
    sent: Counter[tuple[str, str]] = Counter()
    for i in range(8):
        with RawHttp(url) as http:
            reply = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": str(i)}})
            assert reply.status == 200 and "result" in reply.json(), reply
            sent["tools/call", "ok"] += 1
    for name, method, outcome in (("nope", "tools/call", "error"), ("gone", "tools/call", "error")):
        with RawHttp(url) as http:
            assert modern_call(http, "tools/call", {"name": name, "arguments": {}}).status == 400
            sent[method, outcome] += 1
    with RawHttp(url) as http:
        assert modern_call(http, "bogus/method", {}).status == 404
        sent["other", "error"] += 1
    with RawHttp(url) as http:
        session = initialize(http)
        sent["initialize", "ok"] += 1
        sent["notifications", "ok"] += 1
    for i in range(2):
        with RawHttp(url) as http:
            reply = http.request("POST", mcp_headers(session), rpc_body("ping", None, i))
            assert reply.status == 200 and reply.json()["result"] == {}, reply
            sent["ping", "ok"] += 1
    return sent


def scrapes_while(cluster: Cluster, busy: Callable[[], bool]) -> list[dict[Series, float]]:
    """Scrape back to back while `busy()` holds (at least twice)."""
    seen = [monotonic_series(cluster.scrape())]
    while busy() or len(seen) < 2:
        seen.append(monotonic_series(cluster.scrape()))
    return seen


def scrapes_across_a_death(cluster: Cluster, victim: int) -> list[dict[Series, float]]:
    """SIGKILL a worker and scrape back to back until its replacement serves, then once more."""
    replaced = threading.Event()

    def wait_for_replacement() -> None:
        cluster.wait_serving(without={victim})
        replaced.set()

    waiter = threading.Thread(target=wait_for_replacement)
    os.kill(victim, signal.SIGKILL)
    waiter.start()
    scrapes = scrapes_while(cluster, lambda: not replaced.is_set())
    waiter.join()
    assert replaced.is_set(), "the killed worker was not replaced"
    return [*scrapes, monotonic_series(cluster.scrape())]


def worker_below_limit(cluster: Cluster, limit: int) -> int:
    """A serving worker with fewer requests than the recycling limit, so no successor is on its way."""
    def pick() -> int | None:
        below = [w for w in cluster.serving() if w["requests_total"] < limit]
        return int(min(below, key=lambda w: w["requests_total"])["pid"]) if below else None
    return int(wait_until(pick, 20.0, 0.05, f"a serving worker below {limit} requests"))


def assert_never_decreasing(scrapes: list[dict[Series, float]]) -> None:
    for earlier, later in itertools.pairwise(scrapes):
        went_down = {series: (value, later.get(series)) for series, value in earlier.items()
                     if later.get(series, -1.0) < value}
        assert went_down == {}, f"counters went down between two scrapes: {went_down}"


@pytest.mark.timeout(120)
def test_requests_total_grows_by_exactly_the_requests_answered_with_workers_killed_between(
        cluster: Cluster) -> None:
    baseline = monotonic_series(cluster.scrape())
    expected: Counter[tuple[str, str]] = Counter()
    for round_ in range(4):
        expected += one_round(cluster.url)
        before_kill = monotonic_series(cluster.scrape())
        assert requests_by_label(before_kill) - requests_by_label(baseline) == expected
        # Nothing is in flight: from the kill until its replacement serves, through the reaping and
        # the fold of the dead lane, every scrape shows exactly the same totals.
        during = scrapes_across_a_death(cluster, sorted(cluster.worker_pids())[round_])
        changed = [s for s in during if requests_by_label(s) != requests_by_label(before_kill)]
        assert changed == [], f"{len(changed)} of {len(during)} scrapes around a kill differ"
        assert all(delta(s, before_kill, "mcpherd_http_requests_total") == 0 for s in during)
    final = monotonic_series(cluster.scrape())
    sent = sum(expected.values())
    assert sent == 60 and delta(final, baseline, "mcpherd_requests_total") == sent
    assert requests_by_label(final) - requests_by_label(baseline) == expected
    assert delta(final, baseline, "mcpherd_http_requests_total") == sent  # one HTTP request per message
    assert delta(final, baseline, "mcpherd_errors_total") == 4 * 3
    assert delta(final, baseline, "mcpherd_worker_restarts_total") == 4
    http_total = int(delta(final, {}, "mcpherd_http_requests_total"))
    assert cluster.status()["totals"]["requests_total"] == http_total, "the status agrees with /metrics"


def echo_traffic(url: str, first: int, count: int, answered: list[int],
                 failures: list[Exception]) -> None:
    """`count` echo calls, one fresh connection each, one after the other; records what was answered."""
    try:
        for i in range(first, first + count):
            with RawHttp(url) as http:
                reply = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": str(i)}})
                assert reply.status == 200 and reply.json()["result"]["content"][0]["text"] == str(i), reply
            answered.append(i)
    except Exception as exc:  # noqa: BLE001 - reported by the test's thread
        failures.append(exc)


def scrape_during_traffic(cluster: Cluster, first: int, count: int, answered: list[int],
                          act: Callable[[], None] = lambda: None) -> list[dict[Series, float]]:
    """Send traffic from another thread, `act` once it started, and scrape until it is done."""
    failures: list[Exception] = []
    sender = threading.Thread(target=echo_traffic, args=(cluster.url, first, count, answered, failures))
    sender.start()
    act()
    scrapes = scrapes_while(cluster, sender.is_alive)
    sender.join()
    assert failures == [], f"a request failed after {len(answered)} answers: {failures!r}"
    return scrapes


@pytest.mark.timeout(180)
def test_counters_never_decrease_across_recycling_reload_and_death_and_stay_exact(
        clusters: Callable[..., Cluster]) -> None:
    cluster = clusters(4, "--max-requests", "20", "--max-requests-jitter", "0")
    generation = cluster.status()["master"]["generation"]
    answered: list[int] = []
    scrapes = [monotonic_series(cluster.scrape())]
    # Recycling (every 20 requests per worker) all along; a reload while requests are in flight.
    scrapes += scrape_during_traffic(cluster, 0, 160, answered)
    reload = partial(cluster.process.signal, signal.SIGHUP)
    scrapes += scrape_during_traffic(cluster, 160, 160, answered, reload)
    cluster.wait_serving(generation + 1)
    # A death with nothing in flight (a request it held would be lost, and this test counts answers), of a
    # worker that recycling is not replacing: one killed after its successor took over is no restart.
    scrapes += scrapes_across_a_death(cluster, worker_below_limit(cluster, 20))
    scrapes += scrape_during_traffic(cluster, 320, 160, answered)
    scrapes.append(monotonic_series(cluster.scrape()))
    assert_never_decreasing(scrapes)
    baseline, final = scrapes[0], scrapes[-1]
    assert answered == list(range(480))
    assert requests_by_label(final) - requests_by_label(baseline) == Counter({("tools/call", "ok"): 480})
    assert delta(final, baseline, "mcpherd_requests_total") == 480
    assert delta(final, baseline, "mcpherd_http_requests_total") == 480
    assert delta(final, baseline, "mcpherd_request_duration_seconds_count") == 480
    assert delta(final, baseline, "mcpherd_tool_duration_seconds_count") == 480
    log = cluster.process.output()
    assert len(re.findall(r"worker \d+ recycled after \d+ requests", log)) >= 8, log  # 480 requests, 4 slots
    assert delta(final, baseline, "mcpherd_reloads_total") == 1
    assert delta(final, baseline, "mcpherd_worker_restarts_total") == 1
