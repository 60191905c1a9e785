"""Protocol 2026-07-28 in a 4-worker cluster: no sessions, so what must hold across workers is the
signed requestState (any worker verifies what another signed) and `subscriptions/listen` streams (a
change raised on one worker reaches the listeners held by every other).

As in the other cluster tests, each step is placed on a chosen worker through one held connection per
worker (conftest.connect_to_workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from conftest import (
    WATCHED,
    Cluster,
    Event,
    RawHttp,
    connect_to_workers,
    modern_call,
    modern_headers,
    modern_meta,
    open_stream,
    rpc_body,
    whoami,
)

ELICIT: dict[str, Any] = {"elicitation": {}}
SAMPLING: dict[str, Any] = {"sampling": {}}


def listen(http: RawHttp, subscription: str) -> Iterator[Event]:
    """A listen stream for tool-list changes and updates of WATCHED, past its acknowledgement."""
    params = {"notifications": {"toolsListChanged": True, "resourceSubscriptions": [WATCHED]},
              "_meta": modern_meta()}
    events = open_stream(http, "POST", modern_headers("subscriptions/listen"),
                         rpc_body("subscriptions/listen", params, subscription))
    assert next(events).json()["method"] == "notifications/subscriptions/acknowledged"
    return events


def call_tool(http: RawHttp, name: str, request_id: int = 1, capabilities: dict[str, Any] | None = None,
              **params: Any) -> dict[str, Any]:
    reply = modern_call(http, "tools/call", {"name": name, "arguments": params.pop("arguments", {}), **params},
                        request_id, capabilities)
    assert reply.status == 200 and reply.json()["id"] == request_id, reply
    return dict(reply.json()["result"])


def text_of(result: dict[str, Any]) -> str:
    assert result["resultType"] == "complete", result
    return str(result["content"][0]["text"])


@pytest.mark.timeout(90)
def test_a_change_raised_on_one_worker_reaches_the_listen_streams_held_by_every_worker(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    listeners, posts = connect_to_workers(cluster.url, set(pids)), connect_to_workers(cluster.url, set(pids))
    streams = {pid: listen(listeners[pid], f"L{pid}") for pid in pids}
    # What nobody listens for is raised first: had it been delivered, it would arrive first.
    call_tool(posts[pids[0]], "test_trigger_prompt_change")
    call_tool(posts[pids[0]], "test_trigger_resource_update", arguments={"uri": "test://static-text"})
    call_tool(posts[pids[1]], "test_trigger_tool_change")
    call_tool(posts[pids[2]], "test_trigger_resource_update", arguments={"uri": WATCHED})
    for pid, events in streams.items():
        tag = {"io.modelcontextprotocol/subscriptionId": f"L{pid}"}
        assert next(events).json() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                                       "params": {"_meta": tag}}, f"listener on worker {pid}"
        assert next(events).json() == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                       "params": {"uri": WATCHED, "_meta": tag}}, f"listener on worker {pid}"
    assert {pid: whoami(http) for pid, http in posts.items()} == {pid: pid for pid in pids}
    for http in [*listeners.values(), *posts.values()]:
        http.close()


@pytest.mark.timeout(90)
def test_a_request_state_signed_by_one_worker_is_honoured_by_every_other(cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, set(pids))
    for i in range(4):
        first, second, third, fourth = (held[pids[(i + k) % 4]] for k in range(4))
        tool = {"name": "test_input_required_result_multi_round"}
        round1 = call_tool(first, tool["name"], 1, ELICIT)
        assert round1["resultType"] == "input_required" and list(round1["inputRequests"]) == ["step1"]
        name = {"step1": {"action": "accept", "content": {"name": "Ada"}}}
        round2 = call_tool(second, tool["name"], 2, ELICIT, inputResponses=name,
                           requestState=round1["requestState"])
        assert round2["resultType"] == "input_required" and list(round2["inputRequests"]) == ["step2"]
        color = {"step2": {"action": "accept", "content": {"color": "green"}}}
        done = call_tool(third, tool["name"], 3, ELICIT, inputResponses=color,
                         requestState=round2["requestState"])
        assert text_of(done) == "Ada likes green"  # the first answer came back inside state signed elsewhere
        # Signed by one worker, forged on the way to another: refused there as well.
        version, payload, mac = round2["requestState"].split(".")
        forged_state = f"{version}.{payload}.{mac[:-4]}AAAA"
        forged = modern_call(fourth, "tools/call", {**tool, "arguments": {}, "inputResponses": color,
                                                    "requestState": forged_state}, 4, ELICIT)
        assert forged.status == 400 and forged.json()["error"]["code"] == -32602, forged

        asked = call_tool(fourth, "test_input_required_result_sampling", 5, SAMPLING)
        answer = {"capital_question": {"role": "assistant", "content": {"type": "text", "text": "Paris"},
                                       "model": "test-model"}}
        answered = call_tool(first, "test_input_required_result_sampling", 6, SAMPLING, inputResponses=answer,
                             requestState=asked["requestState"])
        assert text_of(answered) == "The model said: Paris"
    assert {pid: whoami(http) for pid, http in held.items()} == {pid: pid for pid in pids}
    for http in held.values():
        http.close()
