"""Every way a request can be wrong, and the exact status and JSON-RPC error a client gets for it.

Also the HTTP/1.1 limits the worker enforces before the MCP layer sees a byte: body size (413), header
block size (431), the deadline to finish sending a request (408), the idle keep-alive timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import (
    Process,
    RawHttp,
    Reply,
    initialize,
    mcp_headers,
    modern_call,
    rpc_body,
    start_worker,
    tool_text,
)

FOUR_MIB = 4 * 1024 * 1024


def error_of(reply: Reply) -> tuple[int, Any, int, str]:
    """(HTTP status, JSON-RPC id, error code, error message) of an error answer."""
    body = reply.json()
    return reply.status, body["id"], body["error"]["code"], body["error"]["message"]


def test_malformed_json_is_32700_with_http_400(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        for body in (b"{not json", b'{"jsonrpc":"2.0","id":1,"method":"ping"', b""):
            status, request_id, code, message = error_of(http.request("POST", mcp_headers(session), body))
            assert (status, request_id, code) == (400, None, -32700) and message.startswith("Parse error"), body


DEEP = 5000  # levels of nesting: past Python's recursion limit, which msgspec's decoders follow


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_json_nested_too_deeply_anywhere_is_32700_and_the_worker_serves_on(worker: str) -> None:
    """~25 KB of nesting is a Parse error like any malformed body, not a 500 (msgspec raises RecursionError,
    not DecodeError, past the recursion limit): in the envelope, in params, in the arguments, in _meta."""
    deep = nested(DEEP)
    bodies = [
        '{"jsonrpc":"2.0","id":1,"method":"ping","extra":%s}' % deep,
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":%s}' % deep,
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":%s}}}' % deep,
        '{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":%s}}' % deep,
    ]
    with RawHttp(worker) as http:
        session = initialize(http)
        for body in bodies:
            reply = http.request("POST", mcp_headers(session), body.encode())
            assert error_of(reply) == (400, None, -32700, "Parse error: nested too deeply"), body[:80]
        meta = '{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":%s}'
        modern = ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},'
                  '"_meta":%s}}' % (meta % deep))
        headers = {**mcp_headers(version="2026-07-28"), "mcp-method": "tools/call", "mcp-name": "echo"}
        assert error_of(http.request("POST", headers, modern.encode())) == (400, None, -32700, "Parse error")
        assert tool_text(modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "still here"}})
                         .json()["result"]) == "still here"


def test_invalid_requests_are_32600(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        cases = {
            b'{"jsonrpc":"1.0","id":1,"method":"ping"}': (1, 'Invalid request: "jsonrpc" must be "2.0"'),
            b'{"jsonrpc":"2.0","id":2}': (2, 'Invalid request: expected "method", or "result"/"error"'),
            b'{"jsonrpc":"2.0","id":null,"method":"ping"}':
                (None, "Invalid request: MCP request ids must be a string or an integer"),
            b'{"jsonrpc":"2.0","id":1,"method":5}': (None, "Invalid request: Expected `str`, got `int` - at `$.method`"),
            b"[5]": (None, "Invalid request: Expected `object`, got `int` - at `$[0]`"),
            b"42": (None, "Invalid request: Expected `object`, got `int`"),
        }
        for body, (request_id, message) in cases.items():
            assert error_of(http.request("POST", mcp_headers(session), body)) == (400, request_id, -32600, message)


def test_unknown_method_is_32601(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        reply = http.request("POST", mcp_headers(session), rpc_body("tools/explode", {}, 3))
        assert error_of(reply) == (200, 3, -32601, "Method not found: tools/explode")


def test_invalid_params_name_the_field(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"name": "echo", "arguments": {"text": 5}},
             "Invalid arguments for tool 'echo': Expected `str`, got `int` - at `text`"),
            ({"name": "echo", "arguments": {}}, "Invalid arguments for tool 'echo': Object missing required field `text`"),
            ({"name": "hash_work", "arguments": {"data": "x", "rounds": "many"}},
             "Invalid arguments for tool 'hash_work': Expected `int`, got `str` - at `rounds`"),
            ({"arguments": {}}, "Invalid params: Object missing required field `name`"),
            ({"name": "no_such_tool"}, "Unknown tool: no_such_tool"),
        ]
        for request_id, (params, message) in enumerate(cases, 1):
            reply = http.request("POST", mcp_headers(session), rpc_body("tools/call", params, request_id))
            assert error_of(reply) == (200, request_id, -32602, message)
        long_uri = "test://" + "x" * 2000  # every worker must learn of a subscription: it must fit an event
        subscribe = http.request("POST", mcp_headers(session), rpc_body("resources/subscribe", {"uri": long_uri}, 8))
        assert error_of(subscribe) == (200, 8, -32602, "Invalid params: uri is too long to subscribe to "
                                                       "(2007 bytes; at most ~900)")
        level = http.request("POST", mcp_headers(session), rpc_body("logging/setLevel", {"level": "loud"}, 9))
        assert error_of(level) == (200, 9, -32602, "Invalid params: unknown log level 'loud'")
        cursor = http.request("POST", mcp_headers(session), rpc_body("tools/list", {"cursor": "bm9wZQ=="}, 10))
        assert error_of(cursor) == (200, 10, -32602, "Invalid params: unknown pagination cursor")


def test_batches_are_refused_after_2025_03_26(worker: str) -> None:
    batch = b'[{"jsonrpc":"2.0","method":"notifications/initialized"}]'
    with RawHttp(worker) as http:
        for version in ("2025-06-18", "2025-11-25"):
            session = initialize(http, version)
            reply = http.request("POST", mcp_headers(session, version), batch)
            assert error_of(reply) == (400, None, -32600, "Invalid request: batches are not allowed after 2025-03-26")
        modern = http.request("POST", {**mcp_headers(version="2026-07-28"), "mcp-method": "tools/list"}, b"[]")
        assert error_of(modern) == (400, None, -32600, "Invalid request: batches are not supported in 2026-07-28")


def test_2025_03_26_batches_of_notifications_only(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http, "2025-03-26")
        notes = b'[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","method":"notifications/x"}]'
        ok = http.request("POST", mcp_headers(session, "2025-03-26"), notes)
        assert (ok.status, ok.body) == (202, b"")
        with_request = b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]'
        refused = http.request("POST", mcp_headers(session, "2025-03-26"), with_request)
        assert error_of(refused)[:3] == (400, None, -32600)
        malformed = http.request("POST", mcp_headers(session, "2025-03-26"), b'[{"jsonrpc":"1.0","method":"n/x"}]')
        assert error_of(malformed) == (400, None, -32600, 'Invalid request: "jsonrpc" must be "2.0"')


def test_cancellation_of_an_unknown_or_odd_request_id_is_accepted(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        for request_id in (99, "r1", [1], {"a": 1}, None):
            note = json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                               "params": {"requestId": request_id}}).encode()
            reply = http.request("POST", mcp_headers(session), note)
            assert (reply.status, reply.body) == (202, b""), request_id


def test_accept_and_content_type(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        for accept in ("application/json", "text/event-stream", "text/html", ""):
            reply = http.request("POST", mcp_headers(session, accept=accept), rpc_body("ping", {}))
            assert error_of(reply)[:3] == (406, None, -32600), accept
        for accept in ("*/*", "application/*, text/*", "text/event-stream;q=0.9, application/json"):
            assert http.request("POST", mcp_headers(session, accept=accept), rpc_body("ping", {})).status == 200
        for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
            reply = http.request("POST", mcp_headers(session, content_type=content_type), rpc_body("ping", {}))
            assert error_of(reply) == (415, None, -32600, "Unsupported Media Type: Content-Type must be application/json")
        charset = http.request("POST", mcp_headers(session, content_type="application/json; charset=utf-8"),
                               rpc_body("ping", {}))
        assert charset.status == 200


def test_unknown_path_and_method(worker: str) -> None:
    with RawHttp(worker) as http:
        assert http.request("POST", mcp_headers(), rpc_body("ping", {}), path="/other").status == 404
        put = http.request("PUT", mcp_headers())
        assert (put.status, put.headers["allow"]) == (405, "GET, POST, DELETE")


def test_host_and_origin_are_checked(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        ping = rpc_body("ping", {})
        bad_host = http.request("POST", {**mcp_headers(session), "host": "evil.example:8080"}, ping)
        assert (bad_host.status, bad_host.body) == (421, b"Misdirected Request: Host header not allowed\n")
        bad_origin = http.request("POST", mcp_headers(session, origin="http://evil.example"), ping)
        assert (bad_origin.status, bad_origin.body) == (403, b"Forbidden: Origin not allowed\n")
        for origin in ("http://localhost:6274", "http://127.0.0.1", "https://[::1]:443"):
            assert http.request("POST", mcp_headers(session, origin=origin), ping).status == 200, origin
        for host in (f"localhost:{http.port}", "localhost", "[::1]:1"):
            assert http.request("POST", {**mcp_headers(session), "host": host}, ping).status == 200, host
        modern = modern_call(http, "tools/list", {"_meta": {}})
        assert modern.status == 200
        modern_evil = http.request("POST", {**mcp_headers(version="2026-07-28"), "origin": "http://evil.example"}, ping)
        assert modern_evil.status == 403


def test_allowed_hosts_admit_a_proxy_name_besides_loopback(spawn: Callable[..., Process]) -> None:
    url = start_worker(spawn, "allowed_hosts=['mcp.example.com'], allowed_origins=['https://app.example.com']")
    init = rpc_body("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                   "clientInfo": {"name": "t", "version": "1"}})
    with RawHttp(url) as http:
        assert http.request("POST", {**mcp_headers(), "host": "mcp.example.com"}, init).status == 200
        assert http.request("POST", mcp_headers(origin="https://app.example.com"), init).status == 200
        assert http.request("POST", mcp_headers(), init).status == 200
        assert http.request("POST", {**mcp_headers(), "host": "other.example.com"}, init).status == 421
        assert http.request("POST", mcp_headers(origin="https://evil.example.com"), init).status == 403


def test_body_of_exactly_the_limit_is_served_and_one_byte_more_is_413(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        body = rpc_body("tools/call", {"name": "echo", "arguments": {"text": "big"}})
        padded = body + b" " * (FOUR_MIB - len(body))
        reply = http.request("POST", mcp_headers(session), padded)
        assert reply.status == 200 and reply.json()["result"]["content"][0]["text"] == "big"
        # Refused on the declared length alone, before any of the body is read.
        http.send(http.build("POST", mcp_headers(session, content_length=str(FOUR_MIB + 1))))
        too_big = http.read_reply()
        assert (too_big.status, too_big.headers["connection"]) == (413, "close")
        assert too_big.body == b"request body exceeds 4194304 bytes\n"
        assert http.closed_by_peer()


def test_chunked_body_over_the_limit_is_413(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        headers = {**mcp_headers(session), "transfer-encoding": "chunked"}
        http.send(http.build("POST", headers).replace(b"content-length: 0\r\n", b""))
        chunk = b"x" * 65536
        for _ in range(FOUR_MIB // len(chunk)):
            http.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        http.send(b"1\r\nx\r\n")  # byte 4 MiB + 1; nothing more is sent, so the answer cannot be reset
        too_big = http.read_reply()
        assert (too_big.status, too_big.body) == (413, b"request body exceeds 4194304 bytes\n")
        assert http.closed_by_peer()


def test_header_block_limit_is_431(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        fits = http.request("POST", mcp_headers(session, x_padding="a" * 15_000), rpc_body("ping", {}))
        assert fits.status == 200
        too_big = http.request("POST", mcp_headers(session, x_padding="a" * 17_000), rpc_body("ping", {}))
        assert (too_big.status, too_big.body) == (431, b"request header block too large\n")
        assert http.closed_by_peer()
    with RawHttp(worker) as http:
        many = {f"x-h{i}": "1" for i in range(101)}
        too_many = http.request("POST", {**mcp_headers(), **many}, rpc_body("ping", {}))
        assert (too_many.status, too_many.body) == (431, b"too many request headers\n")


def test_malformed_http_is_400_and_closes(worker: str) -> None:
    with RawHttp(worker) as http:
        http.send(b"GARBAGE / HTTP/1.1\r\n\r\n")
        reply = http.read_reply()
        assert (reply.status, reply.headers["connection"]) == (400, "close")
        assert http.closed_by_peer()


@pytest.mark.timeout(30)
def test_request_not_finished_in_time_is_408(spawn: Callable[..., Process]) -> None:
    url = start_worker(spawn, "limits=HttpLimits(request_timeout=1.0, keepalive_timeout=2.0)")
    with RawHttp(url) as slow_head, RawHttp(url) as slow_body, RawHttp(url) as idle:
        started = time.monotonic()
        slow_head.send(slow_head.build("POST", mcp_headers())[:40])
        whole = slow_body.build("POST", mcp_headers(), rpc_body("ping", {}))
        slow_body.send(whole[:-5])
        for http in (slow_head, slow_body):
            reply = http.read_reply()
            assert (reply.status, reply.body) == (408, b"request not received in time\n")
            assert http.closed_by_peer()
        assert 1.0 <= time.monotonic() - started < 5.0  # the sweep runs once a second
        # A connection that sent nothing is no slow request: it is closed without a word when idle too long.
        idle.sock.settimeout(5.0)
        assert idle.sock.recv(1) == b""
    with RawHttp(url) as fresh:
        assert initialize(fresh)
