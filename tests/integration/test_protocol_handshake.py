"""The handshake era (2025-03-26 .. 2025-11-25) over raw HTTP: exact bytes a client would see.

Every test talks to a real worker serving the demo app, over plain sockets, so nothing between the
test and the wire can hide a wrong header, a wrong status or an extra event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcpherd.demo import app as demo_app

from conftest import (
    HANDSHAKE_VERSION,
    WATCHED,
    Cluster,
    RawHttp,
    initialize,
    mcp_headers,
    next_message,
    open_stream,
    rpc_body,
    stream_headers,
)

# The conformance fixtures come first, in this order (the suite calls tools[0] without arguments).
FIRST_TOOLS = ["test_simple_text", "test_image_content", "test_audio_content", "test_embedded_resource",
               "test_multiple_content_types", "test_tool_with_logging", "test_error_handling",
               "test_tool_with_progress", "test_sampling", "test_elicitation"]
SERVER_CAPABILITIES = {"tools": {"listChanged": True}, "resources": {"subscribe": True, "listChanged": True},
                       "prompts": {"listChanged": True}, "completions": {}, "logging": {}}


def call(http: RawHttp, session: str, method: str, params: dict[str, Any] | None = None, request_id: Any = 1) -> Any:
    """A request expected to answer with plain JSON; returns the decoded JSON-RPC message."""
    reply = http.request("POST", mcp_headers(session), rpc_body(method, params, request_id))
    assert reply.status == 200 and reply.headers["content-type"] == "application/json", reply
    assert reply.headers["mcp-session-id"] == session
    return reply.json()


def text_result(text: str, request_id: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": text}], **extra}}


def test_initialize_answers_result_and_session_id(worker: str) -> None:
    with RawHttp(worker) as http:
        reply = http.request("POST", mcp_headers(version=None), rpc_body("initialize", {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}))
        assert reply.status == 200
        assert reply.json() == {"jsonrpc": "2.0", "id": 1, "result": {
            "protocolVersion": "2025-11-25", "capabilities": SERVER_CAPABILITIES,
            "serverInfo": {"name": "mcpherd-demo", "version": "1.0.0"}}}
        session = reply.headers["mcp-session-id"]
        assert session and all(0x21 <= ord(c) <= 0x7E for c in session)
        initialized = http.request("POST", mcp_headers(session), rpc_body("notifications/initialized", None, None))
        assert (initialized.status, initialized.body) == (202, b"")


def test_initialize_negotiates_the_version(worker: str) -> None:
    with RawHttp(worker) as http:
        for requested, negotiated in (("2025-03-26", "2025-03-26"), ("2025-06-18", "2025-06-18"),
                                      ("2024-01-01", HANDSHAKE_VERSION), ("2026-07-28", HANDSHAKE_VERSION)):
            reply = http.request("POST", mcp_headers(version=None), rpc_body("initialize", {
                "protocolVersion": requested, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}))
            assert reply.json()["result"]["protocolVersion"] == negotiated, requested


def test_ping_and_tools_list(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        assert call(http, session, "ping", {}, 2) == {"jsonrpc": "2.0", "id": 2, "result": {}}
        result = call(http, session, "tools/list", {}, "list-1")["result"]
        names = [tool["name"] for tool in result["tools"]]
        assert names == list(demo_app.tools) and names[:len(FIRST_TOOLS)] == FIRST_TOOLS
        assert {"echo", "hash_work", "slow_io", "weather", "test_reconnection"} <= set(names)
        assert "nextCursor" not in result
        echo = next(tool for tool in result["tools"] if tool["name"] == "echo")
        assert echo == {"name": "echo", "description": "Returns the text unchanged.", "inputSchema": {
            "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}


def test_fixture_texts_are_exact(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        assert call(http, session, "tools/call", {"name": "test_simple_text", "arguments": {}}) == \
            text_result("This is a simple text response for testing.")
        assert call(http, session, "tools/call", {"name": "test_error_handling", "arguments": {}}, 2) == \
            text_result("This tool intentionally returns an error for testing", 2, isError=True)
        assert call(http, session, "tools/call", {"name": "echo", "arguments": {"text": "héllo \"wörld\""}}, 3) == \
            text_result("héllo \"wörld\"", 3)
        no_arguments: list[dict[str, Any]] = [{"name": "test_simple_text"}, {"name": "test_simple_text",
                                                                            "arguments": None}]
        for request_id, params in enumerate(no_arguments, 10):
            assert call(http, session, "tools/call", params, request_id) == \
                text_result("This is a simple text response for testing.", request_id)
        resource = call(http, session, "resources/read", {"uri": "test://template/123/data"}, 4)["result"]
        assert resource == {"contents": [{"uri": "test://template/123/data", "mimeType": "application/json",
                                          "text": '{"id":"123","templateTest":true,"data":"Data for ID: 123"}'}]}
        static = call(http, session, "resources/read", {"uri": "test://static-text"}, 5)["result"]
        assert static == {"contents": [{"uri": "test://static-text", "mimeType": "text/plain",
                                        "text": "This is the content of the static text resource."}]}


def test_prompt_texts_are_exact(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        simple = call(http, session, "prompts/get", {"name": "test_simple_prompt"})["result"]
        assert simple == {"description": "A simple prompt without arguments", "messages": [
            {"role": "user", "content": {"type": "text", "text": "This is a simple prompt for testing."}}]}
        with_args = call(http, session, "prompts/get", {"name": "test_prompt_with_arguments",
                                                        "arguments": {"arg1": "testValue1", "arg2": "x y"}})["result"]
        assert with_args["messages"] == [{"role": "user", "content": {
            "type": "text", "text": "Prompt with arguments: arg1='testValue1', arg2='x y'"}}]
        listing = call(http, session, "prompts/list", {})["result"]["prompts"]
        assert listing[1] == {"name": "test_prompt_with_arguments", "title": "Prompt With Arguments",
                              "description": "A prompt with required arguments", "arguments": [
                                  {"name": "arg1", "required": True, "description": "First test argument"},
                                  {"name": "arg2", "required": True, "description": "Second test argument"}]}
        completion = call(http, session, "completion/complete", {
            "ref": {"type": "ref/prompt", "name": "test_prompt_with_arguments"},
            "argument": {"name": "arg1", "value": "test"}})["result"]
        assert completion == {"completion": {"values": ["test", "testing", "tested"], "total": 3, "hasMore": False}}


def test_progress_notifications_then_result_on_sse(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        reply = http.request("POST", mcp_headers(session), rpc_body("tools/call", {
            "name": "test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "tok-7"}}, 9))
        assert reply.status == 200 and reply.headers["content-type"] == "text/event-stream"
        events = reply.events()
        assert events[0].data == "" and events[0].retry == 1000 and events[0].id is not None  # the priming event
        assert [e.json() for e in events[1:]] == [
            *({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                "progressToken": "tok-7", "progress": step, "total": 100,
                "message": f"Completed step {step} of 100"}} for step in (0, 50, 100)),
            text_result("tok-7", 9)]
        assert len({e.id for e in events}) == len(events)


def test_logging_notifications_follow_the_session_level(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        reply = http.request("POST", mcp_headers(session), rpc_body("tools/call", {
            "name": "test_tool_with_logging", "arguments": {}}))
        assert reply.messages() == [
            *({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": text}}
              for text in ("Tool execution started", "Tool processing data", "Tool execution completed")),
            text_result("Tool with logging executed successfully")]
        assert call(http, session, "logging/setLevel", {"level": "warning"}, 2) == {"jsonrpc": "2.0", "id": 2, "result": {}}
        # Nothing to send before the result any more: a plain JSON answer, no stream.
        assert call(http, session, "tools/call", {"name": "test_tool_with_logging", "arguments": {}}, 3) == \
            text_result("Tool with logging executed successfully", 3)


def test_sampling_round_trip(worker: str) -> None:
    with RawHttp(worker) as http, RawHttp(worker) as answers:
        session = initialize(http, capabilities={"sampling": {}})
        http.send(http.build("POST", mcp_headers(session), rpc_body("tools/call", {
            "name": "test_sampling", "arguments": {"prompt": "What is 2+2?"}}, 1)))
        status, headers = http.read_head()
        assert (status, headers["content-type"]) == (200, "text/event-stream")
        events = http.iter_events()
        assert next(events).data == ""
        request = next(events).json()
        assert request["method"] == "sampling/createMessage"
        assert request["params"] == {"messages": [{"role": "user", "content": {"type": "text", "text": "What is 2+2?"}}],
                                     "maxTokens": 100}
        answer = {"jsonrpc": "2.0", "id": request["id"], "result": {
            "role": "assistant", "content": {"type": "text", "text": "Four."}, "model": "test-model"}}
        accepted = answers.request("POST", mcp_headers(session), json.dumps(answer).encode())
        assert (accepted.status, accepted.body) == (202, b"")
        assert [e.json() for e in events] == [text_result("LLM response: Four.")]


def test_sampling_refused_by_the_client_is_a_tool_error(worker: str) -> None:
    with RawHttp(worker) as http, RawHttp(worker) as answers:
        session = initialize(http, capabilities={"sampling": {}})
        http.send(http.build("POST", mcp_headers(session), rpc_body("tools/call", {
            "name": "test_sampling", "arguments": {"prompt": "hi"}}, 5)))
        http.read_head()
        events = http.iter_events()
        next(events)
        request = next(events).json()
        refusal = {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -1, "message": "User rejected sampling"}}
        assert answers.request("POST", mcp_headers(session), json.dumps(refusal).encode()).status == 202
        assert [e.json() for e in events] == [text_result(
            "The client refused a request the tool needed: User rejected sampling", 5, isError=True)]


def test_sampling_without_the_capability_is_refused_with_32021(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        message = call(http, session, "tools/call", {"name": "test_sampling", "arguments": {"prompt": "hi"}})
        assert message["error"]["code"] == -32021
        assert message["error"]["data"] == {"requiredCapabilities": {"sampling": {}}}


def test_closed_stream_resumes_with_last_event_id(worker: str) -> None:
    with RawHttp(worker) as http, RawHttp(worker) as resume:
        session = initialize(http)
        reply = http.request("POST", mcp_headers(session), rpc_body("tools/call", {
            "name": "test_reconnection", "arguments": {}}, 3))
        events = reply.events()
        assert len(events) == 1 and events[0].data == "" and events[0].retry == 1000  # closed before the result
        priming_id = events[0].id
        assert priming_id is not None
        resumed = resume.request("GET", mcp_headers(session, last_event_id=priming_id))
        assert resumed.status == 200 and resumed.headers["content-type"] == "text/event-stream"
        assert resumed.messages() == [text_result(
            "Reconnection test completed successfully. If you received this, the client properly "
            "reconnected after stream closure.", 3)]
        # Replay is exactly what follows the given id: resuming after the result replays nothing.
        again = resume.request("GET", mcp_headers(session, last_event_id=str(resumed.events()[-1].id)))
        assert again.status == 200 and again.messages() == []
        stream_id = priming_id.rsplit(".", 1)[0]
        for bad in ("nope.1", f"{stream_id}.\u00b2", f"{stream_id}.x", stream_id):  # "²" is a digit to str.isdigit
            unknown = resume.request("GET", mcp_headers(session, last_event_id=bad))
            assert (unknown.status, unknown.json()["error"]["code"]) == (404, -32600), bad


def test_get_stream_carries_updates_of_subscribed_resources_only(worker: str) -> None:
    with RawHttp(worker) as http, RawHttp(worker) as watcher, RawHttp(worker) as bystander:
        subscribed, other = initialize(http), initialize(http)
        for stream, session in ((watcher, subscribed), (bystander, other)):
            stream.send(stream.build("GET", mcp_headers(session)))
            assert stream.read_head()[0] == 200
        watched, unrelated = watcher.iter_events(), bystander.iter_events()
        assert next(watched).data == "" and next(unrelated).data == ""
        assert call(http, subscribed, "resources/subscribe", {"uri": "test://watched-resource"}) == \
            {"jsonrpc": "2.0", "id": 1, "result": {}}
        assert call(http, other, "resources/subscribe", {"uri": "test://static-text"}) == \
            {"jsonrpc": "2.0", "id": 1, "result": {}}
        call(http, subscribed, "tools/call", {"name": "test_trigger_resource_update", "arguments": {}})
        call(http, subscribed, "tools/call", {"name": "test_trigger_resource_update",
                                              "arguments": {"uri": "test://static-text"}})
        update = {"jsonrpc": "2.0", "method": "notifications/resources/updated"}
        assert next(watched).json() == {**update, "params": {"uri": "test://watched-resource"}}
        # The other session's first event is the update it subscribed to, not the watched resource's.
        assert next(unrelated).json() == {**update, "params": {"uri": "test://static-text"}}
        second = http.request("GET", mcp_headers(subscribed))
        assert second.status == 409


def test_delete_ends_the_session(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        deleted = http.request("DELETE", mcp_headers(session))
        assert (deleted.status, deleted.body) == (200, b"")
        for method, body in (("POST", rpc_body("ping", {})), ("GET", b""), ("DELETE", b"")):
            reply = http.request(method, mcp_headers(session), body)
            assert reply.status == 404, method
            assert reply.json() == {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}


def test_session_is_bound_to_its_credentials(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http, authorization="Bearer alice")
        ok = http.request("POST", mcp_headers(session, authorization="Bearer alice"), rpc_body("ping", {}))
        assert ok.status == 200 and ok.json()["result"] == {}
        for other in ({"authorization": "Bearer mallory"}, {}):
            stolen = http.request("POST", mcp_headers(session, **other), rpc_body("ping", {}))
            assert stolen.status == 404 and stolen.json()["error"]["message"] == "Session not found"
        refused = http.request("DELETE", mcp_headers(session, authorization="Bearer mallory"))
        assert refused.status == 404
        still = http.request("POST", mcp_headers(session, authorization="Bearer alice"), rpc_body("ping", {}))
        assert still.status == 200


def test_session_headers_are_required(worker: str) -> None:
    with RawHttp(worker) as http:
        missing = http.request("POST", mcp_headers(None), rpc_body("ping", {}))
        assert missing.status == 400
        assert missing.json()["error"] == {"code": -32600, "message": "Bad Request: Mcp-Session-Id header is required"}
        forged = http.request("POST", mcp_headers("m1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA"),
                              rpc_body("ping", {}))
        assert forged.status == 404
        session = initialize(http)
        again = http.request("POST", mcp_headers(session), rpc_body("initialize", {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}))
        assert again.status == 400 and again.json()["error"]["code"] == -32600


def test_cancelled_calls_end_at_once_with_nothing_more_said(worker: str) -> None:
    def cancellation(request_id: str) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                           "params": {"requestId": request_id}}).encode()

    with RawHttp(worker) as http, RawHttp(worker) as control:
        session = initialize(http)
        started = time.monotonic()
        # Pipelined on one connection: the call is in flight by the time the cancellation is read.
        http.send(http.build("POST", mcp_headers(session), rpc_body("tools/call", {
            "name": "slow_io", "arguments": {"seconds": 30}}, "long")) +
            http.build("POST", mcp_headers(session), cancellation("long")))
        silent, accepted = http.read_reply(), http.read_reply()
        assert (silent.status, silent.body, accepted.status) == (202, b"", 202)
        assert time.monotonic() - started < 5
        # A call already streaming: it asked the client for a sampling and waits for the answer.
        sampler = initialize(control, capabilities={"sampling": {}})
        http.send(http.build("POST", mcp_headers(sampler), rpc_body("tools/call", {
            "name": "test_sampling", "arguments": {"prompt": "p"}}, "streamed")))
        assert http.read_head()[0] == 200
        events = http.iter_events()
        assert next(events).data == "" and next(events).json()["method"] == "sampling/createMessage"
        assert control.request("POST", mcp_headers(sampler), cancellation("streamed")).status == 202
        assert list(events) == []  # the stream ends without a result


def test_a_flood_of_sessions_is_bounded_and_every_session_id_stays_valid(
        clusters: Callable[..., Cluster], tmp_path: Path) -> None:
    """A worker holds the local state of at most `max_sessions` sessions (here 100, from the config file).
    1,000 initializes later, the first session (forgotten there) is rebuilt from its id on its next
    request, with the log level it chose: its tool call answers without the info-level messages it
    opted out of. The worker says once, at INFO, that it reached the bound."""
    config = tmp_path / "mcpherd.toml"
    config.write_text("max_sessions = 100\n")
    cluster = clusters(1, "--config", str(config))
    with RawHttp(cluster.url) as http:
        first = initialize(http)
        assert call(http, first, "logging/setLevel", {"level": "warning"}, 2) == {"jsonrpc": "2.0", "id": 2, "result": {}}
        for _ in range(1000):
            initialize(http)
        assert call(http, first, "tools/call", {"name": "test_tool_with_logging", "arguments": {}}, 3) == \
            text_result("Tool with logging executed successfully", 3)
    held = [line for line in cluster.process.output().splitlines() if "this worker holds 100 sessions" in line]
    assert len(held) == 1 and " INFO " in held[0], held


def updated(uri: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}}


def watch(url: str, session: str, uri: str) -> tuple[RawHttp, str]:
    """Subscribe the session to `uri` and open its GET stream: the connection and the stream's priming id."""
    with RawHttp(url) as http:
        assert call(http, session, "resources/subscribe", {"uri": uri}) == {"jsonrpc": "2.0", "id": 1, "result": {}}
    stream = RawHttp(url)
    priming = next(open_stream(stream, "GET", stream_headers(session)))
    assert priming.data == "" and priming.id is not None
    return stream, priming.id


