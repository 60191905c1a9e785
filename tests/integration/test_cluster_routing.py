"""What crosses workers: notifications, a client's answers, resumed streams (a 4-worker cluster).

The kernel steers each new connection to a random worker, so every test first holds one keep-alive
connection per worker (conftest.connect_to_workers, which asks each connection's worker for its pid) and
then places each step of a case on a chosen worker: the GET stream on one, the request that causes the
notification on another. Each case asserts the outcome for that cross-worker placement specifically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import (
    WATCHED,
    Cluster,
    Event,
    RawHttp,
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


def owner_pattern(cluster: Cluster, pid: int) -> re.Pattern[str]:
    """Ids a worker issues name it: `[<host id>]w<slot><lane>-<kind><n>`."""
    slot = next(int(w["slot"]) for w in cluster.serving() if w["pid"] == pid)
    return re.compile(rf"(?:[0-9a-f]{{8}})?w{slot}[ab]-[a-z]\d+")


def get_stream(http: RawHttp, session: str) -> Iterator[Event]:
    """The session's GET stream on this connection, past its priming event."""
    events = open_stream(http, "GET", stream_headers(session))
    priming = next(events)
    assert priming.id is not None and priming.data == "", priming
    return events


@pytest.mark.timeout(90)
def test_a_notification_caused_on_one_worker_reaches_get_streams_held_by_every_other(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    posts, gets = connect_to_workers(cluster.url, set(pids)), connect_to_workers(cluster.url, set(pids))
    streams = {}
    for i, pid in enumerate(pids):
        # Session i: created on worker i+1, subscribed on worker i+2, its GET stream held by worker i.
        session = initialize(posts[pids[(i + 1) % 4]])
        assert session_call(posts[pids[(i + 2) % 4]], session, "resources/subscribe", {"uri": WATCHED}) == {}
        streams[pid] = get_stream(gets[pid], session)
    trigger = pids[0]
    trigger_session = initialize(posts[trigger])  # unsubscribed, without a GET stream
    for uri in ("test://nobody-subscribed", WATCHED):
        result = session_call(posts[trigger], trigger_session, "tools/call",
                              {"name": "test_trigger_resource_update", "arguments": {"uri": uri}})
        assert tool_text(result) == f"notifications/resources/updated sent for {uri}"
    changed = session_call(posts[pids[1]], trigger_session, "tools/call",
                           {"name": "test_trigger_tool_change", "arguments": {}})
    assert tool_text(changed) == "tools/list_changed sent"
    for pid, events in streams.items():
        # When a trigger call returns, every worker has applied its event: the notifications are sent.
        # The unsubscribed URI was raised first, so had it been delivered it would come first.
        assert next_message(events)[1] == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                           "params": {"uri": WATCHED}}, f"stream on worker {pid}"
        assert next_message(events)[1] == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                                           "params": {}}, f"stream on worker {pid}"
    assert {pid: whoami(http) for pid, http in posts.items()} == {pid: pid for pid in pids}
    for http in [*posts.values(), *gets.values()]:
        http.close()


ANSWERS: dict[str, tuple[dict[str, Any], str, dict[str, Any], str]] = {
    "test_sampling": ({"prompt": "Capital of France?"}, "sampling/createMessage",
                      {"role": "assistant", "content": {"type": "text", "text": "Paris"},
                       "model": "test-model", "stopReason": "endTurn"},
                      "LLM response: Paris"),
    "test_elicitation": ({"message": "Who are you?"}, "elicitation/create",
                         {"action": "accept", "content": {"username": "ada", "email": "ada@example.com"}},
                         ('User response: action=accept, '
                          'content={"username":"ada","email":"ada@example.com"}')),
}


@pytest.mark.timeout(90)
def test_an_answer_posted_to_another_worker_reaches_the_worker_that_asked(cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    posts, answers = connect_to_workers(cluster.url, set(pids)), connect_to_workers(cluster.url, set(pids))
    capabilities: dict[str, Any] = {"sampling": {}, "elicitation": {"form": {}}}
    for i, asker in enumerate(pids):
        answerer = pids[(i + 1) % 4]
        for tool, (arguments, method, answer, expected) in ANSWERS.items():
            session = initialize(answers[pids[(i + 2) % 4]], capabilities=capabilities)
            events = open_stream(posts[asker], "POST", mcp_headers(session),
                                 rpc_body("tools/call", {"name": tool, "arguments": arguments}, 7))
            _, request = next_message(events)
            assert request["method"] == method, request
            # The id names its owner, the worker that asked, and that is where the answer must go.
            assert owner_pattern(cluster, asker).fullmatch(f"{request['id']}"), request
            reply = answers[answerer].request("POST", mcp_headers(session), _response(request["id"], answer))
            assert reply.status == 202, reply
            _, result = next_message(events)
            assert result["id"] == 7 and set(result) == {"jsonrpc", "id", "result"}, result
            assert tool_text(result["result"]) == expected, (asker, answerer, result)
            assert list(events) == [], "the call's stream ends after its result"
    for held in (posts, answers):  # every step really ran on the worker it was placed on
        assert {pid: whoami(http) for pid, http in held.items()} == {pid: pid for pid in pids}
    for http in [*posts.values(), *answers.values()]:
        http.close()


@pytest.mark.timeout(60)
def test_an_answer_larger_than_a_control_datagram_reaches_the_worker_that_asked(cluster: Cluster) -> None:
    """A sampling answer of 300 KB (an image, say) posted to another worker: it crosses the master in
    pieces (a control datagram holds 128 KB) and reaches the asking tool whole. It used to be dropped
    with the client told 202, and the tool waited for ever."""
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, {pids[0], pids[1]})
    session = initialize(held[pids[0]], capabilities={"sampling": {}})
    events = open_stream(held[pids[0]], "POST", mcp_headers(session),
                         rpc_body("tools/call", {"name": "test_sampling", "arguments": {"prompt": "Describe it"}}, 7))
    _, request = next_message(events)
    text = "".join(chr(0x41 + i % 26) for i in range(300_000))
    answer = {"role": "assistant", "content": {"type": "text", "text": text}, "model": "m", "stopReason": "endTurn"}
    assert held[pids[1]].request("POST", mcp_headers(session), _response(request["id"], answer)).status == 202
    _, result = next_message(events)
    assert result["id"] == 7 and tool_text(result["result"]) == f"LLM response: {text}"
    for http in held.values():
        http.close()


