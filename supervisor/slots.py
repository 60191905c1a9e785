"""The master's process table, as data: slots (fixed: a CPU, a socket per bind, two shared-memory
lanes) and the worker processes that serve them over time.

A slot has at most one `current` worker, at most one `successor` starting to replace it (reload,
recycling) and any number of `retiring` workers draining. Lifecycle of a process:

    SPAWNING --ready--> READY --stop/retire--> DRAINING --exit--> EXITED
        \\------------------------------ exit ---------------------^

Everything here is plain state; the decisions live in master.py (the loop) and policy.py.
"""

from __future__ import annotations

import enum
import socket
from collections import deque
from dataclasses import dataclass, field

from mcpherd.shared import control, layout


class State(enum.Enum):
    SPAWNING = "starting"
    READY = "ready"
    DRAINING = "draining"
    EXITED = "exited"


@dataclass(eq=False)
class Proc:
    pid: int
    slot: int
    lane: int
    generation: int
    cpu: int
    channel: socket.socket  # the master's end of the control channel
    sender: control.Sender  # sends on `channel`, keeping what does not fit until it has room
    receiver: control.Receiver  # reads `channel`, joining chunked messages
    cell: layout.Cell
    spawned_at: float  # monotonic seconds
    state: State = State.SPAWNING
    ready_at: float = 0.0
    stop_reason: str = ""
    stop_deadline: float = 0.0  # SIGKILL after this (0: not stopping)
    aborted_at: float = 0.0  # SIGABRT sent for a stalled loop (0: not sent)
    request_limit: int = 0  # recycle after this many requests (0: never)
    exit_status: str = ""

    @property
    def requests(self) -> int:
        return self.cell.get(layout.F_REQUESTS)

    def heartbeat_age(self, now_ns: int) -> float:
        beat = self.cell.get(layout.F_HEARTBEAT)
        return (now_ns - beat) / 1e9 if beat else 0.0


@dataclass(eq=False)
class Slot:
    index: int
    cpu: int
    wanted: bool = False  # desired state: part of the target worker count
    current: Proc | None = None
    successor: Proc | None = None
    retiring: list[Proc] = field(default_factory=list)
    restarts: deque[float] = field(default_factory=deque)  # recent restart times (monotonic)
    restarts_total: int = 0
    strikes: int = 0  # consecutive restart-intensity trips (doubles the back-off)
    backoff_until: float = 0.0
    last_restart_reason: str = ""
    died_at: float = 0.0  # when the current worker died unexpectedly (restart latency)
    last_restart_latency_ms: float = 0.0

    def processes(self) -> list[Proc]:
        live = [p for p in (self.current, self.successor) if p is not None]
        return live + self.retiring

    def has_free_lane(self) -> bool:
        """Whether a process can start here: draining workers may hold both lanes (shared-memory cells)."""
        return len(self.processes()) < layout.LANES_PER_SLOT

    def free_lane(self) -> int:
        used = {p.lane for p in self.processes()}
        return next(lane for lane in range(layout.LANES_PER_SLOT) if lane not in used)

    def in_backoff(self, now: float) -> bool:
        return self.backoff_until > now

    def accepting(self) -> bool:
        """A worker of this slot takes connections now or is about to."""
        return self.current is not None and self.current.state in (State.SPAWNING, State.READY)
