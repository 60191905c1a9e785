"""The master and its workers as an operator sees them: process titles, CPU pinning, restarts on the
same slot and CPU, SIGTTIN/SIGTTOU, reload hygiene (no fd or thread leak), death with the master, and
the official conformance suite against a 4-worker cluster on this 2-CPU machine.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Process, RawHttp, free_port, modern_call, wait_until
from supervisor_support import (
    LATENCY_LINE,
    Herd,
    alive,
    cmdline,
    cpus_allowed,
    echo,
    fd_count,
    request_read,
    serve_args,
    start_herd,
    thread_count,
    tool_text,
    write_config,
)
from test_conformance import localhost, run_suite, summary

from mcpherd.supervisor.topology import placement, read_topology

ALLOWED = sorted(os.sched_getaffinity(0))


@pytest.mark.timeout(60)
def test_titles_name_every_process_and_each_worker_is_pinned_to_its_cpu(spawn: Callable[..., Process],
                                                                       tmp_path: Path) -> None:
    workers = 2 * len(ALLOWED)  # more slots than CPUs: the order wraps, one core before its sibling
    herd = start_herd(spawn, tmp_path, workers)
    order = placement(read_topology(), set(ALLOWED))
    assert sorted(order) == ALLOWED
    assert cmdline(herd.master) == f"mcpherd: master [gen 1] {workers} workers 127.0.0.1:{herd.port}"
    cpu_of_slot = {}
    for pid, worker in herd.workers().items():
        cpu = order[worker.slot % len(order)]
        assert cmdline(pid) == f"mcpherd: worker {worker.slot} [cpu {cpu}, gen 1]"
        assert os.sched_getaffinity(pid) == {cpu} and cpus_allowed(pid) == str(cpu)
        cpu_of_slot[worker.slot] = cpu
    assert sorted(cpu_of_slot) == list(range(workers))
    assert sorted(cpu_of_slot[slot] for slot in range(len(ALLOWED))) == ALLOWED  # first round: every CPU once
    herd.signal(signal.SIGHUP)
    herd.wait_settled(workers, 2)
    assert cmdline(herd.master) == f"mcpherd: master [gen 2] {workers} workers 127.0.0.1:{herd.port}"
    assert sorted(cmdline(pid) for pid in herd.workers()) == sorted(
        f"mcpherd: worker {slot} [cpu {cpu}, gen 2]" for slot, cpu in cpu_of_slot.items())


@pytest.mark.timeout(60)
def test_a_restricted_cpuset_pins_every_worker_inside_it(spawn: Callable[..., Process], tmp_path: Path) -> None:
    only = ALLOWED[-1]
    port = free_port()
    restrict = f"import os, sys; os.sched_setaffinity(0, {{{only}}}); os.execv(sys.executable, sys.argv[1:])"
    process = spawn([sys.executable, "-c", restrict, *serve_args(port, tmp_path, "--workers", "auto")])
    workers = Herd(process, port).wait_settled(1, 1)  # "auto": the CPUs this process may use, one here
    ((pid, worker),) = workers.items()
    assert (worker.slot, worker.cpu) == (0, only)
    assert os.sched_getaffinity(pid) == {only}
    assert echo(f"http://127.0.0.1:{port}/mcp", "cpuset") == "cpuset"


@pytest.mark.timeout(60)
def test_kill_9_restarts_on_the_same_slot_and_cpu_and_logs_the_latency(spawn: Callable[..., Process],
                                                                      tmp_path: Path) -> None:
    kills = 10
    config = write_config(tmp_path / "mcpherd.toml", restart={"max_restarts": 100})
    herd = start_herd(spawn, tmp_path, 2, "--config", str(config))
    for n in range(kills):
        victim = herd.worker_on_slot(n % 2)
        before = herd.workers()[victim]
        os.kill(victim, signal.SIGKILL)
        slot, pid, _ = herd.wait_log(LATENCY_LINE.pattern, count=n + 1)[n].groups()
        assert int(slot) == before.slot and int(pid) != victim
        after = herd.wait_settled(2, 1)
        assert after[int(pid)] == before  # same slot, same CPU, same generation
        assert os.sched_getaffinity(int(pid)) == {before.cpu}
        assert echo(herd.url, f"after-{n}") == f"after-{n}"
    latencies = sorted(float(m.group(3)) for m in LATENCY_LINE.finditer(herd.log()))
    assert len(latencies) == kills
    assert herd.log().count("died (killed by SIGKILL); restarting") == kills
    print(f"restart latencies (ms): {latencies}")


@pytest.mark.timeout(60)
def test_sigttin_and_sigttou_change_the_worker_count_one_at_a_time(spawn: Callable[..., Process],
                                                                   tmp_path: Path) -> None:
    slots = len(ALLOWED) + 1  # as many slots as configured workers, one more than the CPUs
    herd = start_herd(spawn, tmp_path, slots)
    down = [(signal.SIGTTOU, max(1, n)) for n in range(slots - 1, -1, -1)]  # ... 2, 1, then 1 again: the floor
    up = [(signal.SIGTTIN, min(slots, n)) for n in range(2, slots + 2)]  # 2, ..., slots, then slots: the cap
    steps = [*down, *up, (signal.SIGTTOU, slots - 1)]
    previous = herd.workers()
    for signum, expected in steps:
        herd.signal(signum)
        workers = herd.wait_settled(expected, 1)
        assert echo(herd.url, f"{signum.name}-{expected}") == f"{signum.name}-{expected}"
        if len(workers) <= len(previous):  # scaling down stops the retired workers only
            assert workers.items() <= previous.items()
        else:
            assert previous.items() <= workers.items()
        previous = workers
    log = herd.log()
    assert log.count("(SIGTTOU)") == slots and log.count("(SIGTTIN)") == slots - 1, log  # floor and cap: no line
    assert log.count("retiring worker") == slots, log
    assert log.count("exited after scaled down: exit code 0") == slots, log
    assert "died" not in log


@pytest.mark.timeout(120)
def test_no_fd_or_thread_leak_in_the_master_across_20_reloads(spawn: Callable[..., Process],
                                                              tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 2)
    with RawHttp(herd.url) as idle:  # a keep-alive connection open across the first reload
        assert tool_text(modern_call(idle, "tools/call", {"name": "echo", "arguments": {"text": "x"}})) == "x"
        fds, threads = fd_count(herd.master), thread_count(herd.master)
        for generation in range(2, 22):
            old = set(herd.workers())
            herd.signal(signal.SIGHUP)
            workers = herd.wait_settled(2, generation)
            assert not old & set(workers) and not any(alive(pid) for pid in old)
            assert echo(herd.url, f"gen-{generation}") == f"gen-{generation}"
            # polled: the master briefly opens files of its own (/proc/net/netstat once a second)
            wait_until(lambda: (fd_count(herd.master), thread_count(herd.master)) == (fds, threads), 2.0,
                       message=f"fd and thread counts back to {fds} and {threads} after reload {generation - 1}")
        assert idle.closed_by_peer(5.0)  # the first reload's drain closed it
    assert herd.log().count("reloading: starting generation") == 20


@pytest.mark.timeout(60)
def test_reloads_faster_than_a_long_call_drains_lose_nothing(spawn: Callable[..., Process],
                                                             tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 1)
    (first,) = herd.workers()
    answers: list[str] = []
    with RawHttp(herd.url, timeout=20.0) as http:
        def slow_call() -> None:
            answers.append(tool_text(modern_call(http, "tools/call", {"name": "slow_io", "arguments": {"seconds": 3}})))
        caller = threading.Thread(target=slow_call)
        caller.start()
        wait_until(lambda: request_read(first, herd.port), 5.0, message="the call in flight")
        herd.signal(signal.SIGHUP)
        wait_until(lambda: herd.title() == (2, 1), 10.0, message="generation 2 serving")
        assert alive(first)  # still draining its call: the slot holds two processes now
        herd.signal(signal.SIGHUP)  # generation 3 must wait for a free lane, not crash the master
        for n in range(10):
            assert echo(herd.url, f"during-{n}") == f"during-{n}"
        caller.join(10.0)
    assert answers == ["waited 3s"]
    herd.wait_settled(1, 3)
    assert f"worker {first} (slot 0, gen 1) exited after replaced by generation 2: exit code 0" in herd.log()


@pytest.mark.timeout(30)
def test_workers_die_with_the_master_and_finish_what_is_in_flight(spawn: Callable[..., Process],
                                                                  tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 2)
    workers = list(herd.workers())
    answers: list[str] = []
    with RawHttp(herd.url, timeout=15.0) as http:
        def slow_call() -> None:
            answers.append(tool_text(modern_call(http, "tools/call", {"name": "slow_io", "arguments": {"seconds": 1}})))
        caller = threading.Thread(target=slow_call)
        caller.start()
        wait_until(lambda: any(request_read(pid, herd.port) for pid in workers), 5.0, message="a call in flight")
        os.kill(herd.master, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in workers), 10.0, message="the workers to exit")
        caller.join(5.0)
    assert answers == ["waited 1s"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", herd.port), timeout=1.0).close()


@pytest.mark.timeout(180)
def test_conformance_2026_07_28_on_4_workers_matches_one_process(spawn: Callable[..., Process],
                                                                 tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    one = start_herd(spawn, tmp_path / "one", 1, name="one")
    four = start_herd(spawn, tmp_path / "four", 4, name="four")
    _, one_output = run_suite("0.2.0", localhost(one.url), ["--requirements", "2026-07-28"], tmp_path / "one")
    code, output = run_suite("0.2.0", localhost(four.url), ["--requirements", "2026-07-28"], tmp_path / "four")
    assert code == 0, output
    assert summary(output) == summary(one_output), f"one process:\n{one_output}\n\nfour workers:\n{output}"
    assert len(four.workers()) == 4 and "died" not in four.log()
