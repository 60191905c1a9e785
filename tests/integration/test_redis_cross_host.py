"""Two mcpherd clusters ("hosts") sharing one real redis-server: what one host does, the other sees.

Every case runs on two topologies (a module-scoped pair of hosts each):
  one-address  both clusters and Redis on 127.0.0.1, on different ports;
  namespaces   each cluster, Redis and this test's client in a network namespace of its own, joined by
               veth pairs on one bridge (10.213.0.0/24 exists only on those veths, in namespaces made
               here); where the machine forbids namespaces, the same checks run on the loopback
               addresses 127.0.0.2 (A), 127.0.0.3 (B) and 127.0.0.4 (Redis), and a warning says so.
A and B listen on different addresses or ports, so every step of a case is placed on a chosen host:
events raised on A applied on every worker of B, a session made on A used on B (its sampling answers
POSTed to the other host, its notifications, its end), streams held on A resumed through B, and (with
namespaces only) a partition between A and Redis that B must recover from when it heals.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import (
    WATCHED,
    Cluster,
    Event,
    RawHttp,
    RedisServer,
    Spawner,
    connect_to_workers,
    host_id,
    initialize,
    mcp_headers,
    metric_value,
    modern_call,
    next_message,
    open_stream,
    rpc_body,
    session_call,
    start_cluster_at,
    stream_headers,
    tool_text,
    wait_redis_up,
    wait_until,
)

SAMPLING: dict[str, Any] = {"sampling": {}}
CLONE_NEWNET = 0x40000000
ROLES = {"a": 1, "b": 2, "r": 3, "c": 4}  # host A, host B, Redis, this test's client: 10.213.0.<n>
LOOPBACK_FALLBACK = {"a": "127.0.0.2", "b": "127.0.0.3", "r": "127.0.0.4"}


# -- network namespaces --------------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=15)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


class Namespaces:
    """Namespaces for A, B, Redis and the client, each with one veth whose peer is a port of a bridge in a
    fifth namespace (the switch). The test thread itself enters the client namespace, so its sockets (and
    processes it starts, until `ip netns exec` moves them) reach the hosts over veth only."""

    def __init__(self) -> None:
        self.prefix = f"mh{os.getpid() % 100000}"
        self.made: list[str] = []
        self.home: int | None = None

    def name(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def address(self, role: str) -> str:
        return f"10.213.0.{ROLES[role]}"

    def wrap(self, role: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name(role))

    def create(self) -> None:
        switch = self._add("sw")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for role in ROLES:
            namespace, device = self._add(role), self.name(role)
            _ip("link", "add", device, "netns", namespace, "type", "veth", "peer", "name", f"{device}p", "netns", switch)
            _ip("-n", switch, "link", "set", f"{device}p", "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{self.address(role)}/24", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/var/run/netns/{self.name('c')}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    def _add(self, role: str) -> str:
        _ip("netns", "add", self.name(role))
        self.made.append(self.name(role))
        return self.name(role)

    def destroy(self) -> None:
        if self.home is not None:
            _setns(self.home)
            os.close(self.home)
            self.home = None
        while self.made:
            subprocess.run(["ip", "netns", "del", self.made.pop()], check=False, capture_output=True, timeout=15)


# -- the two hosts ---------------------------------------------------------------------------------------
@dataclass
class Hosts:
    a: Cluster
    b: Cluster
    redis: RedisServer
    topology: str
    namespaces: Namespaces | None  # None: no namespaces (one address, or the loopback fallback)


@pytest.fixture(scope="module", params=["one-address", "namespaces"])
def hosts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    spawner = Spawner(tmp_path_factory.mktemp(request.param))
    directories = [tempfile.mkdtemp(prefix="mcpherd-test-", dir="/tmp") for _ in "ab"]
    namespaces = Namespaces() if request.param == "namespaces" else None
    try:
        addresses, wraps = _topology(namespaces)
        redis = RedisServer(spawner, addresses["r"], wrap=wraps.get("r", ())).start()
        a = start_cluster_at(spawner, directories[0], addresses["a"], 2, "--redis", redis.url, wrap=wraps.get("a", ()))
        b = start_cluster_at(spawner, directories[1], addresses["b"], 4, "--redis", redis.url, wrap=wraps.get("b", ()))
        for cluster in (a, b):
            wait_redis_up(cluster)  # subscribed: events published from now on reach it
        described = f"{request.param}: A {addresses['a']}, B {addresses['b']}, Redis {addresses['r']}"
        yield Hosts(a, b, redis, described, namespaces if namespaces and namespaces.made else None)
    finally:
        spawner.stop_all()
        if namespaces is not None:
            namespaces.destroy()
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


def _topology(namespaces: Namespaces | None) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    if namespaces is None:
        return {"a": "127.0.0.1", "b": "127.0.0.1", "r": "127.0.0.1"}, {}
    try:
        namespaces.create()
    except (subprocess.SubprocessError, OSError) as exc:
        namespaces.destroy()
        detail = exc.stderr.decode().strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        warnings.warn(f"network namespaces are not permitted here ({detail}): the two-host checks run on loopback "
                      f"addresses instead, A {LOOPBACK_FALLBACK['a']}, B {LOOPBACK_FALLBACK['b']}, "
                      f"Redis {LOOPBACK_FALLBACK['r']}", stacklevel=1)
        return dict(LOOPBACK_FALLBACK), {}
    return {role: namespaces.address(role) for role in "abr"}, {role: namespaces.wrap(role) for role in "abr"}


def weather_at(http: RawHttp, city: str) -> float:
    reply = modern_call(http, "tools/call", {"name": "weather", "arguments": {"city": city}}, 2)
    assert reply.status == 200, reply
    return float(reply.json()["result"]["structuredContent"]["computed_at"])


# -- the cases -------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_an_invalidation_raised_on_a_is_applied_by_every_worker_of_b(hosts: Hosts) -> None:
    city = f"Lyon-{uuid.uuid4().hex[:8]}"
    held = connect_to_workers(hosts.b.url, hosts.b.worker_pids())
    try:
        cached = {pid: weather_at(http, city) for pid, http in held.items()}
        # Each worker of B now serves its forecast from its own L1 (the TTL is 30 s, far past this test).
        assert {pid: weather_at(http, city) for pid, http in held.items()} == cached
        with RawHttp(hosts.a.url) as http:
            reply = modern_call(http, "tools/call", {"name": "refresh_weather", "arguments": {"city": city}})
            assert tool_text(reply.json()["result"]) == f"forecasts invalidated: {city}", reply
        for pid, http in held.items():
            wait_until(lambda http=http, pid=pid: weather_at(http, city) != cached[pid], 10.0, 0.01,
                       f"worker {pid} of B ({hosts.topology}) to drop the forecast invalidated on A")
    finally:
        for http in held.values():
            http.close()


@pytest.mark.timeout(120)
def test_a_session_initialized_on_a_serves_calls_and_sampling_answers_on_b(hosts: Hosts) -> None:
    on_a, on_b = RawHttp(hosts.a.url), RawHttp(hosts.b.url)
    ids = {"a": host_id(hosts.a), "b": host_id(hosts.b)}
    assert ids["a"] != ids["b"]
    session = initialize(on_a, capabilities=SAMPLING)
    assert tool_text(session_call(on_b, session, "tools/call", {"name": "echo", "arguments": {"text": "via B"}})) \
        == "via B"
    answer = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m", "stopReason": "endTurn"}
    for asker, answerer, name in ((on_b, on_a, "b"), (on_a, on_b, "a")):
        events = open_stream(asker, "POST", mcp_headers(session),
                             rpc_body("tools/call", {"name": "test_sampling", "arguments": {"prompt": "Capital?"}}, 7))
        _, request = next_message(events)
        assert request["method"] == "sampling/createMessage", request
        assert str(request["id"]).startswith(f"{ids[name]}w"), (request, ids)  # owned by the asking host
        reply = answerer.request("POST", mcp_headers(session), answer_body(request["id"], answer))
        assert reply.status == 202, reply
        _, result = next_message(events)
        assert result["id"] == 7 and tool_text(result["result"]) == "LLM response: Paris", (name, result)
        assert list(events) == [], "the call's stream ends after its result"
    on_a.close()
    on_b.close()


@pytest.mark.timeout(60)
def test_an_answer_larger_than_a_control_datagram_crosses_hosts(hosts: Hosts) -> None:
    """300 KB of sampling answer posted to B for a request A asked: B's worker, B's master, B's bridge,
    Redis, A's bridge, A's master, A's worker, each channel hop in pieces."""
    on_a, on_b = RawHttp(hosts.a.url), RawHttp(hosts.b.url)
    session = initialize(on_a, capabilities=SAMPLING)
    events = open_stream(on_a, "POST", mcp_headers(session),
                         rpc_body("tools/call", {"name": "test_sampling", "arguments": {"prompt": "Describe it"}}, 7))
    _, request = next_message(events)
    text = "".join(chr(0x61 + i % 26) for i in range(300_000))
    answer = {"role": "assistant", "content": {"type": "text", "text": text}, "model": "m", "stopReason": "endTurn"}
    assert on_b.request("POST", mcp_headers(session), answer_body(request["id"], answer)).status == 202
    _, result = next_message(events)
    assert result["id"] == 7 and tool_text(result["result"]) == f"LLM response: {text}"
    on_a.close()
    on_b.close()


