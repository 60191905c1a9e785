"""Sessions of a 4-worker cluster: valid on every worker, ended everywhere, surviving their worker.

A session id is a signed token any worker validates alone; what changes during a session (log level,
subscriptions, its end) travels as cluster events, and a worker started later gets them in a snapshot.
Each test places its steps on chosen workers (conftest.connect_to_workers) and kills or reloads the
workers a session depends on, then checks what its client observes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from conftest import (
    HANDSHAKE_VERSION,
    WATCHED,
    Cluster,
    Event,
    RawHttp,
    Reply,
    connect_to_workers,
    initialize,
    mcp_headers,
    next_message,
    open_stream,
    rpc_body,
    session_call,
    stream_headers,
    tool_text,
    whoami,
)


def echo(http: RawHttp, session: str, text: str) -> str:
    return tool_text(session_call(http, session, "tools/call", {"name": "echo", "arguments": {"text": text}}))


def refused(http: RawHttp, session: str) -> Reply:
    body = rpc_body("tools/call", {"name": "echo", "arguments": {"text": "x"}})
    return http.request("POST", mcp_headers(session), body)


def assert_not_found(reply: Reply) -> None:
    assert reply.status == 404 and reply.json()["error"]["message"] == "Session not found", reply


def log_lines(http: RawHttp, session: str) -> list[str]:
    """The log messages test_tool_with_logging sends the session (filtered by its log level)."""
    body = rpc_body("tools/call", {"name": "test_tool_with_logging", "arguments": {}}, 11)
    reply = http.request("POST", mcp_headers(session), body)
    assert reply.status == 200, reply
    json_only = reply.headers["content-type"].startswith("application/json")
    messages = [reply.json()] if json_only else reply.messages()
    assert tool_text(messages[-1]["result"]) == "Tool with logging executed successfully", messages
    return [m["params"]["data"] for m in messages[:-1] if m["method"] == "notifications/message"]


def get_stream(http: RawHttp, session: str) -> Iterator[Event]:
    events = open_stream(http, "GET", stream_headers(session))
    assert next(events).data == "", "a stream opens with its priming event"
    return events


def trigger_update(http: RawHttp, session: str) -> None:
    result = session_call(http, session, "tools/call", {"name": "test_trigger_resource_update",
                                                         "arguments": {"uri": WATCHED}})
    assert tool_text(result) == f"notifications/resources/updated sent for {WATCHED}"


def kill_worker(cluster: Cluster, pid: int) -> int:
    """SIGKILL one worker; returns the pid of the worker the master started in its place."""
    before = cluster.worker_pids()
    os.kill(pid, signal.SIGKILL)
    (replacement,) = cluster.wait_serving(without={pid}) - before
    return int(replacement)


def close_all(*groups: dict[int, RawHttp]) -> None:
    for group in groups:
        for http in group.values():
            http.close()


@pytest.mark.timeout(90)
def test_a_session_is_valid_on_every_worker_and_delete_on_one_ends_it_on_all(cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    held, gets = connect_to_workers(cluster.url, set(pids)), connect_to_workers(cluster.url, {pids[1]})
    session = initialize(held[pids[0]])
    for pid in pids:  # every worker now also holds the session's local state
        assert echo(held[pid], session, f"on {pid}") == f"on {pid}"
    events = get_stream(gets[pids[1]], session)
    end = {"mcp-session-id": session, "mcp-protocol-version": HANDSHAKE_VERSION}
    deleted = held[pids[2]].request("DELETE", end)
    assert deleted.status == 200, deleted
    # DELETE answers once every worker applied the end: no worker accepts the session any more.
    for pid in pids:
        assert_not_found(refused(held[pid], session))
    assert list(events) == [], "the GET stream held by another worker ends with the session"
    # A worker started after the DELETE learns of it from the master's snapshot.
    replacement = kill_worker(cluster, pids[3])
    fresh = connect_to_workers(cluster.url, {replacement})
    assert_not_found(refused(fresh[replacement], session))
    assert initialize(fresh[replacement]) != session
    close_all(held, gets, fresh)


@pytest.mark.timeout(90)
def test_a_session_outlives_the_worker_that_created_it_with_its_log_level_and_subscriptions(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    creator, others = pids[0], pids[1:]
    held = connect_to_workers(cluster.url, set(pids))
    gets = connect_to_workers(cluster.url, {creator})
    session, loud = initialize(held[creator]), initialize(held[creator])
    assert session_call(held[creator], session, "logging/setLevel", {"level": "error"}) == {}
    assert session_call(held[creator], session, "resources/subscribe", {"uri": WATCHED}) == {}
    lost_stream = open_stream(gets[creator], "GET", stream_headers(session))
    assert next(lost_stream).data == ""

    replacement = kill_worker(cluster, creator)
    assert gets[creator].closed_by_peer(), "the dead worker's stream is gone"
    held.pop(creator).close()
    held |= connect_to_workers(cluster.url, {replacement})
    gets = connect_to_workers(cluster.url, {replacement})
    for pid in [*others, replacement]:
        assert echo(held[pid], session, f"still here on {pid}") == f"still here on {pid}"
        assert log_lines(held[pid], session) == [], "the log level set on the dead worker holds everywhere"
    assert log_lines(held[replacement], loud) == ["Tool execution started", "Tool processing data",
                                                  "Tool execution completed"]
    # The subscription made on the dead worker still routes updates, to a new GET stream on its successor.
    events = get_stream(gets[replacement], session)
    trigger_update(held[others[0]], loud)
    assert next_message(events)[1] == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                       "params": {"uri": WATCHED}}
    close_all(held, gets)


SESSIONS = 3000  # with a log level each: ~300 KB of tables, more than a control datagram (128 KB) holds


@pytest.mark.timeout(120)
def test_a_worker_started_under_thousands_of_sessions_gets_all_their_tables(cluster: Cluster) -> None:
    """The master hands a new worker the session tables in parts: 3,000 sessions with a log level, a
    subscription and an ended one reach a replacement worker whole (they used to be one message, too
    large to send, and the new worker served every session at the default level, ended ones included)."""
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, {pids[0]})
    quiet = [initialize(held[pids[0]]) for _ in range(SESSIONS)]
    for n, session in enumerate(quiet, 1):
        assert session_call(held[pids[0]], session, "logging/setLevel", {"level": "error"}, n) == {}
    assert session_call(held[pids[0]], quiet[-1], "resources/subscribe", {"uri": WATCHED}) == {}
    ended = initialize(held[pids[0]])
    assert held[pids[0]].request("DELETE", {"mcp-session-id": ended, "mcp-protocol-version": HANDSHAKE_VERSION}) \
        .status == 200
    replacement = kill_worker(cluster, pids[1])
    fresh = connect_to_workers(cluster.url, {replacement})
    http = fresh[replacement]
    assert [log_lines(http, session) for session in (quiet[0], quiet[SESSIONS // 2], quiet[-1])] == [[], [], []]
    assert_not_found(refused(http, ended))
    events = get_stream(http, quiet[-1])
    trigger_update(held[pids[0]], quiet[0])
    assert next_message(events)[1] == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                       "params": {"uri": WATCHED}}
    assert "undecodable control message" not in cluster.process.output()
    close_all(held, fresh)


@pytest.mark.timeout(90)
def test_resuming_a_stream_of_a_dead_worker_never_replays_another_streams_events(cluster: Cluster) -> None:
    """The replacement of a dead worker serves the same slot: its ids must not repeat its predecessor's,
    or a client resuming a stream that died would be sent the events of another call."""
    pids = sorted(cluster.worker_pids())
    owner, elsewhere = pids[0], pids[1]
    held = connect_to_workers(cluster.url, {owner, elsewhere})
    session = initialize(held[elsewhere])
    events = open_stream(held[owner], "POST", mcp_headers(session),
                         rpc_body("tools/call", {"name": "test_tool_with_logging", "arguments": {}}, 5))
    seen_id, first = next_message(events)
    assert first["params"]["data"] == "Tool execution started"
    held[owner].close()  # the client lost its connection...

    replacement = kill_worker(cluster, owner)  # ...and the worker holding its stream died
    fresh = connect_to_workers(cluster.url, {replacement})
    events = open_stream(fresh[replacement], "POST", mcp_headers(session),
                         rpc_body("tools/call", {"name": "test_tool_with_logging", "arguments": {}}, 9))
    new_id, _ = next_message(events)
    rest = [next_message(events)[1].get("id") for _ in range(3)]
    assert rest == [None, None, 9], "two more logs, then the result"
    assert str(seen_id).split("-", 1)[0] == str(new_id).split("-", 1)[0], \
        "the replacement serves the same lane (same owner tag), the case where ids could repeat"
    assert new_id != seen_id, "an event id names one event of the session, across worker lifetimes"

    resumed = held[elsewhere].request("GET", stream_headers(session, str(seen_id)))
    assert resumed.status == 404, f"the stream died with its worker, yet {resumed.body!r} was replayed"
    assert echo(held[elsewhere], session, "the session itself lives on") == "the session itself lives on"
    close_all(held, fresh)


@pytest.mark.timeout(120)
def test_a_session_survives_a_reload_of_every_worker(cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, set(pids))
    session, loud = initialize(held[pids[0]]), initialize(held[pids[1]])
    assert session_call(held[pids[2]], session, "logging/setLevel", {"level": "error"}) == {}
    assert session_call(held[pids[3]], session, "resources/subscribe", {"uri": WATCHED}) == {}
    close_all(held)

    generation = cluster.status()["master"]["generation"]
    cluster.process.signal(signal.SIGHUP)
    reloaded = cluster.wait_serving(generation + 1, without=set(pids))
    held = connect_to_workers(cluster.url, reloaded)
    gets = connect_to_workers(cluster.url, reloaded)
    new = sorted(reloaded)
    for i, pid in enumerate(new):
        assert echo(held[pid], session, f"gen {generation + 1}") == f"gen {generation + 1}"
        assert log_lines(held[pid], session) == []
        events = get_stream(gets[pid], session)
        trigger_update(held[new[(i + 1) % 4]], loud)
        assert next_message(events)[1]["params"] == {"uri": WATCHED}, f"GET stream on worker {pid}"
        gets.pop(pid).close()
    assert log_lines(held[new[0]], loud) == ["Tool execution started", "Tool processing data",
                                             "Tool execution completed"]
    assert {pid: whoami(http) for pid, http in held.items()} == {pid: pid for pid in new}
    close_all(held)

