"""HTTP/1.1 as clients use it: keep-alive, pipelining answered in order, connection close, gzip."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from conftest import (
    Cluster,
    Process,
    RawHttp,
    initialize,
    mcp_headers,
    metric_value,
    modern_call,
    modern_headers,
    modern_meta,
    rpc_body,
    send_in_pieces,
    start_worker,
    wait_until,
)


def echo(text: str, request_id: int) -> bytes:
    return rpc_body("tools/call", {"name": "echo", "arguments": {"text": text}}, request_id)


def test_one_connection_serves_many_requests(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        for i in range(200):
            reply = http.request("POST", mcp_headers(session), echo(f"n{i}", i))
            assert reply.json()["result"]["content"][0]["text"] == f"n{i}"
            assert "connection" not in reply.headers


def test_pipelined_requests_are_answered_in_request_order(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        headers = mcp_headers(session)
        requests = [
            rpc_body("tools/call", {"name": "slow_io", "arguments": {"seconds": 0.3}}, 0),  # finishes last
            echo("first", 1),
            rpc_body("tools/call", {"name": "test_tool_with_progress", "arguments": {},
                                    "_meta": {"progressToken": "p"}}, 2),  # an SSE answer in the middle
            echo("second", 3),
            rpc_body("ping", {}, 4),
        ]
        http.send(b"".join(http.build("POST", headers, body) for body in requests))
        replies = [http.read_reply() for _ in requests]
        assert [r.status for r in replies] == [200] * 5, replies
        assert replies[0].json()["result"]["content"][0]["text"] == "waited 0.3s"
        assert replies[1].json()["result"]["content"][0]["text"] == "first"
        assert replies[2].headers["content-type"] == "text/event-stream", replies[2]
        assert [m.get("id") for m in replies[2].messages()] == [None, None, None, 2], replies[2]
        assert replies[3].json()["result"]["content"][0]["text"] == "second"
        assert replies[4].json() == {"jsonrpc": "2.0", "id": 4, "result": {}}
        again = http.request("POST", headers, echo("after", 5))  # the connection is still usable
        assert again.json()["result"]["content"][0]["text"] == "after"


def test_pipelined_stateless_requests_in_order(worker: str) -> None:
    calls: list[dict[str, Any]] = [{"name": "slow_io", "arguments": {"seconds": 0.05}} if i % 5 == 0 else
             {"name": "echo", "arguments": {"text": str(i)}} for i in range(20)]
    with RawHttp(worker) as http:
        http.send(b"".join(http.build("POST", modern_headers("tools/call", call["name"]),
                                      rpc_body("tools/call", {**call, "_meta": modern_meta()}, i))
                           for i, call in enumerate(calls)))
        replies = [http.read_reply().json() for _ in calls]
        assert [r["id"] for r in replies] == list(range(20))
        assert [r["result"]["content"][0]["text"] for r in replies] == \
            ["waited 0.05s" if i % 5 == 0 else str(i) for i in range(20)]


def test_connection_close_is_honoured(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        reply = http.request("POST", mcp_headers(session, connection="close"), rpc_body("ping", {}))
        assert reply.status == 200 and reply.headers["connection"] == "close"
        assert http.closed_by_peer()
    with RawHttp(worker) as http:
        body = rpc_body("ping", {})
        head = http.build("POST", mcp_headers(session), body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        http.send(head)
        reply = http.read_reply()
        assert reply.status == 200 and reply.json()["result"] == {}
        assert http.closed_by_peer()


def test_large_json_answers_are_gzipped_when_accepted(worker: str) -> None:
    with RawHttp(worker) as http:
        session = initialize(http)
        plain = http.request("POST", mcp_headers(session), rpc_body("tools/list", {}, 1))
        assert len(plain.body) > 1024 and "content-encoding" not in plain.headers
        packed = http.request("POST", mcp_headers(session, accept_encoding="gzip, deflate"), rpc_body("tools/list", {}, 1))
        assert (packed.headers["content-encoding"], packed.headers["vary"]) == ("gzip", "accept-encoding")
        assert int(packed.headers["content-length"]) == len(packed.body) < len(plain.body)
        assert gzip.decompress(packed.body) == plain.body
        small = http.request("POST", mcp_headers(session, accept_encoding="gzip"), rpc_body("ping", {}, 2))
        assert "content-encoding" not in small.headers and small.json()["result"] == {}
        big_echo = http.request("POST", mcp_headers(session, accept_encoding="gzip"), echo("z" * 5000, 3))
        assert json.loads(gzip.decompress(big_echo.body))["result"]["content"][0]["text"] == "z" * 5000
        modern = modern_call(http, "tools/list", {})  # no Accept-Encoding: identity
        assert "content-encoding" not in modern.headers and len(modern.json()["result"]["tools"]) > 30


def test_quiet_streams_get_keepalive_comments(spawn: Callable[..., Process]) -> None:
    url = start_worker(spawn, "limits=HttpLimits(sse_keepalive_interval=1.0)")
    with RawHttp(url) as http, RawHttp(url) as stream:
        session = initialize(http)
        stream.send(stream.build("GET", mcp_headers(session)))
        assert stream.read_head()[0] == 200
        assert stream.read_chunk().startswith(b"id: ")  # the priming event
        assert stream.read_chunk() == b": keepalive\n\n"  # within the sweep after a second of silence
        assert stream.read_chunk() == b": keepalive\n\n"


PIPELINED = 20_000  # tools/list requests of ~400 bytes, each answered with ~7.4 KB: 148 MB of answers


def requests_answered(cluster: Cluster, method: str) -> int:
    samples = re.findall(rf'^mcpherd_requests_total{{method="{method}",[^}}]*}} (\S+)$', cluster.scrape(), re.M)
    return int(sum(float(value) for value in samples))


def test_a_client_that_does_not_read_its_answers_is_neither_read_nor_answered(
        clusters: Callable[..., Cluster]) -> None:
    """Flow control: a client pipelining requests without reading the answers stops being read, and
    answered, once the answers fill the buffers between it and the worker; what the worker read meanwhile
    waits as parsed requests, no bigger than what the client sent. It used to answer everything a loop turn
    read (libuv reads up to 32 times a turn, 8 MB here) before flow control could act: all 20,000 answers,
    148 MB, held for one connection. Nothing is lost: once the client reads, every answer arrives, in order."""
    cluster = clusters(1)
    [pid] = cluster.worker_pids()
    worker = psutil.Process(pid)
    with RawHttp(cluster.url) as http:
        answer_bytes = len(modern_call(http, "tools/list", {}, 0).body)  # without its head: a looser bound
    with RawHttp(cluster.url) as http:
        http.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        pipelined = b"".join(http.build("POST", modern_headers("tools/list"),
                                        rpc_body("tools/list", {"_meta": modern_meta()}, n)) for n in range(PIPELINED))
        before = worker.memory_info().rss
        sender = threading.Thread(target=http.sock.sendall, args=(pipelined,), daemon=True)
        sender.start()
        sender.join(3.0)  # long enough to send all of it, if the worker went on reading
        assert sender.is_alive(), "all 8 MB of requests were read by a worker whose client reads nothing"
        # Answered: what the buffers between us hold (the worker's socket's at most tcp_wmem's maximum, ours
        # twice its SO_RCVBUF) and the worker's own (its transport's high-water mark, one early write);
        # ~550 of the 20,000 on this kernel's defaults.
        held = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + 2 * 65536 + 2 * 64 * 1024
        answered = requests_answered(cluster, "tools/list")
        assert answered <= held // answer_bytes + 1, f"{answered} answers made for a client that reads none"
        grown = worker.memory_info().rss - before
        assert grown < 16 * 2**20, f"the worker grew by {grown >> 20} MiB"
        for n in range(PIPELINED):
            reply = http.read_reply()
            assert reply.status == 200 and reply.json()["id"] == n and len(reply.json()["result"]["tools"]) > 10, n
        sender.join(10.0)
        assert not sender.is_alive()
    assert requests_answered(cluster, "tools/list") == PIPELINED + 1


def send_until_closed(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the test closes the socket while this still sends
        sock.sendall(data)


def slow_calls(http: RawHttp, seconds: float, count: int) -> bytes:
    """`count` pipelined 2026-07-28 calls of the demo's `slow_io`, with ids 0 .. count - 1."""
    headers = modern_headers("tools/call", "slow_io")
    return b"".join(http.build("POST", headers, rpc_body("tools/call", {
        "name": "slow_io", "arguments": {"seconds": seconds}, "_meta": modern_meta()}, n)) for n in range(count))