def answer_body(request_id: Any, result: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}).encode()


@pytest.mark.timeout(120)
def test_a_request_state_issued_on_a_is_accepted_on_b(hosts: Hosts) -> None:
    tool = {"name": "test_input_required_result_sampling", "arguments": {}}
    with RawHttp(hosts.a.url) as on_a, RawHttp(hosts.b.url) as on_b:
        first = modern_call(on_a, "tools/call", tool, 1, SAMPLING).json()["result"]
        assert first["resultType"] == "input_required", first
        answer = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m"}
        retry = {**tool, "inputResponses": {"capital_question": answer}, "requestState": first["requestState"]}
        done = modern_call(on_b, "tools/call", retry, 2, SAMPLING).json()
        assert done["result"]["resultType"] == "complete", done
        assert tool_text(done["result"]) == "The model said: Paris"


@pytest.mark.timeout(120)
def test_a_resource_update_raised_on_a_reaches_the_get_stream_held_on_b(hosts: Hosts) -> None:
    on_a, stream_b = RawHttp(hosts.a.url), RawHttp(hosts.b.url)
    session = initialize(on_a)
    assert session_call(on_a, session, "resources/subscribe", {"uri": WATCHED}) == {}
    events = open_stream(stream_b, "GET", stream_headers(session))
    priming = next(events)
    assert priming.id is not None and priming.data == "", priming
    for uri in ("test://nobody-subscribed", WATCHED):
        result = session_call(on_a, session, "tools/call", {"name": "test_trigger_resource_update",
                                                           "arguments": {"uri": uri}})
        assert tool_text(result) == f"notifications/resources/updated sent for {uri}"
    # The unsubscribed URI was raised first: had B delivered it, it would come first.
    assert next_message(events)[1] == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                       "params": {"uri": WATCHED}}
    on_a.close()
    stream_b.close()


