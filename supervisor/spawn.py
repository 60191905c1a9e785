"""Forking a worker. Pre-fork and post-fork are explicit: `fork_worker` runs in the master and only
forks; everything the child must change about itself happens in `_become_worker`, which never
returns into master code (it ends in os._exit).

Forking (not exec) is what makes a replacement accept within ~100 ms of its predecessor's death: the
child already has the interpreter and mcpherd's modules loaded and only imports the application.
The master itself never imports the application, so a broken app cannot take it down, and every
new generation imports the code as it is on disk now.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from setproctitle import setproctitle

from mcpherd.shared import layout
from mcpherd.worker.server import EXIT_BOOT_ERROR, WorkerConfig

log = logging.getLogger("mcpherd.master")
_PR_SET_PDEATHSIG = 1
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGWINCH)


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    """Everything a child needs, decided by the master before the fork."""

    config: WorkerConfig
    slot: int
    lane: int
    cpu: int
    generation: int
    sockets: tuple[socket.socket, ...]
    channel: socket.socket  # the worker's end
    segment: layout.Segment
    keep_fds: frozenset[int]  # besides the above and stdio: log files


def fork_worker(launch: WorkerLaunch) -> int:
    """Fork; in the parent return the child's pid. The child never returns."""
    return _fork(lambda master_pid: _become_worker(launch, master_pid))


def _fork(child: Callable[[int], int]) -> int:
    """Fork; the parent gets the pid, the child runs `child(master pid)` and exits with what it returns."""
    master_pid = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = EXIT_BOOT_ERROR
    try:
        code = child(master_pid)
    except BaseException:  # noqa: BLE001 - the child must never unwind into master code
        traceback.print_exc()
    finally:
        os._exit(code)


def _become_child(master_pid: int, keep: set[int], title: str) -> None:
    """What every child of the master does first: die with it, drop its signals and its fds."""
    _die_with(master_pid)
    for signum in MASTER_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    _close_fds_except({0, 1, 2, *keep})
    setproctitle(title)


def fork_bridge(channel: socket.socket, keep_fds: frozenset[int], run: Callable[[], int]) -> int:
    """Fork the Redis bridge (supervisor/bridge.py); in the parent return its pid."""
    def bridge(master_pid: int) -> int:
        _become_child(master_pid, {channel.fileno(), *keep_fds}, "mcpherd: redis bridge")
        return run()
    return _fork(bridge)


def _become_worker(launch: WorkerLaunch, master_pid: int) -> int:
    keep = {launch.channel.fileno(), launch.segment.fd, *launch.keep_fds, *(s.fileno() for s in launch.sockets)}
    _become_child(master_pid, keep, f"mcpherd: worker {launch.slot} [cpu {launch.cpu}, gen {launch.generation}]")
    os.sched_setaffinity(0, {launch.cpu})
    faulthandler.enable(all_threads=True)  # SIGABRT from the master prints where the loop is stuck
    cell = launch.segment.cell(layout.lane_index(launch.slot, launch.lane))
    cell.clear()
    cell.set(layout.F_PID, os.getpid())
    cell.set(layout.F_GENERATION, launch.generation)
    cell.set(layout.F_STARTED_AT, time.monotonic_ns())
    cell.set(layout.F_STATE, layout.STARTING)
    from mcpherd.worker.server import run

    return run(launch.config, list(launch.sockets), cell, launch.channel, launch.segment)


def _die_with(master_pid: int) -> None:
    """A worker must not outlive its master: the kernel sends SIGTERM when the master exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != master_pid:  # the master died between fork and prctl
        os._exit(0)


def _close_fds_except(keep: set[int]) -> None:
    """Close everything the master owns (sockets of other slots, other workers' channels, ...)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listdir handle itself, already gone
    sys.stdout.flush()
