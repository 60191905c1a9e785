"""The L2 cache in a real redis-server, shared by two clusters: read-through, TTL, bounds, invalidation.

A cacheable tool's result is looked up in the worker's L1, then in Redis (L2), then computed; computed
results go to both with the tool's TTL. The demo's `weather` (ttl 30 s, tag "weather") returns a new
`computed_at` on each computation, so "served from a cache" and "computed again" are told apart exactly.
Host A has one worker, host B two; Redis keys are inspected directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mcpherd.worker.cache import cache_key

from conftest import (
    Cluster,
    RawHttp,
    RedisServer,
    Spawner,
    connect_to_workers,
    initialize,
    metric_value,
    modern_call,
    modern_headers,
    modern_meta,
    open_stream,
    rpc_body,
    start_cluster_at,
    stream_headers,
    tool_text,
    wait_redis_up,
    wait_until,
)

PREFIX = "mcpherd:"
TTL_MS = 30_000


@dataclass
class Shared:
    a: Cluster
    b: Cluster
    redis: RedisServer
    store: Any  # a redis.Redis client on the same server


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    spawner = Spawner(tmp_path_factory.mktemp("l2"))
    directories = [tempfile.mkdtemp(prefix="mcpherd-test-", dir="/tmp") for _ in "ab"]
    try:
        redis = RedisServer(spawner).start()
        a = start_cluster_at(spawner, directories[0], "127.0.0.1", 1, "--redis", redis.url)
        b = start_cluster_at(spawner, directories[1], "127.0.0.1", 2, "--redis", redis.url)
        for cluster in (a, b):
            wait_redis_up(cluster)
        with redis.client() as store:
            yield Shared(a, b, redis, store)
    finally:
        spawner.stop_all()
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


def weather_key(city: str) -> str:
    return cache_key("weather", json.dumps({"city": city}).encode())


def weather(http: RawHttp, city: str) -> float:
    reply = modern_call(http, "tools/call", {"name": "weather", "arguments": {"city": city}}, 3)
    assert reply.status == 200, reply
    return float(reply.json()["result"]["structuredContent"]["computed_at"])


def stored(shared: Shared, city: str) -> Any:
    data = shared.store.get(f"{PREFIX}cache:{weather_key(city)}")
    return None if data is None else msgspec.msgpack.decode(data)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.mark.timeout(90)
def test_a_result_computed_on_a_is_read_through_l2_by_every_worker_of_b(shared: Shared) -> None:
    city = unique("Quito")
    with RawHttp(shared.a.url) as on_a:
        computed = weather(on_a, city)
    entry = wait_until(lambda: stored(shared, city), 5.0, message="the result written to L2")
    assert entry["structuredContent"]["computed_at"] == computed
    # The tool's result as computed: what one protocol version adds on its way out (2026-07-28's
    # resultType and server _meta) is not part of it, since a 2025-11-25 session may read it next.
    assert sorted(entry) == ["content", "structuredContent"], entry
    held = connect_to_workers(shared.b.url, shared.b.worker_pids())
    try:
        # Neither worker of B has it in L1, so both read it from L2: the very value A computed.
        assert {pid: weather(http, city) for pid, http in held.items()} == {pid: computed for pid in held}
        shared.store.delete(f"{PREFIX}cache:{weather_key(city)}")
        # ... and now hold it in their L1: gone from Redis, still served, still not recomputed.
        assert {pid: weather(http, city) for pid, http in held.items()} == {pid: computed for pid in held}
    finally:
        for http in held.values():
            http.close()


@pytest.mark.timeout(90)
def test_l2_entries_carry_the_tool_ttl_and_tag_sets_expire_too(shared: Shared) -> None:
    city = unique("Lima")
    with RawHttp(shared.b.url) as on_b:
        weather(on_b, city)
    wait_until(lambda: stored(shared, city), 5.0, message="the result written to L2")
    entry_ttl = shared.store.pttl(f"{PREFIX}cache:{weather_key(city)}")
    assert 0 < entry_ttl <= TTL_MS, entry_ttl
    assert shared.store.sismember(f"{PREFIX}tag:weather", weather_key(city))
    # A tag set outliving every entry it names would grow without bound: it must expire with them.
    tag_ttl = shared.store.pttl(f"{PREFIX}tag:weather")
    assert 0 < tag_ttl <= TTL_MS, f"the tag set's PTTL is {tag_ttl} (-1: it never expires)"


@pytest.mark.timeout(90)
def test_an_l2_entry_mcpherd_did_not_write_is_a_miss(shared: Shared) -> None:
    """Redis is shared with whatever else can write to it: an entry under our key that is not a tool
    result (another value, broken msgpack, nesting past the recursion limit) is a miss with a warning,
    and the forecast is computed and stored over it, instead of failing the call."""
    for n, junk in enumerate((msgspec.msgpack.encode([1, 2]), b"\xc1", b"\x91" * 5000 + b"\x01")):
        city = unique(f"Junk{n}")
        shared.store.set(f"{PREFIX}cache:{weather_key(city)}", junk, px=TTL_MS)
        with RawHttp(shared.a.url) as on_a:
            computed = weather(on_a, city)
        key = f"{PREFIX}cache:{weather_key(city)}"
        wait_until(lambda key=key, junk=junk: shared.store.get(key) != junk, 5.0, 0.05, "the computed result stored")
        assert stored(shared, city)["structuredContent"]["computed_at"] == computed
    ignored = [line for line in shared.a.process.output().splitlines() if "ignored L2 cache entry" in line]
    assert len(ignored) == 3 and all(" WARNING " in line for line in ignored), ignored


@pytest.mark.timeout(60)
def test_a_stream_copy_mcpherd_did_not_write_ends_the_resumed_stream(shared: Shared) -> None:
    """A GET stream held on A is resumed through B from its copy in Redis; an entry in that copy that
    mcpherd did not write ends the resumed stream cleanly (the client reconnects), with a warning,
    instead of leaving it open and silent."""
    with RawHttp(shared.a.url) as on_a, RawHttp(shared.a.url) as stream_a, RawHttp(shared.b.url) as on_b:
        session = initialize(on_a)
        priming = next(open_stream(stream_a, "GET", stream_headers(session)))
        stream_id = str(priming.id).rsplit(".", 1)[0]
        digest = hashlib.sha256(session.encode()).hexdigest()[:24]
        shared.store.xadd(f"{PREFIX}stream:{digest}:{stream_id}", {"x": "1"})
        resumed = open_stream(on_b, "GET", stream_headers(session, str(priming.id)))
        assert [event.data for event in resumed if event.data] == []  # it ends, with nothing replayed
    wait_until(lambda: "an entry mcpherd did not write" in shared.b.process.output(), 5.0, 0.05, "the warning")


@pytest.mark.timeout(90)
def test_key_tag_and_prefix_invalidations_delete_the_shared_entries(shared: Shared) -> None:
    cities = {name: unique(name) for name in ("Paris", "Porto", "Oslo", "Rome")}
    with RawHttp(shared.a.url) as on_a, RawHttp(shared.b.url) as on_b:
        first = {name: weather(on_a, city) for name, city in cities.items()}
        for city in cities.values():
            wait_until(lambda city=city: stored(shared, city), 5.0, message=f"{city} written to L2")
        # key: the demo's refresh_weather(city) invalidates one call's key, on every host and in L2.
        reply = modern_call(on_a, "tools/call", {"name": "refresh_weather", "arguments": {"city": cities["Rome"]}})
        assert tool_text(reply.json()["result"]) == f"forecasts invalidated: {cities['Rome']}"
        assert [name for name, city in cities.items() if stored(shared, city) is None] == ["Rome"]
        # prefix, through B's admin socket: the two cities starting with "P" and nothing else.
        prefix = weather_key("P")[:-2]  # 'weather:{"city":"P'
        assert shared.b.admin("invalidate", prefix=prefix)["acknowledged"] is True
        assert sorted(name for name, city in cities.items() if stored(shared, city) is None) == \
            ["Paris", "Porto", "Rome"]
        # tag, through A's admin socket: everything tagged "weather", and the tag set itself.
        assert shared.a.admin("invalidate", tag="weather")["acknowledged"] is True
        assert [stored(shared, city) for city in cities.values()] == [None] * 4
        assert not shared.store.exists(f"{PREFIX}tag:weather")
        # Nothing was refilled from a stale L2 entry: A computes every forecast again.
        assert all(weather(on_a, city) != first[name] for name, city in cities.items())
        assert all(weather(on_b, city) != first[name] for name, city in cities.items())


BURST = 300
POOL = 32  # redis.max_connections, the default


@pytest.mark.timeout(90)
def test_a_burst_of_cache_misses_waits_for_pooled_connections_and_fails_none(shared: Shared) -> None:
    """300 `weather` calls for 300 new cities, pipelined on one connection: A's worker starts 300 L2 reads
    in one loop turn. They wait for the worker's 32 pooled connections: every call is answered with a
    computed forecast, every result reaches L2, no L2 operation fails (a failure sends the worker into its
    back-off, and is logged), and the worker never holds more than 32 connections to Redis."""
    cities = [unique(f"Burst{i}") for i in range(BURST)]
    [pid] = shared.a.worker_pids()
    before = len(shared.a.process.output())
    with RawHttp(shared.a.url) as http:
        http.send(b"".join(
            http.build("POST", modern_headers("tools/call", "weather"),
                       rpc_body("tools/call", {"name": "weather", "arguments": {"city": city}, "_meta": modern_meta()},
                                i))
            for i, city in enumerate(cities)))
        replies = [http.read_reply() for _ in cities]
    assert [r.status for r in replies] == [200] * BURST
    assert [r.json()["id"] for r in replies] == list(range(BURST))
    assert all(r.json()["result"]["structuredContent"]["city"] == city for r, city in zip(replies, cities))
    wait_until(lambda: all(stored(shared, city) is not None for city in cities), 10.0, 0.05,
               "every forecast to reach L2")
    workers = [c for c in shared.store.client_list() if c["name"].startswith("mcpherd-worker-")
               and c["name"].endswith(f"-{pid}")]
    assert 1 <= len(workers) <= POOL, [c["name"] for c in workers]
    assert "L2 cache unreachable" not in shared.a.process.output()[before:]


@pytest.mark.timeout(90)
def test_an_invalidation_whose_l2_delete_failed_on_the_worker_is_deleted_by_the_bridge(shared: Shared) -> None:
    """A's worker cannot reach Redis (its connections killed, no new one admitted), while A's bridge and
    B's workers keep theirs. Its `refresh_weather` still works: the master has the bridge delete the shared
    entry before it publishes, so B, told to drop its copy, computes the forecast again instead of reading
    the stale one back from L2 (it would serve that until the TTL). Nothing was lost, so A goes on relying
    on Redis: no warning, mcpherd_redis_up stays 1."""
    city = unique("Lima")
    before = len(shared.a.process.output())
    with RawHttp(shared.b.url) as on_b:
        first = weather(on_b, city)
        assert stored(shared, city)["structuredContent"]["computed_at"] == first
        # The bridge's own L2 connection exists before the door closes (an admin invalidation opens it).
        assert shared.a.admin("invalidate", key=unique("nothing"))["acknowledged"] is True
        [pid] = shared.a.worker_pids()
        admitted = shared.store.config_get("maxclients")["maxclients"]
        try:
            for client in shared.store.client_list():
                if client["name"].startswith("mcpherd-worker-") and client["name"].endswith(f"-{pid}"):
                    shared.store.client_kill_filter(_id=client["id"])
            shared.store.config_set("maxclients", len(shared.store.client_list()))
            with RawHttp(shared.a.url) as on_a:
                reply = modern_call(on_a, "tools/call", {"name": "refresh_weather", "arguments": {"city": city}})
                assert tool_text(reply.json()["result"]) == f"forecasts invalidated: {city}"
            assert stored(shared, city) is None
            wait_until(lambda: weather(on_b, city) != first, 10.0, 0.05, "B to compute the forecast again")
        finally:
            shared.store.config_set("maxclients", admitted)
    since = shared.a.process.output()[before:]
    assert "L2 cache unreachable from this worker" in since  # the worker's own delete did fail
    assert metric_value(shared.a.scrape(), "mcpherd_redis_up") == 1.0
    assert [line for line in since.splitlines() if " WARNING " in line or " ERROR " in line] == []


EAGER_APP = '''
from mcpherd import App

app = App("l2-test-app", version="1")


@app.tool(cache_ttl=30)
async def rate(pair: str) -> str:
    """Cacheable and async, answered without awaiting: cached within the request's own callback."""
    return f"rate of {pair}"