@pytest.mark.timeout(120)
def test_a_session_deleted_on_a_is_ended_on_b(hosts: Hosts) -> None:
    on_a, on_b, stream_b = RawHttp(hosts.a.url), RawHttp(hosts.b.url), RawHttp(hosts.b.url)
    session = initialize(on_a)
    events = open_stream(stream_b, "GET", stream_headers(session))
    next(events)  # priming
    assert on_a.request("DELETE", mcp_headers(session)).status == 200
    assert list(events) == [], "B ends the session's GET stream"

    def refused_on_b() -> bool:
        reply = on_b.request("POST", mcp_headers(session), rpc_body("tools/call", {"name": "echo",
                                                                                  "arguments": {"text": "x"}}))
        return reply.status == 404
    wait_until(refused_on_b, 10.0, 0.05, "B to refuse the ended session with 404")
    for http in (on_a, on_b, stream_b):
        http.close()


@pytest.mark.timeout(60)
def test_call_streams_held_on_a_resume_through_b(hosts: Hosts) -> None:
    """Eight calls at once, so their events are mirrored to Redis concurrently: each must replay in order."""
    with RawHttp(hosts.a.url) as on_a:
        session = initialize(on_a)
    calls = []
    for n in range(8):
        on_a = RawHttp(hosts.a.url)
        events = open_stream(on_a, "POST", mcp_headers(session),
                             rpc_body("tools/call", {"name": "test_tool_with_logging", "arguments": {}}, n))
        first_id, first = next_message(events)
        assert first["params"]["data"] == "Tool execution started", first
        on_a.close()  # the client goes away: not a cancellation, the call runs on and A keeps its stream
        calls.append((n, str(first_id)))
    for n, first_id in calls:
        with RawHttp(hosts.b.url) as on_b:
            resumed = open_stream(on_b, "GET", stream_headers(session, first_id))
            replayed = [next_message(resumed) for _ in range(3)]
            assert [m.get("params", {}).get("data") for _, m in replayed[:2]] == ["Tool processing data",
                                                                                 "Tool execution completed"]
            assert replayed[2][1] == {"jsonrpc": "2.0", "id": n, "result": replayed[2][1]["result"]}
            assert tool_text(replayed[2][1]["result"]) == "Tool with logging executed successfully"
            stream_id, _, first_seq = first_id.rpartition(".")
            assert [event_id for event_id, _ in replayed] == [f"{stream_id}.{int(first_seq) + k}" for k in (1, 2, 3)]
            assert list(resumed) == [], "nothing is sent twice, and the finished stream ends"