def test_one_connection_has_at_most_max_pipelined_requests_in_hand_and_is_not_read_past_them(
        clusters: Callable[..., Cluster]) -> None:
    """A connection has at most `max_pipelined` (64) requests being handled; what it pipelines past them
    waits, parsed, and it is not read meanwhile. It used to have everything it sent handled at once:
    20,000 slow calls pipelined on one connection were 20,000 tasks, read as fast as the client sent."""
    cluster = clusters(1, "--graceful-timeout", "1")  # its stop does not wait for the calls to end
    with RawHttp(cluster.url) as http:
        sender = threading.Thread(target=send_until_closed, args=(http.sock, slow_calls(http, 30.0, 20_000)))
        sender.start()
        sender.join(3.0)  # long enough to send all 8 MB, if the worker went on reading
        assert sender.is_alive(), "a worker with 64 calls in hand read all the client sent"
        assert metric_value(cluster.scrape(), "mcpherd_inflight_requests") == 64
        http.sock.shutdown(socket.SHUT_RDWR)
        sender.join(5.0)
    with RawHttp(cluster.url) as other:  # the worker goes on serving everyone else at once
        reply = modern_call(other, "tools/call", {"name": "echo", "arguments": {"text": "still here"}}, 7)
        assert reply.json()["result"]["content"] == [{"type": "text", "text": "still here"}]