def _response(request_id: object, result: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}).encode()


@pytest.mark.timeout(90)
def test_a_call_stream_closed_by_the_server_resumes_on_another_worker(cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    for i, owner in enumerate(pids):
        elsewhere = pids[(i + 1) % 4]
        held = connect_to_workers(cluster.url, {owner, elsewhere})
        session = initialize(held[elsewhere])
        events = open_stream(held[owner], "POST", mcp_headers(session),
                             rpc_body("tools/call", {"name": "test_reconnection", "arguments": {}}, 3))
        priming = next(events)
        assert priming.id is not None and priming.data == "" and priming.retry is not None, priming
        assert owner_pattern(cluster, owner).fullmatch(priming.id.rsplit(".", 1)[0]), priming
        assert list(events) == [], "test_reconnection ends its stream before the result"
        # Resume on a connection served by another worker: it hands the connection to the owner.
        resumed = open_stream(held[elsewhere], "GET", stream_headers(session, priming.id))
        event_id, result = next_message(resumed)
        assert result["id"] == 3, result
        assert tool_text(result["result"]).startswith("Reconnection test completed"), result
        assert event_id is not None and event_id.startswith(priming.id.rsplit(".", 1)[0] + "."), event_id
        assert list(resumed) == [], "nothing is replayed twice, and the finished stream ends"
        assert whoami(held[elsewhere]) == owner, "the resumed connection was handed to the stream's owner"
        for http in held.values():
            http.close()


@pytest.mark.timeout(90)
def test_a_dropped_call_stream_resumed_on_another_worker_replays_exactly_what_was_missed(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    for i, owner in enumerate(pids):
        elsewhere = pids[(i + 2) % 4]
        held = connect_to_workers(cluster.url, {owner, elsewhere})
        session = initialize(held[elsewhere])
        events = open_stream(held[owner], "POST", mcp_headers(session),
                             rpc_body("tools/call", {"name": "test_tool_with_logging", "arguments": {}}, 5))
        first_id, first = next_message(events)
        assert first["params"]["data"] == "Tool execution started", first
        assert owner_pattern(cluster, owner).fullmatch(str(first_id).rsplit(".", 1)[0]), first_id
        held[owner].close()  # the client goes away: not a cancellation, the call runs on
        resumed = open_stream(held[elsewhere], "GET", stream_headers(session, first_id))
        replayed = [next_message(resumed) for _ in range(3)]
        assert [m["params"]["data"] for _, m in replayed[:2]] == ["Tool processing data",
                                                                  "Tool execution completed"]
        assert replayed[2][1]["id"] == 5 and set(replayed[2][1]) == {"jsonrpc", "id", "result"}
        assert tool_text(replayed[2][1]["result"]) == "Tool with logging executed successfully"
        stream_id, _, first_seq = str(first_id).rpartition(".")
        expected_ids = [f"{stream_id}.{int(first_seq) + n}" for n in (1, 2, 3)]
        assert [event_id for event_id, _ in replayed] == expected_ids
        assert list(resumed) == []
        assert whoami(held[elsewhere]) == owner, "the resumed connection was handed to the stream's owner"
        held[elsewhere].close()


@pytest.mark.timeout(90)
def test_a_dropped_get_stream_resumed_on_another_worker_replays_the_notification_it_missed(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    owner, trigger, elsewhere = pids[0], pids[1], pids[2]
    held = connect_to_workers(cluster.url, {owner, trigger, elsewhere})
    session = initialize(held[trigger])
    assert session_call(held[trigger], session, "resources/subscribe", {"uri": WATCHED}) == {}
    events = open_stream(held[owner], "GET", stream_headers(session))
    priming = next(events)
    assert priming.id is not None and owner_pattern(cluster, owner).fullmatch(priming.id.rsplit(".", 1)[0])
    held[owner].close()
    result = session_call(held[trigger], session, "tools/call",
                          {"name": "test_trigger_resource_update", "arguments": {"uri": WATCHED}})
    assert tool_text(result) == f"notifications/resources/updated sent for {WATCHED}"
    resumed = open_stream(held[elsewhere], "GET", stream_headers(session, priming.id))
    event_id, notification = next_message(resumed)
    assert notification == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                            "params": {"uri": WATCHED}}
    assert event_id == priming.id.rsplit(".", 1)[0] + ".1", event_id
    held[elsewhere].close()
    held[trigger].close()