'''


@pytest.mark.timeout(90)
def test_l2_holds_the_tool_result_as_computed_not_what_a_protocol_version_added(
        spawn: Any, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2026-07-28 answer carries resultType and the server's _meta; the entry other hosts (and their
    2025-11-25 sessions) read from L2 carries only what the tool returned."""
    (tmp_path / "l2_app.py").write_text(EAGER_APP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    directory = tempfile.mkdtemp(prefix="mcpherd-test-", dir="/tmp")
    try:
        cluster = start_cluster_at(spawn, directory, "127.0.0.1", 1, "--app", "l2_app:app",
                                   "--redis", redis_server.url)
        wait_redis_up(cluster)
        with RawHttp(cluster.url) as http, redis_server.client() as store:
            result = modern_call(http, "tools/call", {"name": "rate", "arguments": {"pair": "EURUSD"}}).json()["result"]
            assert (result["resultType"], tool_text(result)) == ("complete", "rate of EURUSD")
            key = f"{PREFIX}cache:{cache_key('rate', json.dumps({'pair': 'EURUSD'}).encode())}"
            entry = wait_until(lambda: store.get(key), 5.0, 0.05, "the result written to L2")
            assert msgspec.msgpack.decode(entry) == {"content": [{"type": "text", "text": "rate of EURUSD"}]}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(90)
def test_a_result_larger_than_max_entry_bytes_stays_in_l1(spawn: Any, redis_server: RedisServer,
                                                          tmp_path: Path) -> None:
    config = tmp_path / "mcpherd.toml"
    config.write_text("[redis]\nmax_entry_bytes = 64\n")  # a weather result is ~250 bytes
    directory = tempfile.mkdtemp(prefix="mcpherd-test-", dir="/tmp")
    try:
        cluster = start_cluster_at(spawn, directory, "127.0.0.1", 1, "--config", str(config),
                                   "--redis", redis_server.url)
        wait_redis_up(cluster)
        with RawHttp(cluster.url) as http, redis_server.client() as store:
            small = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "fits"}})
            assert small.status == 200
            computed = weather(http, "Bergen")
            assert weather(http, "Bergen") == computed  # served from L1
            assert store.keys(f"{PREFIX}cache:*") == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)
