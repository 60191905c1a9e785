"""Protocol 2026-07-28 over raw HTTP: stateless POSTs, the validation ladder, multi-round requests.

No session and no handshake: every request carries its `_meta` envelope and the `Mcp-*` headers. The
multi-round tests play the client by hand: read the InputRequiredResult, answer, echo requestState.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mcpherd.demo import app as demo_app

from conftest import (
    MODERN_VERSION,
    Process,
    RawHttp,
    initialize,
    modern_call,
    modern_headers,
    modern_meta,
    rpc_body,
    session_call,
    start_worker,
)

SERVER_META = {"io.modelcontextprotocol/serverInfo": {"name": "mcpherd-demo", "version": "1.0.0"}}
ELICIT: dict[str, Any] = {"elicitation": {}}


def complete_text(text: str, request_id: int = 1, **extra: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": {
        "content": [{"type": "text", "text": text}], **extra, "resultType": "complete", "_meta": SERVER_META}}


def error(reply: Any) -> tuple[int, int, str]:
    body = reply.json()
    return reply.status, body["error"]["code"], body["error"]["message"]


def test_discover_and_a_plain_call(worker: str) -> None:
    with RawHttp(worker) as http:
        discover = modern_call(http, "server/discover", {})
        assert discover.status == 200 and "mcp-session-id" not in discover.headers
        assert discover.json()["result"] == {
            "supportedVersions": [MODERN_VERSION],
            "capabilities": {"tools": {"listChanged": True}, "resources": {"subscribe": True, "listChanged": True},
                             "prompts": {"listChanged": True}, "completions": {}},
            "ttlMs": 0, "cacheScope": "public", "resultType": "complete", "_meta": SERVER_META}
        echo = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "hi there"}}, 2)
        assert (echo.status, echo.headers["content-type"]) == (200, "application/json")
        assert echo.json() == complete_text("hi there", 2)
        listing = modern_call(http, "tools/list", {}, 3).json()["result"]
        assert (listing["ttlMs"], listing["cacheScope"]) == (0, "public")
        assert [tool["name"] for tool in listing["tools"]] == list(demo_app.tools)
        read = modern_call(http, "resources/read", {"uri": "test://static-text"}, 4).json()["result"]
        assert read["contents"][0]["text"] == "This is the content of the static text resource."
        assert (read["ttlMs"], read["cacheScope"]) == (0, "private")


def test_sampling_round_trip_with_input_required(worker: str) -> None:
    sampling: dict[str, Any] = {"sampling": {}}
    with RawHttp(worker) as http:
        params = {"name": "test_input_required_result_sampling", "arguments": {}}
        first = modern_call(http, "tools/call", params, 1, sampling).json()["result"]
        assert first["resultType"] == "input_required"
        assert first["inputRequests"] == {"capital_question": {"method": "sampling/createMessage", "params": {
            "messages": [{"role": "user", "content": {"type": "text", "text": "What is the capital of France?"}}],
            "maxTokens": 100}}}
        answer = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "test-model"}
        retry = {**params, "inputResponses": {"capital_question": answer}, "requestState": first["requestState"]}
        assert modern_call(http, "tools/call", retry, 2, sampling).json() == complete_text("The model said: Paris", 2)


def test_input_required_without_the_capability_is_32021(worker: str) -> None:
    with RawHttp(worker) as http:
        reply = modern_call(http, "tools/call", {"name": "test_input_required_result_sampling", "arguments": {}}, 7)
        assert error(reply)[:2] == (400, -32021)
        assert reply.json()["id"] == 7 and reply.json()["error"]["data"] == {"requiredCapabilities": {"sampling": {}}}


def test_multi_round_states_differ_and_carry_earlier_answers(worker: str) -> None:
    tool = {"name": "test_input_required_result_multi_round", "arguments": {}}
    with RawHttp(worker) as http:
        round1 = modern_call(http, "tools/call", tool, 1, ELICIT).json()["result"]
        assert list(round1["inputRequests"]) == ["step1"]
        name = {"action": "accept", "content": {"name": "Ada"}}
        round2 = modern_call(http, "tools/call", {**tool, "inputResponses": {"step1": name},
                                                  "requestState": round1["requestState"]}, 2, ELICIT).json()["result"]
        assert round2["resultType"] == "input_required" and list(round2["inputRequests"]) == ["step2"]
        assert round2["inputRequests"]["step2"]["params"]["message"] == "Step 2: What is your favorite color?"
        assert round2["requestState"] != round1["requestState"]
        color = {"action": "accept", "content": {"color": "green"}}
        # Only the new answer travels: the first one comes back from the signed state.
        final = modern_call(http, "tools/call", {**tool, "inputResponses": {"step2": color},
                                                 "requestState": round2["requestState"]}, 3, ELICIT)
        assert final.json() == complete_text("Ada likes green", 3)
        # The first round's state does not hold the first answer, so the question comes back.
        stale = modern_call(http, "tools/call", {**tool, "inputResponses": {"step2": color},
                                                 "requestState": round1["requestState"]}, 4, ELICIT).json()["result"]
        assert list(stale["inputRequests"]) == ["step1"]


def test_tampered_or_replayed_request_state_is_refused(worker: str) -> None:
    tool = {"name": "test_input_required_result_multi_round", "arguments": {}}
    name = {"step1": {"action": "accept", "content": {"name": "Ada"}}}
    with RawHttp(worker) as http:
        state1 = modern_call(http, "tools/call", tool, 1, ELICIT).json()["result"]["requestState"]
        state2 = modern_call(http, "tools/call", {**tool, "inputResponses": name, "requestState": state1},
                             2, ELICIT).json()["result"]["requestState"]
        version, payload1, mac1 = state1.split(".")
        _, payload2, mac2 = state2.split(".")
        forged = [f"{version}.{payload2}.{mac1}", f"{version}.{payload1}.{mac2}", state1 + "x", "garbage",
                  f"{version}.{payload1[:-4]}AAAA.{mac1}"]
        other_tool = modern_call(http, "tools/call", {"name": "test_input_required_result_request_state",
                                                      "arguments": {}}, 3, ELICIT).json()["result"]["requestState"]
        for request_id, state in enumerate([*forged, other_tool], 10):
            reply = modern_call(http, "tools/call", {**tool, "inputResponses": name, "requestState": state},
                                request_id, ELICIT)
            assert reply.json() == {"jsonrpc": "2.0", "id": request_id, "error": {
                "code": -32602, "message": "Invalid or expired requestState",
                "data": {"reason": "invalid_request_state"}}}, state
            assert reply.status == 400


def test_an_answer_of_the_wrong_shape_is_invalid_params(worker: str) -> None:
    tool = {"name": "test_input_required_result_elicitation", "arguments": {}}
    with RawHttp(worker) as http:
        reply = modern_call(http, "tools/call", {**tool, "inputResponses": {"user_name": {"content": "x"}}}, 1, ELICIT)
        assert error(reply) == (400, -32602, "Invalid params: inputResponses.user_name is not a valid result for "
                                             "elicitation/create")
        ok = modern_call(http, "tools/call", {**tool, "inputResponses": {
            "user_name": {"action": "accept", "content": {"name": "Grace"}}}}, 2, ELICIT)
        assert ok.json() == complete_text("Hello, Grace!", 2)


def test_prompt_with_input_required(worker: str) -> None:
    prompt = {"name": "test_input_required_result_prompt"}
    with RawHttp(worker) as http:
        first = modern_call(http, "prompts/get", prompt, 1, ELICIT).json()["result"]
        assert first["resultType"] == "input_required" and list(first["inputRequests"]) == ["user_context"]
        answer = {"user_context": {"action": "accept", "content": {"context": "tests"}}}
        done = modern_call(http, "prompts/get", {**prompt, "inputResponses": answer,
                                                 "requestState": first["requestState"]}, 2, ELICIT).json()["result"]
        assert done["messages"] == [{"role": "user", "content": {"type": "text", "text": "Use this context: tests"}}]


def test_removed_and_unknown_methods_are_404(worker: str) -> None:
    with RawHttp(worker) as http:
        for method in ("ping", "initialize", "logging/setLevel", "resources/subscribe", "unknown/method"):
            reply = http.request("POST", modern_headers(method), rpc_body(method, {"_meta": modern_meta()}, 5))
            assert error(reply) == (404, -32601, f"Method not found: {method}")
            assert reply.json()["id"] == 5


def test_only_post_is_allowed(worker: str) -> None:
    with RawHttp(worker) as http:
        for method in ("GET", "DELETE", "PUT"):
            reply = http.request(method, modern_headers("tools/list"))
            assert (reply.status, reply.headers["allow"]) == (405, "POST"), method


def test_validation_ladder(worker: str) -> None:
    list_body = rpc_body("tools/list", {"_meta": modern_meta()}, 4)
    with RawHttp(worker) as http:
        no_meta = http.request("POST", modern_headers("tools/list"), rpc_body("tools/list", {}, 4))
        assert error(no_meta)[:2] == (400, -32602) and no_meta.json()["id"] == 4
        wrong_method = http.request("POST", modern_headers("prompts/list"), list_body)
        assert error(wrong_method) == (400, -32020, "mcp-method header does not match the request body's method")
        no_method = http.request("POST", {k: v for k, v in modern_headers("tools/list").items() if k != "mcp-method"},
                                 list_body)
        assert error(no_method)[:2] == (400, -32020)
        echo = rpc_body("tools/call", {"name": "echo", "arguments": {"text": "x"}, "_meta": modern_meta()}, 4)
        assert error(http.request("POST", modern_headers("tools/call", "Echo"), echo))[:2] == (400, -32020)
        assert error(http.request("POST", modern_headers("tools/call"), echo))[:2] == (400, -32020)
        encoded = "=?base64?" + base64.b64encode(b"echo").decode() + "?="
        assert http.request("POST", modern_headers("tools/call", encoded), echo).status == 200
        assert http.request("POST", modern_headers("tools/call", "  echo\t"), echo).status == 200
        future = {**modern_headers("tools/list"), "mcp-protocol-version": "2099-01-01"}
        meta = {**modern_meta(), "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
        unsupported = http.request("POST", future, rpc_body("tools/list", {"_meta": meta}, 4))
        assert error(unsupported) == (400, -32022, "Unsupported protocol version")
        assert unsupported.json()["error"]["data"] == {"supported": [MODERN_VERSION], "requested": "2099-01-01"}
        mismatch = http.request("POST", future, list_body)
        assert error(mismatch)[:2] == (400, -32020)


def test_mcp_param_headers_mirror_annotated_arguments(worker: str) -> None:
    body = rpc_body("tools/call", {"name": "test_x_mcp_header", "arguments": {"region": "eu-west"},
                                   "_meta": modern_meta()}, 1)
    headers = modern_headers("tools/call", "test_x_mcp_header")
    with RawHttp(worker) as http:
        assert error(http.request("POST", headers, body)) == (400, -32020, "mcp-param-region header is missing")
        wrong = http.request("POST", {**headers, "mcp-param-region": "us-east"}, body)
        assert error(wrong)[:2] == (400, -32020)
        right = http.request("POST", {**headers, "mcp-param-region": "eu-west"}, body)
        assert right.json() == complete_text("region=eu-west")


def test_progress_and_opted_in_logging_stream_without_ids(worker: str) -> None:
    with RawHttp(worker) as http:
        progress = modern_call(http, "tools/call", {"name": "test_tool_with_progress", "arguments": {},
                                                    "_meta": {"progressToken": 42}})
        assert progress.headers["content-type"] == "text/event-stream"
        assert all(e.id is None for e in progress.events())  # nothing to resume on this wire
        assert [m["params"]["progress"] for m in progress.messages()[:-1]] == [0, 50, 100]
        assert progress.messages()[-1] == complete_text("42")
        quiet = modern_call(http, "tools/call", {"name": "test_tool_with_logging", "arguments": {}}, 2)
        assert quiet.headers["content-type"] == "application/json"
        assert quiet.json() == complete_text("Tool with logging executed successfully", 2)
        loud = modern_call(http, "tools/call", {"name": "test_tool_with_logging", "arguments": {},
                                                "_meta": {"io.modelcontextprotocol/logLevel": "info"}}, 3)
        assert [m["params"]["data"] for m in loud.messages()[:-1]] == [
            "Tool execution started", "Tool processing data", "Tool execution completed"]


def test_listen_stream_acknowledges_then_delivers_only_what_it_asked_for(worker: str) -> None:
    with RawHttp(worker) as listen, RawHttp(worker) as http:
        params = {"notifications": {"toolsListChanged": True, "resourceSubscriptions": ["test://watched-resource"]},
                  "_meta": modern_meta()}
        listen.send(listen.build("POST", modern_headers("subscriptions/listen"),
                                 rpc_body("subscriptions/listen", params, "L1")))
        status, headers = listen.read_head()
        assert (status, headers["content-type"]) == (200, "text/event-stream")
        events = listen.iter_events()
        tag = {"io.modelcontextprotocol/subscriptionId": "L1"}
        assert next(events).json() == {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                                       "params": {"notifications": {"toolsListChanged": True, "resourceSubscriptions": [
                                           "test://watched-resource"]}, "_meta": tag}}
        for request_id, name in enumerate(("test_trigger_prompt_change", "test_trigger_tool_change"), 1):
            assert modern_call(http, "tools/call", {"name": name, "arguments": {}}, request_id).status == 200
        for request_id, uri in enumerate(("test://static-text", "test://watched-resource"), 3):
            modern_call(http, "tools/call", {"name": "test_trigger_resource_update", "arguments": {"uri": uri}},
                        request_id)
        assert next(events).json() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                                       "params": {"_meta": tag}}
        assert next(events).json() == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                       "params": {"uri": "test://watched-resource", "_meta": tag}}


def test_resource_not_found_is_invalid_params_with_the_uri(worker: str) -> None:
    with RawHttp(worker) as http:
        reply = modern_call(http, "resources/read", {"uri": "test://missing"}, 3)
        assert reply.status == 400
        assert reply.json() == {"jsonrpc": "2.0", "id": 3, "error": {
            "code": -32602, "message": "Resource not found: test://missing", "data": {"uri": "test://missing"}}}


CONSTANT_RESULT_APP = '''
from mcpherd import App

app = App("constant-result-app", version="1")
RESULT = {"content": [{"type": "text", "text": "the same dict every time"}]}


@app.tool()
async def constant():
    """Returns one module-level CallToolResult: the very same object on every call."""
    return RESULT
'''


def test_answering_in_2026_07_28_leaves_the_result_the_tool_returned_unchanged(
        spawn: Callable[..., Process], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2026-07-28 answer adds resultType and the server's _meta to what the tool returned, on its way
    out: a tool that returns the same dict again, to a 2025-11-25 session, answers it as it is."""
    (tmp_path / "constant_app.py").write_text(CONSTANT_RESULT_APP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    url = start_worker(spawn, "app='constant_app:app'")
    text = [{"type": "text", "text": "the same dict every time"}]
    with RawHttp(url) as http:
        modern = modern_call(http, "tools/call", {"name": "constant", "arguments": {}}).json()["result"]
        assert modern == {"content": text, "resultType": "complete",
                          "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "constant-result-app", "version": "1"}}}
        session = initialize(http)
        assert session_call(http, session, "tools/call", {"name": "constant", "arguments": {}}, 2) == {"content": text}
