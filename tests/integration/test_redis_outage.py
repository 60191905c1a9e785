"""Redis fails under load and returns: no tool call fails, metrics and logs show it, hosts resynchronise.

Two clusters (A and B, two workers each) share one real redis-server. Clients call tools on both
without pause (echo, cached forecasts, per-city invalidations) while Redis is killed (SIGKILL, a crash)
or frozen (SIGSTOP: connections stay open and nothing answers, like a partition), then brought back.

Resynchronisation, exactly: before the outage every worker of B caches a forecast; during the outage A
invalidates it. That event cannot reach B (pub/sub keeps nothing), so B still serves the old forecast
until Redis returns; then B must drop its caches and compute it again, well before its 30 s TTL.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import pytest

from mcpherd.shared import events

from conftest import (
    Cluster,
    Process,
    RawHttp,
    RedisServer,
    connect_to_workers,
    free_port,
    host_id,
    metric_value,
    modern_call,
    start_cluster_at,
    tool_text,
    wait_redis_up,
    wait_until,
)

TTL_S = 30.0
CALL_BUDGET_S = 3.0  # a call may pay Redis timeouts (0.25 s each, an invalidation 2 s), never hang


@dataclass
class Load:
    """Client threads calling tools on every host until stopped; every call that failed, and when each ended."""

    urls: list[str]
    failures: list[str] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    slowest_s: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, per_host: int = 2) -> Load:
        for n, url in enumerate(self.urls * per_host):
            self.threads.append(threading.Thread(target=self._run, args=(url, n), daemon=True))
            self.threads[-1].start()
        return self

    def _run(self, url: str, n: int) -> None:
        cities = [f"load-{n}-{i}" for i in range(8)]
        http: RawHttp | None = None
        for i in range(1_000_000):
            if self.stop.is_set():
                break
            name, arguments = [("echo", {"text": f"{n}-{i}"}), ("weather", {"city": cities[i % 8]}),
                               ("refresh_weather", {"city": cities[i % 5]})][i % 3]
            started = time.monotonic()
            try:
                http = http or RawHttp(url)
                reply = modern_call(http, "tools/call", {"name": name, "arguments": arguments}, i + 1)
                result = reply.json().get("result") if reply.status == 200 else None
                if result is None or result.get("isError") or (name == "echo" and tool_text(result) != f"{n}-{i}"):
                    self.failures.append(f"{name} on {url}: {reply.status} {reply.body[:200]!r}")
            except Exception as exc:  # a reset, a timeout: exactly what must not happen
                self.failures.append(f"{name} on {url}: {type(exc).__name__}: {exc}")
                http = None
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            self.finished.append(time.monotonic())

    def calls_between(self, start: float, end: float) -> int:
        return sum(1 for t in list(self.finished) if start <= t <= end)

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


@dataclass
class Pair:
    a: Cluster
    b: Cluster
    redis: RedisServer


@pytest.fixture
def pair(spawn: Callable[..., Process], redis_server: RedisServer) -> Iterator[Pair]:
    directories = [tempfile.mkdtemp(prefix="mcpherd-test-", dir="/tmp") for _ in "ab"]
    try:
        a, b = (start_cluster_at(spawn, d, "127.0.0.1", 2, "--redis", redis_server.url) for d in directories)
        for cluster in (a, b):
            wait_redis_up(cluster)
        yield Pair(a, b, redis_server)
    finally:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


def forecast(http: RawHttp, city: str) -> float:
    reply = modern_call(http, "tools/call", {"name": "weather", "arguments": {"city": city}}, 5)
    assert reply.status == 200, reply
    return float(reply.json()["result"]["structuredContent"]["computed_at"])


def redis_warnings(cluster: Cluster) -> list[str]:
    return [line for line in cluster.process.output().splitlines() if " WARNING " in line and "redis" in line.lower()]


def outage(pair: Pair, break_redis: Callable[[], None], restore_redis: Callable[[], None]) -> None:
    """The whole scenario; `break_redis` and `restore_redis` decide what kind of outage it is."""
    city = f"Oslo-{uuid.uuid4().hex[:8]}"
    held = connect_to_workers(pair.b.url, pair.b.worker_pids())
    cached = {pid: forecast(http, city) for pid, http in held.items()}
    warmed = time.monotonic()
    load = Load([pair.a.url, pair.b.url]).start()
    try:
        wait_until(lambda: len(load.finished) >= 50, 30.0, message="the load to run")
        broken = time.monotonic()
        break_redis()
        for cluster in (pair.a, pair.b):
            wait_redis_up(cluster, up=False)  # /metrics shows the outage on every host
        with RawHttp(pair.a.url) as on_a:
            reply = modern_call(on_a, "tools/call", {"name": "refresh_weather", "arguments": {"city": city}})
            assert tool_text(reply.json()["result"]) == f"forecasts invalidated: {city}"
        # Lost on the way to B: B serves what it cached (the resynchronisation below is what fixes it).
        assert {pid: forecast(http, city) for pid, http in held.items()} == cached
        wait_until(lambda: load.calls_between(broken, time.monotonic()) >= 30, 30.0, message="calls during the outage")
        restored = time.monotonic()
        restore_redis()
        for cluster in (pair.a, pair.b):
            wait_redis_up(cluster)
        for pid, http in held.items():
            wait_until(lambda http=http, pid=pid: forecast(http, city) != cached[pid], 10.0, 0.05,
                       f"worker {pid} of B to resynchronise")
        assert time.monotonic() - warmed < TTL_S, "too slow to tell a resynchronisation from the TTL"
        wait_until(lambda: load.calls_between(restored, time.monotonic()) >= 30, 30.0, message="calls after it")
    finally:
        load.end()
        for http in held.values():
            http.close()
    assert load.failures == [], f"{len(load.failures)} of {len(load.finished)} tool calls failed"
    assert load.slowest_s < CALL_BUDGET_S, f"the slowest call took {load.slowest_s:.2f}s"
    for cluster in (pair.a, pair.b):
        assert len(redis_warnings(cluster)) == 1, "one clear warning per outage:\n" + "\n".join(redis_warnings(cluster))
        assert metric_value(cluster.scrape(), "mcpherd_redis_up") == 1.0


@pytest.mark.timeout(180)
def test_redis_killed_under_load_and_restarted(pair: Pair) -> None:
    redis = pair.redis
    outage(pair, redis.kill, redis.start)  # same port: the hosts reconnect to the URL they were given


@pytest.mark.timeout(180)
def test_redis_frozen_under_load_and_thawed(pair: Pair) -> None:
    redis = pair.redis
    try:
        outage(pair, redis.pause, lambda: redis.pause(False))
    finally:
        redis.pause(False)  # never leave a stopped process behind


def undecodable(cluster: Cluster) -> list[str]:
    return [line for line in cluster.process.output().splitlines() if "cannot decode" in line]


@pytest.mark.timeout(60)
def test_messages_a_host_cannot_decode_are_ignored_and_the_hosts_go_on(pair: Pair) -> None:
    """What arrives from Redis that a host cannot apply is dropped by its bridge, with one warning per
    reason: an event kind from a newer mcpherd (a rolling upgrade), bytes that are no event, a message
    that is not even [host, payload], a host-local event, an event too large for a ring entry. It used to reach the master, whose decoder
    raised and took it down. The masters serve on, and the next event still crosses. An answer forwarded
    to a worker of A that is no answer is ignored by that worker, with a warning."""
    city = f"Oslo-{uuid.uuid4().hex[:8]}"
    held = connect_to_workers(pair.b.url, pair.b.worker_pids())
    cached = {pid: forecast(http, city) for pid, http in held.items()}
    future = msgspec.msgpack.encode({"type": "FutureEvent", "detail": 1})
    with pair.redis.client() as store:
        oversize = msgspec.msgpack.encode(events.Invalidate(key="k" * events.MAX_PAYLOAD))  # past events.encode
        for payload in (future, future, future, b"\xc1 no event", events.encode(events.RedisTrust(False)), oversize):
            store.publish("mcpherd:events", msgspec.msgpack.encode(["ffffffff", payload]))
        store.publish("mcpherd:events", b"\xc1 not even a pair")
        store.publish(f"mcpherd:host:{host_id(pair.a)}", msgspec.msgpack.encode([f"{host_id(pair.a)}w0a", b"\xc1"]))
    with RawHttp(pair.a.url) as on_a:
        reply = modern_call(on_a, "tools/call", {"name": "refresh_weather", "arguments": {"city": city}})
        assert tool_text(reply.json()["result"]) == f"forecasts invalidated: {city}"
    for pid, http in held.items():
        wait_until(lambda http=http, pid=pid: forecast(http, city) != cached[pid], 10.0, 0.05,
                   f"worker {pid} of B to drop the forecast A invalidated")
        http.close()
    for cluster in (pair.a, pair.b):
        assert cluster.status()["master"]["pid"] == cluster.process.pid
        assert metric_value(cluster.scrape(), "mcpherd_redis_up") == 1.0
        wait_until(lambda c=cluster: len(undecodable(c)) >= 5, 10.0, 0.05, "the warnings")
        ignored = undecodable(cluster)
        assert len(ignored) == 5 and all(" WARNING " in line for line in ignored), ignored
        assert sum("FutureEvent" in line for line in ignored) == 1 and sum("RedisTrust" in line for line in ignored) == 1
    wait_until(lambda: "ignored an answer forwarded to this worker" in pair.a.process.output(), 10.0, 0.05,
               "the worker's warning")
    with RawHttp(pair.a.url) as on_a:
        assert [tool_text(modern_call(on_a, "tools/call", {"name": "echo", "arguments": {"text": str(n)}}, n)
                          .json()["result"]) for n in range(4)] == ["0", "1", "2", "3"]


QUEUED_FOR_THE_BRIDGE = 10_000  # what a master holds for a bridge that does not read (control.Sender's limit)


@pytest.mark.timeout(180)
def test_a_bridge_that_stops_reading_is_killed_and_its_return_resynchronises_the_hosts(pair: Pair) -> None:
    """A's bridge is stopped (SIGSTOP: hung) while A raises more events than its master holds for it:
    the channel's few hundred, then the master's queue. Events for B are being lost, so A's master kills
    the bridge (one ERROR line), starts another, and counts it as an outage: when the new bridge is up,
    every host drops its caches. B then recomputes the forecast A invalidated while the bridge hung (that
    event was lost with the queue). Every call on A meanwhile succeeds."""
    city = f"Oslo-{uuid.uuid4().hex[:8]}"
    held = connect_to_workers(pair.b.url, pair.b.worker_pids())
    cached = {pid: forecast(http, city) for pid, http in held.items()}
    hung = int(re.findall(r"redis bridge (\d+) started", pair.a.process.output())[-1])
    failures: list[str] = []

    def raise_events(n: int, count: int) -> None:
        with RawHttp(pair.a.url) as http:
            for i in range(count):
                tool = ("test_trigger_tool_change", "test_trigger_prompt_change")[i % 2]
                reply = modern_call(http, "tools/call", {"name": tool, "arguments": {}}, i + 1)
                if reply.status != 200:
                    failures.append(f"{tool}: {reply.status} {reply.body[:200]!r}")
    os.kill(hung, signal.SIGSTOP)
    try:
        with RawHttp(pair.a.url) as on_a:
            reply = modern_call(on_a, "tools/call", {"name": "refresh_weather", "arguments": {"city": city}})
            assert tool_text(reply.json()["result"]) == f"forecasts invalidated: {city}"
        threads = [threading.Thread(target=raise_events, args=(n, QUEUED_FOR_THE_BRIDGE // 8 + 100)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []
        wait_until(lambda: f"redis bridge {hung} exited" in pair.a.process.output(), 10.0, 0.05,
                   "the hung bridge to be killed")
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_redis_up(pair.a)
    for pid, http in held.items():
        wait_until(lambda http=http, pid=pid: forecast(http, city) != cached[pid], 10.0, 0.05,
                   f"worker {pid} of B to resynchronise")
        http.close()
    killed = [line for line in pair.a.process.output().splitlines() if "is not reading its channel" in line]
    assert len(killed) == 1 and f"redis bridge {hung} " in killed[0] and " ERROR " in killed[0] \
        and "(Outbound could not be queued)" in killed[0], killed


@pytest.mark.timeout(120)
def test_a_host_started_without_redis_serves_and_joins_when_redis_starts(
        clusters: Callable[..., Cluster], spawn: Callable[..., Process]) -> None:
    redis = RedisServer(spawn, port=free_port())  # its URL, before anything listens there
    alone = clusters(1, "--redis", redis.url)
    wait_redis_up(alone, up=False)
    with RawHttp(alone.url) as http:
        assert tool_text(modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "no redis"}})
                         .json()["result"]) == "no redis"
        computed = forecast(http, "Riga")
        assert forecast(http, "Riga") == computed  # L1 works without Redis
        redis.start()
        wait_redis_up(alone)
        # It missed whatever was invalidated before it subscribed: what it cached meanwhile is dropped.
        wait_until(lambda: forecast(http, "Riga") != computed, 10.0, 0.05, "the resynchronisation")
        computed = forecast(http, "Riga")
        other = clusters(1, "--redis", redis.url)
        wait_redis_up(other)
        with RawHttp(other.url) as on_other:
            modern_call(on_other, "tools/call", {"name": "refresh_weather", "arguments": {"city": "Riga"}})
        wait_until(lambda: forecast(http, "Riga") != computed, 10.0, 0.05, "the invalidation from the other host")
    warned = redis_warnings(alone)
    # One warning for the outage, and one that sessions stay host-local (no shared secret) until a restart.
    assert [("unreachable" in w, "secret" in w) for w in warned] == [(False, True), (True, False)], warned


# A Lua script holds Redis (single-threaded) for ARGV[1] microseconds: every other client waits, though
# every connection stays open and everything is answered in the end. Back to back, they make Redis slow.
BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) - start > tonumber(ARGV[1])
return 1
"""


