"""The dashboard's server-sent event stream in MetricsServer (a thread of the test stands in for the
master's loop; broadcasts are queued to it, as only the loop may touch the server): every viewer gets
the same bytes, viewers are bounded apart from scrapes, a viewer that stops reading is dropped, and the
stream is read-only."""

from __future__ import annotations

import queue
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import wait_until

from mcpherd.supervisor.metrics_http import MAX_STREAM_BACKLOG, MetricsServer, Reply

HEAD_END = b"\r\n\r\n"


@dataclass
class Stream:
    server: MetricsServer
    port: int
    broadcasts: queue.Queue[bytes]

    def broadcast(self, data: bytes) -> None:
        self.broadcasts.put(data)

    def viewers(self) -> int:
        return len(self.server.streams)


def _loop(stream: Stream, selector: selectors.BaseSelector, stop: threading.Event) -> None:
    while not stop.is_set():
        for key, _ in selector.select(0.01):
            key.data()
        while not stream.broadcasts.empty():
            stream.server.broadcast(stream.broadcasts.get())
        stream.server.tick(time.monotonic())


@pytest.fixture
def stream() -> Iterator[Stream]:
    routes = {"/metrics": lambda: Reply(200, "text/plain", b"up 1\n")}
    server = MetricsServer(("127.0.0.1", 0), routes, max_clients=2)
    server.stream_routes["/events"] = lambda: Reply(200, "application/json", b'{"first": true}')
    server.max_streams = 3
    port = server.listen()[1]
    selector = selectors.DefaultSelector()
    server.register(selector)
    served = Stream(server, port, queue.Queue())
    stop = threading.Event()
    thread = threading.Thread(target=_loop, args=(served, selector, stop), daemon=True)
    thread.start()
    yield served
    stop.set()
    thread.join(5)
    server.close()
    selector.close()


def viewers(stream: Stream, count: int) -> list[socket.socket]:
    """`count` viewers, one after the other: a connection counts as a plain client until its GET is read."""
    sockets = []
    for _ in range(count):
        sockets.append(viewer(stream.port))
        wait_until(lambda: stream.viewers() == len(sockets), 5.0, message=f"{len(sockets)} viewers")
    return sockets


def viewer(port: int, method: str = "GET", path: str = "/events") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    return sock


def read_until(sock: socket.socket, count: int, marker: bytes = b"\n\n") -> bytes:
    data = b""
    while data.count(marker) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_every_viewer_gets_the_first_snapshot_then_the_same_frames(stream: Stream) -> None:
    sockets = viewers(stream, 3)
    stream.broadcast(b'{"tick": 1}')
    stream.broadcast(b'{"tick": 2}')
    bodies = [read_until(sock, 3) for sock in sockets]  # the first snapshot, then two ticks
    for sock in sockets:
        sock.close()
    head, _, events = bodies[0].partition(HEAD_END)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: text/event-stream" in head
    assert events == b'data: {"first": true}\n\ndata: {"tick": 1}\n\ndata: {"tick": 2}\n\n'
    assert len(set(bodies)) == 1


def test_viewers_are_bounded_and_never_lock_out_a_scrape(stream: Stream) -> None:
    sockets = viewers(stream, 3)
    refused = viewer(stream.port)
    assert read_until(refused, 1, HEAD_END).startswith(b"HTTP/1.1 503 ")
    refused.close()
    # as many viewers as max_clients and more: a scrape is still answered
    with urllib.request.urlopen(f"http://127.0.0.1:{stream.port}/metrics", timeout=5) as reply:
        assert reply.read() == b"up 1\n"
    sockets.pop().close()
    wait_until(lambda: stream.viewers() == 2, 5.0, message="a closed viewer to be forgotten")
    for sock in sockets:
        sock.close()


def test_the_stream_is_read_only(stream: Stream) -> None:
    for method in ("POST", "PUT", "DELETE"):
        sock = viewer(stream.port, method)
        assert read_until(sock, 1, HEAD_END).startswith(b"HTTP/1.1 405 "), method
        sock.close()
    assert stream.viewers() == 0


def test_a_viewer_that_stops_reading_is_dropped_not_buffered(stream: Stream) -> None:
    stalled = viewer(stream.port)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wait_until(lambda: stream.viewers() == 1, 5.0)
    frame = b"x" * (256 * 1024)
    for _ in range(4 * MAX_STREAM_BACKLOG // len(frame) + 64):  # well past what the kernel holds
        stream.broadcast(frame)
        if stream.viewers() == 0:
            break
        time.sleep(0.002)
    wait_until(lambda: stream.viewers() == 0, 10.0, message="the stalled viewer to be dropped")
    stalled.close()
