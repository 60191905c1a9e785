"""MetricsServer in a selectors loop (a thread of the test stands in for the master's loop), scraped
over loopback: exact counter values, and a loop that no client can block or flood."""

from __future__ import annotations

import http.client
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import wait_until
from fake_cluster import FakeCluster
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from mcpherd.shared import layout, metrics
from mcpherd.supervisor.metrics import ClusterMetrics, LiveLane, MetricsServer, Reply, Route

BIG = b"x" * (16 << 20)  # far more than a socket buffer: the server must send it in pieces


@dataclass
class Served:
    server: MetricsServer
    cluster: FakeCluster
    collector: ClusterMetrics
    segment: layout.Segment
    url: str
    port: int


def _failing_route() -> Reply:
    raise RuntimeError("collector broke")


def _run_loop(server: MetricsServer, selector: selectors.BaseSelector, stop: threading.Event) -> None:
    while not stop.is_set():
        for key, _ in selector.select(0.02):
            key.data()
        server.tick(time.monotonic())


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    options: dict[str, float] = getattr(request, "param", {})
    segment = layout.Segment.create(1)
    cluster = FakeCluster()
    collector = ClusterMetrics(cluster)
    routes: dict[str, Route] = {"/metrics": collector.scrape, "/big": lambda: Reply(200, "text/plain", BIG),
                                "/broken": _failing_route}
    server = MetricsServer(("127.0.0.1", 0), routes, max_clients=int(options.get("max_clients", 64)),
                           timeout_s=options.get("timeout_s", 10.0))
    _, port = server.listen()
    selector = selectors.DefaultSelector()
    server.register(selector)
    stop = threading.Event()
    loop = threading.Thread(target=_run_loop, args=(server, selector, stop), daemon=True)
    loop.start()
    yield Served(server, cluster, collector, segment, f"http://127.0.0.1:{port}", port)
    stop.set()
    loop.join(5)
    server.close()
    selector.close()
    segment.close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def requests_total(served: Served) -> dict[tuple[str, str], float]:
    status, content_type, body = get(served.url + "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    [family] = [f for f in text_string_to_metric_families(body.decode()) if f.name == "mcpherd_requests"]
    return {(s.labels["method"], s.labels["outcome"]): s.value for s in family.samples}


def start_lane(served: Served, pid: int, started_at: int) -> metrics.Recorder:
    cell = served.segment.cell(0)
    cell.clear()
    cell.set(layout.F_PID, pid)
    cell.set(layout.F_STARTED_AT, started_at)
    served.cluster.lanes = [LiveLane(0, 0, pid, cell)]
    return metrics.Recorder(cell, ["search"])


def test_scrape_counts_exactly_across_a_replaced_worker(served: Served) -> None:
    recorder = start_lane(served, pid=1 << 30, started_at=1)
    for _ in range(3):
        recorder.request("tools/call", True, 0.004)
    recorder.request("ping", False, 0.0)
    assert requests_total(served)[("tools/call", "ok")] == 3
    served.cluster.lanes = []
    served.collector.fold(0, served.segment.cell(0))
    recorder = start_lane(served, pid=(1 << 30) + 1, started_at=2)
    for _ in range(4):
        recorder.request("tools/call", True, 0.004)
    counts = requests_total(served)
    assert counts[("tools/call", "ok")] == 7
    assert counts[("ping", "error")] == 1
    assert sum(counts.values()) == 8


def test_unknown_paths_and_methods(served: Served) -> None:
    assert get(served.url + "/")[0] == 404
    assert get(served.url + "/metrics/extra")[0] == 404
    assert get(served.url + "/broken")[0] == 500  # and the loop lives on:
    assert get(served.url + "/metrics?x=1")[0] == 200
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    connection.request("POST", "/metrics", body=b"{}")
    assert connection.getresponse().status == 405
    connection.close()


def test_keep_alive_and_head(served: Served) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    connection.request("HEAD", "/metrics")
    head = connection.getresponse()
    assert head.status == 200 and int(head.headers["Content-Length"]) > 1000 and head.read() == b""
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert len(response.read()) == int(head.headers["Content-Length"])
    assert response.headers["Connection"] == "keep-alive"
    connection.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_request_gets_400_and_close(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\x00 / HTTP/9\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400 ")


def test_pipelined_flood_is_cut_off(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
        replies = read_all(sock).count(b"HTTP/1.1 404 ")
    # At most MAX_PIPELINED answers wait per client; the first read that holds more closes it.
    assert 1 <= replies < 100


def test_slow_reader_does_not_block_the_loop(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as slow:
        slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.1)  # the server has filled the socket buffer and must wait for this client
        assert get(served.url + "/metrics")[0] == 200
        body = read_all(slow)
    head, _, payload = body.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and payload == BIG


@pytest.mark.parametrize("served", [{"timeout_s": 0.3}], indirect=True)
def test_idle_client_is_closed_after_the_timeout(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never finishes the request
        started = time.monotonic()
        assert sock.recv(1024) == b""
        assert 0.2 < time.monotonic() - started < 3.0
    wait_until(lambda: not served.server.clients, timeout=5, message="no clients left")


@pytest.mark.parametrize("served", [{"max_clients": 2}], indirect=True)
def test_clients_are_bounded(served: Served) -> None:
    idle = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(2)]
    wait_until(lambda: len(served.server.clients) == 2, timeout=5, message="two clients")
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as third:
        assert third.recv(1024) == b""  # closed at once: over the bound
    idle.pop().close()
    wait_until(lambda: len(served.server.clients) == 1, timeout=5, message="one client")
    assert get(served.url + "/metrics")[0] == 200
    for sock in idle:
        sock.close()