def test_requests_cut_mid_url_while_the_client_is_not_reading_are_all_read_whole(worker: str) -> None:
    """1,000 pipelined tools/list, sent in pieces of 50 that each end inside the next request's URL
    ("POST /m" | "cp HTTP/1.1"), to a client that reads nothing for half a second: the worker stops
    answering in the middle of a piece, with a URL half read. Every answer still arrives, in order.
    (Answering what waited once the client read counted the connection idle, and the rest of the URL
    began a new request: the 601st answered 404 for path "cp".)"""
    with RawHttp(worker) as http:
        http.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        headers = modern_headers("tools/list")
        body = {"_meta": modern_meta()}
        requests = [http.build("POST", headers, rpc_body("tools/list", body, n)) for n in range(1000)]
        data = b"".join(requests)
        cuts = [sum(map(len, requests[:n])) + len(b"POST /m") for n in range(50, 1000, 50)]
        sender = threading.Thread(target=send_in_pieces, args=(http.sock, data, cuts), daemon=True)
        sender.start()
        time.sleep(0.5)
        for n in range(1000):
            reply = http.read_reply()
            assert reply.status == 200 and reply.json()["id"] == n, (n, reply)
        sender.join(10.0)
        assert not sender.is_alive()


def test_calls_pipelined_past_max_pipelined_are_all_answered_in_order(worker: str) -> None:
    with RawHttp(worker) as http:
        http.send(slow_calls(http, 0.05, 300))  # five rounds of 64 at most
        for n in range(300):
            reply = http.read_reply()
            assert reply.status == 200 and reply.json()["id"] == n, n
            assert reply.json()["result"]["content"] == [{"type": "text", "text": "waited 0.05s"}], n


def test_a_client_that_reads_none_of_its_answers_for_send_timeout_is_dropped(spawn: Callable[..., Process]) -> None:
    """As nginx's send_timeout: a client whose answers wait unread for `send_timeout` (here 1 s) is gone."""
    url = start_worker(spawn, "limits=HttpLimits(send_timeout=1.0)")
    with RawHttp(url) as http:
        http.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        request = http.build("POST", modern_headers("tools/list"), rpc_body("tools/list", {"_meta": modern_meta()}))
        failed: list[OSError] = []

        def send_until_refused() -> None:
            try:
                while True:
                    http.sock.sendall(request * 100)
            except OSError as exc:
                failed.append(exc)
        started = time.monotonic()
        sender = threading.Thread(target=send_until_refused, daemon=True)
        sender.start()
        wait_until(lambda: not sender.is_alive(), 15.0, 0.05, "the worker to drop a client that reads nothing")
        assert time.monotonic() - started >= 1.0
        assert len(failed) == 1 and isinstance(failed[0], (ConnectionResetError, BrokenPipeError)), failed