QUIET_S = 1.0  # four times redis.socket_timeout: a follower must wait in XREAD BLOCK longer than that


@pytest.mark.timeout(60)
def test_a_get_stream_dropped_on_a_resumes_through_b_and_follows_it(hosts: Hosts) -> None:
    on_a, stream_a, stream_b = RawHttp(hosts.a.url), RawHttp(hosts.a.url), RawHttp(hosts.b.url)
    session = initialize(on_a)
    assert session_call(on_a, session, "resources/subscribe", {"uri": WATCHED}) == {}
    priming = next(open_stream(stream_a, "GET", stream_headers(session)))
    stream_a.close()
    trigger = {"name": "test_trigger_resource_update", "arguments": {"uri": WATCHED}}
    session_call(on_a, session, "tools/call", trigger)  # missed: nobody holds the stream now
    resumed = open_stream(stream_b, "GET", stream_headers(session, priming.id))
    notification = {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": WATCHED}}
    stream_id = str(priming.id).rsplit(".", 1)[0]
    assert next_message(resumed) == (f"{stream_id}.1", notification)
    time.sleep(QUIET_S)  # the scenario, not a wait: B follows a stream on which nothing happens for a while
    session_call(on_a, session, "tools/call", trigger, 2)  # raised after the resumption: followed live
    assert next_message(resumed) == (f"{stream_id}.2", notification)
    on_a.close()
    stream_b.close()
    assert f"resuming stream {stream_id}" not in hosts.b.process.output()  # no failure, nothing missed


MISSED_ON_A = 1300  # past the ~1,024 events Redis keeps of a stream


@pytest.mark.timeout(120)
def test_a_stream_resumed_through_b_past_what_redis_keeps_replays_the_rest_and_b_says_what_is_missing(
        hosts: Hosts) -> None:
    """A GET stream held on A misses 1,300 updates. Redis's copy keeps the last 1,024 or a few more (MAXLEN
    ~ trims whole nodes): resumed through B from the start, the stream replays a run without a hole that
    ends with the last update, and B says at INFO how many events that client missed."""
    on_a, stream_a = RawHttp(hosts.a.url), RawHttp(hosts.a.url)
    session = initialize(on_a)
    assert session_call(on_a, session, "resources/subscribe", {"uri": WATCHED}) == {}
    priming = next(open_stream(stream_a, "GET", stream_headers(session)))
    stream_a.close()
    stream_id = str(priming.id).rsplit(".", 1)[0]
    trigger = {"name": "test_trigger_resource_update", "arguments": {"uri": WATCHED}}
    for n in range(MISSED_ON_A):
        session_call(on_a, session, "tools/call", trigger, n + 1)
    on_a.close()
    redis = hosts.redis.client()
    [key] = list(redis.scan_iter(match=f"*:stream:*:{stream_id}"))

    def copied_all() -> bool:
        last = redis.xrevrange(key, count=1)
        return bool(last) and int(last[0][1][b"s"]) == MISSED_ON_A
    wait_until(copied_all, 20.0, 0.05, "A to copy every update to Redis")
    with RawHttp(hosts.b.url) as stream_b:
        resumed = open_stream(stream_b, "GET", stream_headers(session, priming.id))
        first_id, first = next_message(resumed)
        kept = int(str(first_id).rsplit(".", 1)[1])
        assert MISSED_ON_A - 1200 < kept <= MISSED_ON_A - 1023, kept
        assert first == {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": WATCHED}}
        assert [next_message(resumed)[0] for _ in range(kept, MISSED_ON_A)] == \
            [f"{stream_id}.{n}" for n in range(kept + 1, MISSED_ON_A + 1)]
    said = [line for line in hosts.b.process.output().splitlines() if f"resuming stream {stream_id} from Redis" in line]
    assert len(said) == 1 and " INFO " in said[0] and f"after event 0: {kept - 1} events before {kept}" in said[0], said

def _streams_on_a_and_b(hosts: Hosts) -> list[Iterator[Event]]:
    """A GET stream held on A and one held on B, of two sessions made on A, each past its priming event."""
    streams = []
    for url in (hosts.a.url, hosts.b.url):
        with RawHttp(hosts.a.url) as on_a:
            session = initialize(on_a)
        streams.append(open_stream(RawHttp(url), "GET", stream_headers(session)))
        next(streams[-1])  # priming
    return streams


@pytest.mark.timeout(120)
def test_a_burst_of_events_raised_on_a_reaches_b_complete_and_in_order(hosts: Hosts) -> None:
    """320 list changes raised at once by 8 clients of A: a GET stream held on B receives exactly the
    sequence one held on A receives (the order A raised them in)."""
    streams = _streams_on_a_and_b(hosts)
    failures: list[str] = []

    def fire(n: int) -> None:
        with RawHttp(hosts.a.url) as http:
            for i in range(40):
                tool = ("test_trigger_tool_change", "test_trigger_prompt_change")[(n + i) % 2]
                reply = modern_call(http, "tools/call", {"name": tool, "arguments": {}}, i + 1)
                if reply.status != 200:
                    failures.append(f"{tool}: {reply.status}")
    threads = [threading.Thread(target=fire, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    on_a, on_b = ([next_message(events)[1]["method"] for _ in range(320)] for events in streams)
    assert sorted(set(on_a)) == ["notifications/prompts/list_changed", "notifications/tools/list_changed"]
    assert on_b == on_a


EVENTS_WHILE_STOPPED = 600


@pytest.mark.timeout(120)
def test_events_raised_while_the_bridge_is_stopped_wait_for_it_and_reach_b_in_order(hosts: Hosts) -> None:
    """The master's channel to its Redis bridge holds a few hundred small messages (its send buffer:
    278 of 40 bytes on this kernel's defaults). 600 list changes raised on A while A's bridge is stopped
    (SIGSTOP: descheduled, as on a loaded machine) wait in A's master and reach a GET stream held on B,
    complete and in A's order, once the bridge runs again."""
    streams = _streams_on_a_and_b(hosts)
    bridge = int(re.findall(r"redis bridge (\d+) started", hosts.a.process.output())[-1])
    os.kill(bridge, signal.SIGSTOP)
    try:
        with RawHttp(hosts.a.url) as http:
            for i in range(EVENTS_WHILE_STOPPED):
                tool = ("test_trigger_tool_change", "test_trigger_prompt_change")[i % 2]
                assert modern_call(http, "tools/call", {"name": tool, "arguments": {}}, i + 1).status == 200
    finally:
        os.kill(bridge, signal.SIGCONT)
    on_a, on_b = ([next_message(events)[1]["method"] for _ in range(EVENTS_WHILE_STOPPED)] for events in streams)
    alternating = ["notifications/tools/list_changed", "notifications/prompts/list_changed"]
    assert on_a == alternating * (EVENTS_WHILE_STOPPED // 2)
    assert on_b == on_a
    assert f"redis bridge {bridge} is not reading" not in hosts.a.process.output()


def _partition(namespaces: Namespaces, cut: bool) -> None:
    """Drop every packet between host A and Redis, both ways (a blackhole route on each side), or stop."""
    verb = "add" if cut else "del"
    _ip("-n", namespaces.name("r"), "route", verb, "blackhole", f"{namespaces.address('a')}/32")
    _ip("-n", namespaces.name("a"), "route", verb, "blackhole", f"{namespaces.address('r')}/32")


def _redis_warnings(cluster: Cluster) -> list[str]:
    return [line for line in cluster.process.output().splitlines() if " WARNING " in line and "redis" in line.lower()]


@pytest.mark.timeout(120)
def test_host_a_cut_off_from_redis_resynchronises_host_b_when_the_partition_heals(hosts: Hosts) -> None:
    """Last in the module (it takes A through an outage). Only A loses Redis; B never notices an outage,
    so what A invalidated meanwhile must reach B's workers (and L2) when A comes back."""
    if hosts.namespaces is None:
        pytest.skip("a partition between one host and Redis needs network namespaces")
    city = f"Bern-{uuid.uuid4().hex[:8]}"
    held = connect_to_workers(hosts.b.url, hosts.b.worker_pids())
    warned = len(_redis_warnings(hosts.a))
    try:
        cached = {pid: weather_at(http, city) for pid, http in held.items()}
        started = time.monotonic()
        _partition(hosts.namespaces, cut=True)
        try:
            wait_redis_up(hosts.a, up=False)
            assert metric_value(hosts.b.scrape(), "mcpherd_redis_up") == 1.0
            with RawHttp(hosts.a.url) as on_a:
                reply = modern_call(on_a, "tools/call", {"name": "refresh_weather", "arguments": {"city": city}})
                assert tool_text(reply.json()["result"]) == f"forecasts invalidated: {city}", reply
            assert {pid: weather_at(http, city) for pid, http in held.items()} == cached  # could not reach B
        finally:
            _partition(hosts.namespaces, cut=False)
        wait_redis_up(hosts.a)
        for pid, http in held.items():
            wait_until(lambda http=http, pid=pid: weather_at(http, city) != cached[pid], 10.0, 0.05,
                       f"worker {pid} of B to resynchronise")
        assert time.monotonic() - started < 30.0, "too slow to tell a resynchronisation from the 30 s TTL"
    finally:
        for http in held.values():
            http.close()
    assert len(_redis_warnings(hosts.a)) == warned + 1, _redis_warnings(hosts.a)