@pytest.mark.timeout(120)
def test_a_slow_redis_is_not_relied_on_and_its_return_resynchronises_the_cache(
        clusters: Callable[..., Cluster], redis_server: RedisServer) -> None:
    """Slow but alive: nothing fails or closes, yet anything published or deleted with a timeout may be
    lost. The host stops relying on Redis (one warning), keeps serving, and resynchronises once PINGs
    are answered in time again."""
    cluster = clusters(1, "--redis", redis_server.url)
    wait_redis_up(cluster)
    busy = redis_server.client()
    stop = threading.Event()

    def hold_redis() -> None:
        while not stop.is_set():
            busy.eval(BUSY_SCRIPT, 0, 800_000)  # short of the subscription's 3 s of silence, twice over

    holder = threading.Thread(target=hold_redis, daemon=True)
    with RawHttp(cluster.url) as http:
        computed = forecast(http, "Lima")
        assert forecast(http, "Lima") == computed
        holder.start()
        try:
            wait_redis_up(cluster, up=False, timeout=30.0)
            assert metric_value(cluster.scrape(), "mcpherd_redis_ping_seconds") > 0.25
            started = time.monotonic()
            reply = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "still serving"}})
            assert tool_text(reply.json()["result"]) == "still serving"
            assert time.monotonic() - started < CALL_BUDGET_S
        finally:
            stop.set()
            holder.join(10)
        wait_redis_up(cluster, timeout=30.0)
        # What was cached while Redis could not be relied on is dropped: recomputed, not served stale.
        wait_until(lambda: forecast(http, "Lima") != computed, 10.0, 0.05, "the resynchronisation")
    warned = redis_warnings(cluster)
    assert len(warned) == 1 and "PINGs took longer than 250 ms" in warned[0], warned
    assert metric_value(cluster.scrape(), "mcpherd_redis_ping_seconds") < 0.25