def test_what_streams_keep_for_resumption_is_bounded_per_worker_and_a_resumption_says_what_it_lacks(
        clusters: Callable[..., Cluster], tmp_path: Path) -> None:
    """A worker keeps SSE events for Last-Event-ID within `resume_buffer_mb` (here 1 MiB), all its sessions
    together. 60 sessions with disconnected GET streams get 150 resource updates each (~2 MiB to keep): the
    streams quiet longest give way first, then the oldest events of the others. A finished call stream with
    nothing left answers 404 when resumed (its result is gone: the client must not wait for it); a GET
    stream that lost its event carries on from the next one; a watcher replays the latest events without a
    hole; the worker says at INFO what each of these clients missed, and warns once that the budget was
    reached."""
    config = tmp_path / "mcpherd.toml"
    config.write_text("resume_buffer_mb = 1\n")
    cluster = clusters(1, "--config", str(config))
    with RawHttp(cluster.url) as http:
        called = initialize(http)
        reply = http.request("POST", mcp_headers(called), rpc_body("tools/call", {
            "name": "test_tool_with_logging", "arguments": {}}, 7))
        call_priming = reply.events()[0].id
        assert call_priming is not None and len(reply.messages()) == 4  # three log messages, then the result
        resumed = http.request("GET", stream_headers(called, call_priming))
        assert resumed.messages() == reply.messages(), "before the flood the whole stream is replayed"

        quiet = initialize(http)  # its GET stream gets one update, for a resource no one else watches
        connection, quiet_priming = watch(cluster.url, quiet, "test://static-text")
        update_static = {"name": "test_trigger_resource_update", "arguments": {"uri": "test://static-text"}}
        call(http, quiet, "tools/call", update_static)
        quiet_stream = quiet_priming.rsplit(".", 1)[0]
        assert next_message(connection.iter_events())[0] == f"{quiet_stream}.1"
        connection.close()

        watchers = []
        for _ in range(60):
            session = initialize(http)
            connection, priming = watch(cluster.url, session, WATCHED)
            watchers.append((session, connection, priming))
        for connection_ in [c for _, c, _ in watchers[:-1]]:
            connection_.close()
        for _ in range(150):
            call(http, called, "tools/call", {"name": "test_trigger_resource_update", "arguments": {}})
        newest, connection, newest_priming = watchers[-1]
        newest_stream = newest_priming.rsplit(".", 1)[0]
        delivered = connection.iter_events()  # still connected: all 150 are out once it has the last
        assert [next_message(delivered)[0] for _ in range(150)][-1] == f"{newest_stream}.150"
        connection.close()

        gone = http.request("GET", stream_headers(called, call_priming))
        assert (gone.status, gone.json()["error"]) == \
            (404, {"code": -32600, "message": "Not Found: this stream's events are no longer held"})
        with RawHttp(cluster.url) as again:  # it kept its latest events, as did every watcher as active as it
            replay = open_stream(again, "GET", stream_headers(newest, newest_priming))
            first_id, first = next_message(replay)
            kept = int(str(first_id).rsplit(".", 1)[1])
            assert 1 < kept < 150 and first == updated(WATCHED)
            assert [next_message(replay)[0] for _ in range(kept, 150)] == \
                [f"{newest_stream}.{n}" for n in range(kept + 1, 151)]
        with RawHttp(cluster.url) as again:
            replay = open_stream(again, "GET", stream_headers(quiet, quiet_priming))
            call(http, quiet, "tools/call", update_static)
            assert next_message(replay) == (f"{quiet_stream}.2", updated("test://static-text"))
    output = cluster.process.output().splitlines()
    for stream, lacking in ((quiet_stream, 1), (newest_stream, kept - 1)):
        missed = [line for line in output if f"resuming stream {stream} after event 0: {lacking} of the events" in line]
        assert len(missed) == 1 and " INFO " in missed[0], (stream, lacking, missed)
    full = [line for line in output if "(resume_buffer_mb)" in line]
    assert len(full) == 1 and " WARNING " in full[0], full
