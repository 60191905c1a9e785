"""The master's side of cluster coordination: the event ring, acknowledgements, message routing.

A worker asks the master to publish an event (Publish); the master appends it to the shared-memory
ring, wakes every worker (Wake), and answers the publisher (Published) once every worker that could
hold state has acknowledged it (Applied), so "the call that invalidated has returned" means "no
worker serves the stale entry any more". A worker that has not said Hello yet started after the
event with a cold cache, and one that exits stops counting; one that never answers (stalled: the
heartbeat check will kill it) is given up on after ACK_TIMEOUT_S, and the publisher is told.

Wakes are coalesced: one per worker per loop turn, for the newest sequence (a worker reads the ring
up to the newest entry whatever the Wake says). A control channel is a SEQPACKET pair that holds a few
hundred small messages (its send buffer, see control.Sender): a Wake per event per worker filled it during
bursts of invalidations, and the message that did not fit next was as likely a Published answer,
leaving its publisher waiting. A Wake that still did not fit is sent again while the worker is behind;
every other message to a worker goes through `Master.send`, which queues what does not fit.

The master also keeps the session tables (log levels, subscriptions, ended sessions) by reading the
events it publishes, so a new worker gets a Snapshot and serves existing sessions correctly.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mcpherd.shared import control, events, layout
from mcpherd.shared.revocations import SESSION_MAX_AGE_S, Revocations
from mcpherd.supervisor.slots import Proc, State

if TYPE_CHECKING:
    from mcpherd.supervisor.master import Master

log = logging.getLogger("mcpherd.master")
ACK_TIMEOUT_S = 5.0
REWAKE_S = 0.05  # a worker still behind the ring this long after its Wake is woken again
_TAG = re.compile(r"(?P<host>[0-9a-f]{8})w(?P<slot>\d+)(?P<lane>[ab])")
MAX_TABLE_ENTRIES = events.MAX_TABLE_ENTRIES


@dataclass
class Waiter:
    seq: int
    deadline: float
    answer: Callable[[int, bool], None]  # (seq, every worker acknowledged)


class Bus:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.ring = events.Ring(master.segment.ring)
        self.waiters: list[Waiter] = []
        self.hello: set[int] = set()  # pids that said Hello (their acknowledgements count)
        self.tool_names: dict[int, list[str]] = {}  # pid -> tool names (metric labels)
        self.log_levels: OrderedDict[str, str] = OrderedDict()
        self.subscriptions: OrderedDict[str, set[str]] = OrderedDict()
        self.ended = Revocations(SESSION_MAX_AGE_S)
        self.published = 0
        self.woken: dict[int, tuple[int, float]] = {}  # pid -> (sequence, monotonic time) of its last Wake

    # -- messages from workers -----------------------------------------------------------------
    def on_message(self, proc: Proc, message: Any, fd: int | None) -> None:
        if isinstance(message, control.Applied):
            self.check()
        elif isinstance(message, control.Publish):
            self.publish(proc, message)
        elif isinstance(message, control.Hello):
            self.hello.add(proc.pid)
            self.tool_names[proc.pid] = message.tools
            if self.master.metrics is not None:
                self.master.metrics.set_tool_names(layout.lane_index(proc.slot, proc.lane), message.tools)
            # Megabytes with many sessions: the channel carries it in chunks (control.Sender).
            self.master.send(proc, control.Snapshot(
                self.ring.write_seq, dict(self.log_levels),
                {token: sorted(uris) for token, uris in self.subscriptions.items() if uris},
                list(self.ended.until), self.master.redis.workers_trust, self.ended.before))
        elif isinstance(message, control.Forward):
            if not self.master.redis.forward(message.owner, message.payload):
                self.deliver(message.owner, message.payload)
        elif isinstance(message, control.Handoff) and fd is not None:
            target = self._owner(message.owner)
            if target is not None:
                control.send(target.channel, control.Adopt(message.request), fd)
            os.close(fd)  # the target has its own copy now (or nobody wanted it)

    def publish(self, origin: Proc, message: control.Publish) -> None:
        def answer(seq: int, complete: bool) -> None:
            if origin.state is not State.EXITED:
                self.master.send(origin, control.Published(message.request_id, seq, complete))

        if message.l2:  # the worker's own delete of the shared entries failed
            self._after_l2(events.decode(message.event), message.event, answer if message.wait else None)
        else:
            self._publish(message.event, answer if message.wait else None)

    def publish_from_master(self, event: Any, answer: Callable[[int, bool], None]) -> None:
        """An event the master itself raises (admin `invalidate`): shared L2 entries go first."""
        self._after_l2(event, events.encode(event), answer)

    def _after_l2(self, event: Any, payload: bytes, answer: Callable[[int, bool], None] | None) -> None:
        """Publish an Invalidate once the bridge deleted its shared L2 entries. If it could not, the host
        stops relying on Redis (bridge.py) and resynchronises later; the event goes out either way."""
        if isinstance(event, events.Invalidate) and self.master.redis.enabled:
            self.master.redis.invalidate_l2(event, lambda _ok: self._publish(payload, answer))
        else:
            self._publish(payload, answer)

    def publish_remote(self, payload: bytes) -> None:
        """An event raised on another host: into this host's ring, never back out."""
        self._publish(payload, None, outbound=False)

    def publish_local(self, event: Any) -> None:
        """An event for this host only (RedisTrust: whether its workers may use L2)."""
        self._publish(events.encode(event), None, outbound=False)

    def deliver(self, owner: str, payload: bytes) -> None:
        target = self._owner(owner)
        if target is not None:
            self.master.send(target, control.Deliver(payload))

    def _publish(self, payload: bytes, answer: Callable[[int, bool], None] | None, outbound: bool = True) -> None:
        seq = self.ring.publish(payload)
        if outbound and self.master.redis.enabled:
            self.master.redis.outbound(payload)
        self.published += 1
        self._track(events.decode(payload))
        if answer is not None:
            self.waiters.append(Waiter(seq, time.monotonic() + ACK_TIMEOUT_S, answer))
            self.check()

    def check(self) -> None:
        """Answer every publisher whose event all live, greeted workers have applied."""
        if not self.waiters:
            return
        now = time.monotonic()
        counted = [p for p in self.master.processes() if p.state is not State.EXITED and p.pid in self.hello]
        remaining = []
        for waiter in self.waiters:
            missing = [p.pid for p in counted if p.cell.get(layout.F_EVENTS_APPLIED) < waiter.seq]
            if missing and now < waiter.deadline:
                remaining.append(waiter)
                continue
            if missing:
                log.error("event %d not acknowledged by workers %s within %gs", waiter.seq, missing, ACK_TIMEOUT_S)
            waiter.answer(waiter.seq, not missing)
        self.waiters = remaining

    def wake(self) -> None:
        """Once per loop turn: wake every worker behind the ring, unless a Wake for the newest entry is
        on its way and young. One that has not said Hello yet gets the newest sequence in its Snapshot
        (and a channel it does not read yet must not fill up with Wakes before that)."""
        newest = self.ring.write_seq
        if not newest:
            return
        now = time.monotonic()
        for proc in self.master.processes():
            if proc.state is State.EXITED or proc.pid not in self.hello \
                    or proc.cell.get(layout.F_EVENTS_APPLIED) >= newest:
                continue
            seq, sent = self.woken.get(proc.pid, (0, 0.0))
            if seq == newest and now - sent < REWAKE_S:
                continue
            if control.send(proc.channel, control.Wake(newest)):
                self.woken[proc.pid] = (newest, now)

    def forget(self, proc: Proc) -> None:
        """A worker exited: it no longer holds state, so it no longer needs to acknowledge."""
        self.woken.pop(proc.pid, None)
        self.hello.discard(proc.pid)
        self.tool_names.pop(proc.pid, None)
        self.check()

    # -- session tables ------------------------------------------------------------------------
    def _track(self, event: Any) -> None:
        if isinstance(event, events.SetLogLevel):
            self.log_levels[event.session] = event.level
            _bound(self.log_levels)
        elif isinstance(event, events.Subscribe):
            uris = self.subscriptions.setdefault(event.session, set())
            (uris.add if event.on else uris.discard)(event.uri)
            _bound(self.subscriptions)
        elif isinstance(event, events.SessionEnded):
            self.ended.add(event.nonce, event.expires)  # bounded: see shared/revocations.py
            self.log_levels.pop(event.session, None)
            self.subscriptions.pop(event.session, None)
            # Pruned once a minute, not on every end: that was a pass over a day of ended sessions per
            # DELETE (seconds of master time per second at a hundred session ends a second).
            self.ended.prune()

    def _owner(self, tag: str) -> Proc | None:
        """`<host id>w<slot><lane>` -> the live process in that lane of this host."""
        match = _TAG.fullmatch(tag)
        if match is None or match["host"] != self.master.host_id:
            return None
        slot, lane = int(match["slot"]), "ab".index(match["lane"])
        if slot >= len(self.master.slots):
            return None
        return next((p for p in self.master.slots[slot].processes() if p.lane == lane), None)


def _bound(table: OrderedDict[str, Any]) -> None:
    while len(table) > MAX_TABLE_ENTRIES:
        table.popitem(last=False)