@pytest.mark.timeout(120)
def test_an_invalidation_lost_to_redis_stops_l2_reads_until_the_resynchronisation(
        clusters: Callable[..., Cluster], redis_server: RedisServer) -> None:
    """CLIENT PAUSE WRITE: Redis answers reads and PINGs at once but holds writes (a publish, a delete)
    past their timeout. The invalidation's L2 delete fails, on the worker and then on the bridge it hands
    it to: the stale entry may still be in L2, so no worker of this host reads L2 until the
    resynchronisation has emptied it."""
    cluster = clusters(2, "--redis", redis_server.url)
    wait_redis_up(cluster)
    first, second = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, {first, second})
    probe = redis_server.client()

    def l2_reads() -> int:
        return int(probe.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

    try:
        forecast(held[second], "Cusco")  # the second worker reads L2 (a miss) and fills it
        assert l2_reads() >= 1
        probe.execute_command("CLIENT", "PAUSE", "2500", "WRITE")
        reply = modern_call(held[first], "tools/call", {"name": "refresh_weather", "arguments": {"city": "Cusco"}})
        assert tool_text(reply.json()["result"]) == "forecasts invalidated: Cusco"
        wait_redis_up(cluster, up=False, timeout=10.0)
        before = l2_reads()
        forecast(held[second], "Puno")  # not in its L1: only the suspension keeps it from reading L2
        assert l2_reads() == before
        wait_redis_up(cluster, timeout=20.0)
        fresh = (f"Tacna-{n}" for n in range(1000))

        def reads_l2_again() -> bool:  # a new city each time: a miss in its L1 (its own back-off may linger)
            forecast(held[second], next(fresh))
            return l2_reads() > before
        wait_until(reads_l2_again, 20.0, 0.2, "the second worker to read L2 again after the resynchronisation")
    finally:
        for http in held.values():
            http.close()
    warned = redis_warnings(cluster)
    assert len(warned) == 1 and "deleting invalidated entries from the L2 cache failed" in warned[0], warned
