"""Connections waiting in a slot's accept queue are never reset, whatever happens to its worker.

Deterministic set-up: SIGSTOP one worker, so that the connections the kernel steers to its slot pile up
in that slot's accept queue (counted in /proc/net/tcp) while the other slots answer theirs. Then the
stopped worker is (a) killed with -9, (b) reloaded away, (c) scaled down with SIGTTOU, or (d) found
stalled by the heartbeat check. Every queued request must get its own correct answer. And a
keep-alive request that reaches a worker just as it starts draining is answered, not reset.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Process, RawHttp, modern_call, wait_until
from supervisor_support import (
    LATENCY_LINE,
    Herd,
    QueuedRequests,
    accept_queue,
    alive,
    echo,
    proc_state,
    socket_inodes,
    start_herd,
    stop_and_wait,
    tcp_sockets,
    tool_text,
)

CONNECTIONS = 60  # with one stopped slot in three, P(none queued on it) = (2/3)**60 < 1e-10


def queue_behind_stopped_worker(herd: Herd, slot: int, tag: str) -> tuple[int, QueuedRequests, int]:
    """Stop the worker of `slot` and open CONNECTIONS requests; returns (its pid, the requests, how many
    wait in its queue) once every request not queued behind it has been answered by the other slots."""
    pid = herd.worker_on_slot(slot)
    stop_and_wait(pid)
    requests = QueuedRequests(herd.port, CONNECTIONS, tag)

    def split() -> int | None:
        queued = accept_queue(pid, herd.port)
        return queued if queued + requests.answered() == CONNECTIONS else None
    queued: int = wait_until(split, 15.0, message="queued + answered == all requests")
    assert 0 < queued < CONNECTIONS
    assert proc_state(pid) == "T"
    print(f"{queued} of {CONNECTIONS} connections queued on slot {slot}")
    return pid, requests, queued


def answer_all(requests: QueuedRequests, why: str) -> None:
    wait_until(lambda: requests.answered() == CONNECTIONS, 15.0, message=why)
    assert requests.results() == requests.texts


@pytest.mark.timeout(60)
def test_kill_9_of_a_stopped_worker_resets_nothing_queued_on_its_slot(spawn: Callable[..., Process],
                                                                     tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 3)
    pid, requests, _ = queue_behind_stopped_worker(herd, 1, "kill")
    os.kill(pid, signal.SIGKILL)
    answer_all(requests, "the replacement to answer the queue")
    replacement = herd.worker_on_slot(1)
    assert replacement != pid and accept_queue(replacement, herd.port) == 0
    assert int(herd.wait_log(LATENCY_LINE.pattern)[0].group(1)) == 1


@pytest.mark.timeout(60)
def test_reload_while_a_worker_is_stopped_hands_its_queue_to_the_new_generation(
        spawn: Callable[..., Process], tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 3)
    pid, requests, _ = queue_behind_stopped_worker(herd, 2, "reload")
    herd.signal(signal.SIGHUP)
    answer_all(requests, "generation 2 to answer the queue")  # the old worker is still stopped: its successor did
    assert proc_state(pid) == "T"
    os.kill(pid, signal.SIGCONT)
    herd.wait_settled(3, 2)
    # Dead is not yet reaped: a zombie already counts as not alive, and the master logs the exit on reaping it.
    herd.wait_log(re.escape(f"worker {pid} (slot 2, gen 1) exited after replaced by generation 2: exit code 0"))
    assert not alive(pid)
    assert echo(herd.url, "after") == "after"


@pytest.mark.timeout(60)
def test_scale_down_of_a_stopped_worker_serves_its_queue_before_it_exits(spawn: Callable[..., Process],
                                                                        tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 3)
    pid, requests, queued = queue_behind_stopped_worker(herd, 2, "retire")  # SIGTTOU retires the last slot
    herd.signal(signal.SIGTTOU)
    herd.wait_log(rf"slot 2: retiring worker {pid}")
    fresh = QueuedRequests(herd.port, CONNECTIONS, "steered")  # new connections avoid the retiring slot
    wait_until(lambda: fresh.answered() == CONNECTIONS, 15.0, message="the live slots to answer new connections")
    assert accept_queue(pid, herd.port) == queued
    os.kill(pid, signal.SIGCONT)
    answer_all(requests, "the retiring worker to empty its queue")
    assert fresh.results() == fresh.texts
    herd.wait_settled(2, 1)
    assert f"worker {pid} (slot 2, gen 1) exited after scaled down: exit code 0" in herd.log()


@pytest.mark.timeout(60)
def test_a_keep_alive_request_sent_as_the_drain_begins_is_answered(spawn: Callable[..., Process],
                                                                   tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 1)
    (old,) = herd.workers()
    listener = {s.inode for s in tcp_sockets(herd.port) if s.listening} & socket_inodes(old)
    assert len(listener) == 1
    with RawHttp(herd.url) as http:
        assert tool_text(modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "before"}})) == "before"
        herd.signal(signal.SIGHUP)
        # The old worker closes its listener when it starts draining; our connection is idle then.
        wait_until(lambda: not listener & socket_inodes(old), 10.0, 0.001, "the old worker to stop accepting")
        reply = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": "during"}})
        assert tool_text(reply) == "during" and reply.headers["connection"] == "close"
        assert http.closed_by_peer(5.0)
    herd.wait_settled(1, 2)


@pytest.mark.timeout(60)
def test_a_stalled_worker_is_killed_and_its_queue_served_by_the_replacement(spawn: Callable[..., Process],
                                                                            tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 3, "--timeout", "2")
    pid, requests, _ = queue_behind_stopped_worker(herd, 0, "stalled")
    herd.wait_log(rf"worker {pid} \(slot 0\) event loop stalled for [\d.]+s: SIGABRT")
    answer_all(requests, "the replacement to answer the queue")
    assert not alive(pid)
    herd.wait_log(rf"slot 0 \(cpu \d+\): worker {pid} died \(event loop stalled for [\d.]+s\); restarting")
