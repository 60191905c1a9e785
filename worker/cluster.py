"""This worker's membership in the cluster: events in, events out, messages routed to their owner.

Why this mechanism (and not a shared session store): a session id is a signed token any worker can
validate alone (sessions.py), so the only state that must be shared is small and changes rarely: log
levels, resource subscriptions, ended sessions, cache invalidations and change notifications. Those
travel as events through the master's shared-memory ring (mcpherd.shared.events), applied by every
worker, acknowledged before the call that caused them returns. What cannot be copied, because it is
tied to one process (a server-to-client request awaiting its answer, the event log of a stream),
stays with the worker that owns it, and ids name that owner (`w<slot><lane>-...`): a client's answer
that lands elsewhere is forwarded to the owner, and a resumption (GET with Last-Event-ID) hands the
whole TCP connection to the owner with SCM_RIGHTS, so the owner replays and keeps streaming.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from mcpherd.shared import control, events, layout

if TYPE_CHECKING:
    from mcpherd.worker.server import Worker

log = logging.getLogger("mcpherd.worker")


class Cluster:
    def __init__(self, worker: Worker, channel: socket.socket | None, segment: layout.Segment | None,
                 tag: str) -> None:
        self.worker = worker
        self.channel = channel
        self.ring = events.Ring(segment.ring) if segment is not None else None
        self.cell = worker.cell
        self.tag = tag
        self.loop = asyncio.get_running_loop()
        self.applied = self.ring.write_seq if self.ring is not None else 0  # a new worker's cache is cold
        self.waiting: dict[int, asyncio.Future[bool]] = {}
        self.ids = itertools.count(1)
        self.on_propagation: Callable[[float], None] | None = None
        self.sender = control.Sender.on_loop(self.loop, channel) if channel is not None else None
        self.receiver = control.Receiver(channel) if channel is not None else None
        self._set_applied(self.applied)

    @property
    def standalone(self) -> bool:
        return self.channel is None or self.ring is None

    def start(self, tool_names: list[str]) -> None:
        if self.channel is None:
            return
        self.channel.setblocking(False)
        self.loop.add_reader(self.channel.fileno(), self._readable)
        self._send(control.Hello(tool_names))

    # -- outgoing ------------------------------------------------------------------------------
    def publish(self, event: Any, wait: bool = True, l2: bool = False) -> asyncio.Future[bool]:
        """Publish to every worker (this one included); resolves once all applied it. `l2`: an Invalidate
        whose shared L2 entries this worker could not delete (the master has them deleted first)."""
        done: asyncio.Future[bool] = self.loop.create_future()
        if self.standalone:
            self.apply(event, 0)
            done.set_result(True)
            return done
        request_id = next(self.ids)
        assert self.channel is not None
        if not self._send(control.Publish(request_id, events.encode(event), wait, l2)):
            self.apply(event, 0)  # the master is gone: at least this worker stays correct
            done.set_result(False)
            return done
        if wait:
            self.waiting[request_id] = done
        else:
            done.set_result(True)
        return done

    def owns(self, identifier: str) -> bool:
        return identifier.split("-", 1)[0] == self.tag

    def forward(self, owner: str, payload: bytes) -> bool:
        return self._send(control.Forward(owner, payload))

    def handoff(self, owner: str, request: bytes, fd: int) -> bool:
        """Not queued: the caller closes its copy of the fd as soon as this returns."""
        return self.channel is not None and self.sender is not None and not self.sender.waiting and \
            control.send(self.channel, control.Handoff(owner, request), fd)

    def _send(self, message: Any) -> bool:
        """To the master, in order; what does not fit in the channel waits (control.Sender)."""
        return self.sender is not None and self.sender.send(message)

    # -- incoming ------------------------------------------------------------------------------
    def _readable(self) -> None:
        assert self.channel is not None
        while True:
            try:
                assert self.receiver is not None
                received = self.receiver.receive()
            except BlockingIOError:
                return
            except (ValueError, OSError) as exc:
                log.error("control channel: %s", exc)
                return
            if received is None:  # the master is gone: stop like a graceful stop
                self.loop.remove_reader(self.channel.fileno())
                self.worker.command(control.Stop())
                return
            self._dispatch(*received)

    def _dispatch(self, message: Any, fd: int | None) -> None:
        if isinstance(message, control.Wake):
            self.apply_until(message.seq)
        elif isinstance(message, control.Published):
            waiter = self.waiting.pop(message.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message.complete)
        elif isinstance(message, control.Snapshot):
            self.worker.endpoint.sessions.load_tables(message.log_levels, message.subscriptions, message.ended,
                                                      message.revoked_before)
            self.trust_redis(message.redis_trusted)
            self.apply_until(max(message.seq, self.ring.write_seq if self.ring else 0))
        elif isinstance(message, control.Deliver):
            self.worker.endpoint.deliver_forwarded(message.payload)
        elif isinstance(message, control.Adopt) and fd is not None:
            self.worker.adopt(fd, message.request)
        else:
            self.worker.command(message)

    def apply_until(self, seq: int) -> None:
        if self.ring is None or seq <= self.applied:
            return
        entries, complete = self.ring.read(self.applied, seq)
        if not complete:
            log.warning("fell behind the cluster event ring: dropping the whole cache")
            self.worker.cache.invalidate(all=True)
        now = time.monotonic_ns()
        for _seq, published_ns, payload in entries:
            try:
                event = events.decode(payload)
            except msgspec.DecodeError:  # a kind of event from a newer master (SIGUSR2 upgrade): not ours
                log.warning("ignored a cluster event this worker's version does not know")
                continue
            self.apply(event, now - published_ns)
        self._set_applied(seq)
        self._send(control.Applied(seq))

    def apply(self, event: Any, latency_ns: int) -> None:
        endpoint = self.worker.endpoint
        if isinstance(event, events.Invalidate):
            self.worker.cache.invalidate(event.key, event.tag_, event.prefix, event.all)
        elif isinstance(event, events.ResourceUpdated):
            endpoint.broadcast("notifications/resources/updated", {"uri": event.uri}, event.uri)
        elif isinstance(event, events.ListChanged):
            endpoint.broadcast(f"notifications/{event.kind}/list_changed", {})
        elif isinstance(event, events.SetLogLevel):
            endpoint.sessions.set_log_level(event.session, event.level)
        elif isinstance(event, events.Subscribe):
            endpoint.sessions.set_subscription(event.session, event.uri, event.on)
        elif isinstance(event, events.SessionEnded):
            endpoint.sessions.ended(event.session, event.nonce, event.expires)
        elif isinstance(event, events.RedisTrust):
            self.trust_redis(event.trusted)
        if latency_ns and self.on_propagation is not None:
            self.on_propagation(latency_ns / 1e9)

    def trust_redis(self, trusted: bool) -> None:
        if self.worker.l2 is not None:
            self.worker.l2.suspended = not trusted

    def _set_applied(self, seq: int) -> None:
        self.applied = seq
        if self.cell is not None:
            self.cell.set(layout.F_EVENTS_APPLIED, seq)
