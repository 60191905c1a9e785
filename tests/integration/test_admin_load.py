"""A thousand admin clients at once cost the master's loop nothing that matters.

The admin socket is served by the same loop that reaps workers, restarts them and checks their
heartbeats. With 1,000 connections open on it (half idle, half stuck in the middle of a request, then
all asking for status at the same moment), a worker killed with SIGKILL is still replaced at once, a
worker whose loop stops (SIGSTOP) is still detected by its stale heartbeat on time, live workers'
heartbeats stay fresh, and every client that asked gets its answer.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest

from conftest import Cluster, wait_until

CLIENTS = 1000
STALL_TIMEOUT_S = 3.0  # --timeout: a loop silent this long is killed
REQUEST = b'{"v":1,"cmd":"status"}\n'
SLACK = 4  # descriptors the master opens and closes on its own (a /proc read, a metrics scrape)


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Enough descriptors for the clients here and, inherited, for the master that serves them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * CLIENTS))
    if wanted < 2 * CLIENTS + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {CLIENTS} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def crowded(many_fds: None, clusters: Callable[..., Cluster]) -> Iterator[tuple[Cluster, list[socket.socket]]]:
    cluster = clusters(2, "--timeout", str(STALL_TIMEOUT_S))
    baseline = open_fds(cluster.process.pid)
    crowd = []
    try:
        for i in range(CLIENTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(cluster.admin_socket)
            if i % 2:
                sock.sendall(REQUEST[:9])  # half a request, to be finished later
            crowd.append(sock)
        wait_until(lambda: open_fds(cluster.process.pid) >= baseline + CLIENTS - SLACK, 10.0, 0.05,
                   f"the master to accept {CLIENTS} admin clients")
        yield cluster, crowd
    finally:
        for sock in crowd:
            sock.close()
    wait_until(lambda: open_fds(cluster.process.pid) <= baseline + SLACK, 10.0, 0.05, "the master to close them all")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slot_pids(cluster: Cluster) -> dict[int, tuple[int, str]]:
    return {w["slot"]: (w["pid"], w["state"]) for w in cluster.status()["workers"]}


def ask_all(crowd: list[socket.socket]) -> None:
    for i, sock in enumerate(crowd):
        sock.sendall(REQUEST[9:] if i % 2 else REQUEST)


def replies(crowd: list[socket.socket], deadline: float) -> int:
    """How many clients got a complete, successful status reply before the deadline."""
    answered = 0
    for sock in crowd:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        buffer = b""
        try:
            while not buffer.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buffer += chunk
        except TimeoutError:
            break
        if buffer.endswith(b"\n") and msgspec.json.decode(buffer)["ok"] is True:
            answered += 1
    return answered


@pytest.mark.timeout(120)
def test_a_killed_worker_is_replaced_at_once_while_a_thousand_clients_ask_for_status(
        crowded: tuple[Cluster, list[socket.socket]]) -> None:
    cluster, crowd = crowded
    started = time.monotonic()
    assert cluster.status()["master"]["pid"] == cluster.process.pid
    assert time.monotonic() - started < 0.5  # one more client is served at once

    before = slot_pids(cluster)
    victim, survivor = before[0][0], before[1][0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    ask_all(crowd)  # everyone asks at the moment the master has a worker to replace

    def replaced() -> bool:
        pid, state = slot_pids(cluster)[0]
        return pid not in (victim, None) and state == "ready"

    wait_until(replaced, 5.0, 0.02, "slot 0 to serve again")
    took = time.monotonic() - killed_at
    assert replies(crowd, time.monotonic() + 20.0) == CLIENTS
    document = cluster.status()
    slot0 = document["workers"][0]
    assert took < 3.0 and slot0["last_restart_latency_ms"] < 2000, (took, slot0)
    assert slot0["restarts"] == 1 and "SIGKILL" in slot0["last_restart_reason"]
    assert document["workers"][1]["pid"] == survivor and document["workers"][1]["restarts"] == 0
    assert all(w["heartbeat_age_s"] < 1.5 for w in document["workers"]), document["workers"]


@pytest.mark.timeout(120)
def test_a_stalled_worker_is_still_caught_by_its_heartbeat_among_a_thousand_clients(
        crowded: tuple[Cluster, list[socket.socket]]) -> None:
    cluster, crowd = crowded
    before = slot_pids(cluster)
    frozen, survivor = before[1][0], before[0][0]
    stopped_at = time.monotonic()
    os.kill(frozen, signal.SIGSTOP)  # its loop no longer turns; its heartbeat ages
    ages = []
    try:
        while slot_pids(cluster)[1][0] == frozen and time.monotonic() - stopped_at < 15.0:
            live = {w["pid"]: w["heartbeat_age_s"] for w in cluster.status()["workers"]}
            ages.append(live.get(survivor))
            time.sleep(0.1)
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # The stall is seen after --timeout, then SIGABRT, then SIGKILL after a 2 s grace: no later.
    wait_until(lambda: slot_pids(cluster)[1][1] == "ready" and slot_pids(cluster)[1][0] != frozen, 5.0, 0.05,
               "slot 1 to serve again")
    took = time.monotonic() - stopped_at
    assert STALL_TIMEOUT_S <= took < STALL_TIMEOUT_S + 2.0 + 3.0, took
    assert "event loop stalled" in cluster.process.output()
    assert ages and max(age for age in ages if age is not None) < 1.5, ages  # the live worker stayed fresh
    ask_all(crowd)
    assert replies(crowd, time.monotonic() + 20.0) == CLIENTS
