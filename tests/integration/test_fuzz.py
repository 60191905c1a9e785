"""Garbage at a live worker: random bytes, random HTTP, random JSON, random JSON-RPC, in both eras.

The properties, checked after every example: no answer is a 5xx (a 5xx means a handler raised), every
JSON answer is a JSON-RPC message, the worker process is alive, and it still answers a valid echo
exactly, on a fresh connection (2026-07-28) and on a long-lived handshake-era session.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import (
    Process,
    RawHttp,
    Reply,
    Spawner,
    initialize,
    mcp_headers,
    modern_call,
    modern_headers,
    modern_meta,
    rpc_body,
    send_in_pieces,
    start_worker,
)

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
# Tools that cannot block a fuzz example: no long sleeps, no CPU-heavy rounds.
SAFE_TOOLS = ["echo", "test_simple_text", "test_error_handling", "test_image_content", "test_tool_with_progress",
              "test_sampling", "test_elicitation", "test_reconnection", "test_input_required_result_multi_round",
              "test_input_required_result_sampling", "test_x_mcp_header", "test_trigger_resource_update", "weather",
              "json_schema_2020_12_tool", "nope"]
METHODS = ["tools/call", "tools/list", "resources/read", "resources/list", "resources/templates/list",
           "prompts/get", "prompts/list", "completion/complete", "ping", "logging/setLevel", "resources/subscribe",
           "resources/unsubscribe", "notifications/cancelled", "notifications/initialized", "server/discover",
           "subscriptions/listen", "initialize", "tools/", ""]


class Target:
    def __init__(self, url: str, process: Process) -> None:
        self.url = url
        self.process = process
        with RawHttp(url) as http:
            self.sessions = {version: initialize(http, version) for version in ("2025-03-26", "2025-11-25")}

    def check_alive(self) -> None:
        assert self.process.proc.poll() is None, self.process.output()
        with RawHttp(self.url) as http:
            modern = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "still here"}}, 7)
            assert modern.json()["result"]["content"] == [{"type": "text", "text": "still here"}]
            reply = http.request("POST", mcp_headers(self.sessions["2025-11-25"]),
                                 rpc_body("tools/call", {"name": "echo", "arguments": {"text": "and here"}}, 8))
            assert reply.json() == {"jsonrpc": "2.0", "id": 8, "result": {"content": [{"type": "text",
                                                                                     "text": "and here"}]}}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    spawner = Spawner(tmp_path_factory.mktemp("fuzz"))
    try:
        yield Target(start_worker(spawner, "limits=HttpLimits(request_timeout=2.0)"), spawner.started[0])
        log = spawner.started[0].output()
        assert "Traceback" not in log, log  # no handler raised, not even where the client saw a 4xx
    finally:
        spawner.stop_all()


def exchange(url: str, data: bytes) -> bytes:
    """Send bytes, half-close, read everything the server says until it closes."""
    with RawHttp(url, timeout=10.0) as http:
        try:
            http.send(data)
            http.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while chunk := http.sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def assert_no_server_error(raw: bytes) -> None:
    for line in raw.split(b"\r\n"):
        if line.startswith(b"HTTP/1.1 "):
            assert not line[9:10] == b"5", raw[:2000]


def assert_well_formed(reply: Reply) -> None:
    event(f"HTTP {reply.status}")  # --hypothesis-show-statistics: how deep the examples got
    assert reply.status < 500, reply
    if reply.headers.get("content-type") == "application/json":
        message = reply.json()
        assert message["jsonrpc"] == "2.0" and ("result" in message) != ("error" in message), message
    elif reply.headers.get("content-type") == "text/event-stream":
        for sse in reply.events():
            if sse.data:
                assert sse.json()["jsonrpc"] == "2.0"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
valid_ids = st.integers(-5, 2**53) | st.text(max_size=8)
ids = st.integers(0, 9).flatmap(  # mostly valid, so that most examples get past the envelope checks
    lambda k: valid_ids if k < 8 else st.none() | st.floats() | st.lists(st.integers(), max_size=2))


@st.composite
def rpc_messages(draw: st.DrawFn, modern: bool) -> dict[str, Any]:
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["jsonrpc"] = draw(st.sampled_from(["2.0"] * 8 + ["1.0", 2]))
    if draw(st.integers(0, 3)):
        message["id"] = draw(ids)
    # A valid 2026-07-28 subscriptions/listen is a stream that never ends: nothing to wait for here.
    methods = [m for m in METHODS if not (modern and m == "subscriptions/listen")]
    message["method"] = draw(st.sampled_from(methods) | st.text(max_size=12))
    params: dict[str, Any] = draw(st.dictionaries(st.sampled_from(
        ["name", "arguments", "uri", "cursor", "level", "requestId", "ref", "argument", "inputResponses",
         "requestState", "notifications", "protocolVersion", "capabilities"]), json_values, max_size=4))
    if draw(st.booleans()):
        params["name"] = draw(st.sampled_from(SAFE_TOOLS))
        params["arguments"] = draw(st.dictionaries(st.sampled_from(["text", "region", "city", "uri", "prompt"]),
                                                   json_values, max_size=3))
    if modern and draw(st.integers(0, 4)):
        params["_meta"] = modern_meta(draw(st.sampled_from([{}, {"sampling": {}}, {"elicitation": {}}, None])))
    if draw(st.integers(0, 9)):
        message["params"] = params
    elif draw(st.booleans()):
        message["params"] = draw(json_values)
    return message


def header_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if text.isascii() and text.isprintable() and text == text.strip():
        return text
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(target: Target, data: bytes) -> None:
    assert_no_server_error(exchange(target.url, data))
    target.check_alive()


http_tokens = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=':"(),/;<=>?@[\\]{}'),
                      min_size=1, max_size=12)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)


@pytest.mark.timeout(300)
@FUZZ
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS", "HEAD", "PATCH"]) | http_tokens,
       path=st.sampled_from(["/mcp", "/mcp?x=1", "/", "*", "/mcp/../mcp"]) | st.text(max_size=20).map(lambda p: "/" + p),
       headers=st.dictionaries(st.sampled_from(["content-type", "accept", "mcp-session-id", "mcp-protocol-version",
                                                "mcp-method", "mcp-name", "last-event-id", "origin", "host",
                                                "content-length", "transfer-encoding", "connection", "expect",
                                                "accept-encoding", "authorization"]) | http_tokens,
                               header_text, max_size=6),
       body=st.binary(max_size=200))
def test_random_http_requests(target: Target, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
    head = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{target.url.rsplit(':', 1)[1].split('/')[0]}",
            *(f"{name}: {value}" for name, value in headers.items())]
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body
    assert_no_server_error(exchange(target.url, raw))
    target.check_alive()


@pytest.mark.timeout(300)
@FUZZ
@given(body=json_values, version=st.sampled_from([None, "2025-03-26", "2025-11-25", "2026-07-28"]))
def test_random_json_bodies(target: Target, body: Any, version: str | None) -> None:
    session = target.sessions.get(version or "")
    headers = mcp_headers(session, version, mcp_method="tools/call")
    with RawHttp(target.url) as http:
        assert_well_formed(http.request("POST", headers, json.dumps(body).encode()))
    target.check_alive()


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.data(), version=st.sampled_from(["2025-03-26", "2025-11-25", "2026-07-28"]),
       batch=st.integers(0, 6))
def test_random_json_rpc_messages(target: Target, data: st.DataObject, version: str, batch: int) -> None:
    modern = version == "2026-07-28"
    messages = [data.draw(rpc_messages(modern)) for _ in range(max(batch - 4, 1))]
    body = json.dumps(messages if batch > 4 else messages[0]).encode()
    first = messages[0]
    if modern:
        params = first["params"] if isinstance(first.get("params"), dict) else {}
        name = params.get("uri" if first["method"] == "resources/read" else "name")
        headers = modern_headers(header_value(first["method"]), None if name is None else header_value(name))
    else:
        headers = mcp_headers(target.sessions[version], version)
    with RawHttp(target.url) as http:
        assert_well_formed(http.request("POST", headers, body))
    target.check_alive()


# Each kind of pipelined request: its params and the answer's result as the client must see it.
PIPELINED_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "echo": ("tools/call", {"name": "echo", "arguments": {"text": "e"}}),  # answered at once
    "slow": ("tools/call", {"name": "slow_io", "arguments": {"seconds": 0.01}}),  # answered later: fills the pipeline
    "list": ("tools/list", {}),  # ~7.4 KB: ~600 fill the buffers of a client that is not reading
}


def pipelined_request(http: RawHttp, kind: str, request_id: int) -> bytes:
    method, params = PIPELINED_KINDS[kind]
    name = params.get("name")
    return http.build("POST", modern_headers(method, name),
                      rpc_body(method, {**params, "_meta": modern_meta()}, request_id))


@pytest.mark.timeout(300)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(count=st.integers(1, 1500), mix=st.lists(st.sampled_from(sorted(PIPELINED_KINDS)), min_size=1, max_size=6),
       cuts=st.lists(st.tuples(st.integers(0, 1499), st.integers(6, 8) | st.integers(1, 600)), max_size=30),
       read_after=st.sampled_from([0.0, 0.3]))
def test_pipelined_requests_in_any_pieces_are_all_answered_in_order(
        target: Target, count: int, mix: list[str], cuts: list[tuple[int, int]], read_after: float) -> None:
    """Requests pipelined in pieces cut anywhere (mid-URL, mid-header, mid-body), answered at once or later,
    read at once or after 0.3 s (so that the worker stops reading and answering, and more than 64 slow
    calls wait their turn): every answer arrives, in request order, with the right result. A cut is an
    offset into one of the requests, half of them into its URL ("POST /m|cp")."""
    kinds = [mix[n % len(mix)] for n in range(count)]
    with RawHttp(target.url) as http:
        http.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        requests = [pipelined_request(http, kind, n) for n, kind in enumerate(kinds)]
        starts = [0]
        for request in requests:
            starts.append(starts[-1] + len(request))
        positions = [starts[index] + offset for index, offset in cuts if index < count]
        sender = threading.Thread(target=send_in_pieces, args=(http.sock, b"".join(requests), positions), daemon=True)
        sender.start()
        time.sleep(read_after)
        for n, kind in enumerate(kinds):
            reply = http.read_reply()
            assert (reply.status, reply.json()["id"]) == (200, n), (n, kind, reply)
            result = reply.json()["result"]
            if kind == "list":
                assert len(result["tools"]) > 10
            else:
                assert result["content"] == [{"type": "text", "text": "e" if kind == "echo" else "waited 0.01s"}]
        sender.join(10.0)
        assert not sender.is_alive()
    event(f"{count // 100 * 100}+ requests")
    target.check_alive()
