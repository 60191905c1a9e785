"""The master's side of the Redis bridge: keeps the bridge process alive and routes its messages.

Without a Redis URL none of this runs and the cluster is one host. With one, every event raised on
this host goes out (Outbound), every event from another host comes into this host's ring (Inbound,
never sent out again), answers for processes on other hosts travel through their host channel, and
the bridge's view of Redis (up or down) becomes a log line on each change and mcpherd_redis_up, and
its recent PING round trips mcpherd_redis_ping_seconds.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mcpherd.shared import control, events
from mcpherd.supervisor import bridge
from mcpherd.supervisor.spawn import fork_bridge

if TYPE_CHECKING:
    from mcpherd.supervisor.master import Master

log = logging.getLogger("mcpherd.master")
RESPAWN_DELAY_S = 1.0


class RedisLink:
    def __init__(self, master: Master, host: str) -> None:
        self.master = master
        self.host = host
        self.config = master.config.redis
        self.pid = 0
        self.channel: Any = None
        self.sender: control.Sender | None = None  # to the bridge, in order; waits while the channel is full
        self.receiver: control.Receiver | None = None
        self.killed = 0  # the bridge pid last killed for not reading its channel
        self.up = False
        self.was_down = False
        self.ping_s: float | None = None  # the slowest recent PING, once the bridge measured one
        self.workers_trust = False  # the last events.RedisTrust published: may workers use the L2 cache
        self.resyncs = 0  # a resynchronisation's trust is void once another outage began
        self.respawn_at = 0.0
        self.ids = itertools.count(1)
        self.l2_waiters: dict[int, Callable[[bool], None]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.config.url)

    def start(self) -> None:
        master_end, bridge_end = control.channel()
        from mcpherd.supervisor.master import _log_fds

        run = functools.partial(bridge.run, bridge_end, self.config.url, self.config.key_prefix, self.host,
                                self.config.socket_timeout, self.config.connect_timeout, self.config.max_entry_bytes)
        self.pid = fork_bridge(bridge_end, frozenset(_log_fds()), run)
        bridge_end.close()
        self.channel = master_end
        self.sender = control.Sender(master_end, self._watch)
        self.receiver = control.Receiver(master_end)
        self.master.selector.register(master_end, selectors.EVENT_READ, self._ready)
        log.info("redis bridge %d started (host id %s)", self.pid, self.host)

    def tick(self, now: float) -> None:
        if self.enabled and not self.pid and not self.master.stopping_since and now >= self.respawn_at:
            self.start()

    def reaped(self, pid: int, how: str) -> bool:
        if pid != self.pid or not pid:
            return False
        log.error("redis bridge %d exited (%s); restarting it in %gs", pid, how, RESPAWN_DELAY_S)
        self._close_channel()
        self.pid = 0
        self.respawn_at = time.monotonic() + RESPAWN_DELAY_S
        self._set_up(False, "bridge restarting")
        for answer in self.l2_waiters.values():
            answer(False)
        self.l2_waiters.clear()
        return True

    def stop(self) -> None:
        if self.pid and (self.sender is None or not self.sender.send(control.Stop())):
            self._signal(signal.SIGTERM)  # no channel to ask through: the signal asks instead

    def _signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    # -- outgoing ------------------------------------------------------------------------------
    # The channel holds a few hundred small messages (control.Sender): a burst while the bridge is
    # descheduled would lose the rest, and a lost Outbound is an invalidation other hosts never see.
    # What does not fit waits in `sender` and leaves, in order, when the selector reports room.
    def _send(self, message: control.Message) -> bool:
        if self.sender is None:
            return False
        if self.sender.send(message):
            return True
        self._hung(type(message).__name__)
        return False

    def _watch(self, writable: bool) -> None:
        """The selector reports room in the channel only while something waits to be sent."""
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        try:
            self.master.selector.modify(self.channel, mask, self._ready)
        except (KeyError, ValueError):  # unregistered: the channel is closing
            pass

    def _ready(self) -> None:
        if self.sender is not None and self.sender.waiting:
            self.sender.drain()
        self._readable()

    def outbound(self, payload: bytes) -> None:
        self._send(control.Outbound(payload))

    def _hung(self, what: str) -> None:
        """The bridge stopped reading (thousands of messages wait) or its channel broke: what was meant for
        Redis and the other hosts is lost. Restart it, as a hung worker is: its return ends an outage, so
        every host's cache is dropped (the resynchronisation) and nothing stale survives the loss."""
        if self.pid and self.killed != self.pid:  # once: every later send fails the same way until reaped
            self.killed = self.pid
            log.error("redis bridge %d is not reading its channel or is gone (%s could not be queued); killing it",
                      self.pid, what)
            self._signal(signal.SIGKILL)

    def forward(self, owner: str, payload: bytes) -> bool:
        """An answer for a process on another host (its tag starts with that host's id)."""
        host = owner[:8]
        if self.channel is None or host == self.host:
            return False
        return self._send(control.RemoteForward(host, owner, payload))

    def invalidate_l2(self, event: events.Invalidate, answer: Callable[[bool], None]) -> None:
        """Delete the shared L2 entries first, so no host refills its L1 from them afterwards.

        Tried even while Redis is not relied on: a slow Redis may still take the delete, and then no
        worker reads the stale entry back meanwhile (an unreachable one costs the L2 client's back-off).
        """
        if self.channel is None:
            answer(False)
            return
        request_id = next(self.ids)
        self.l2_waiters[request_id] = answer
        if not self._send(control.L2Invalidate(request_id, events.encode(event))):
            self.l2_waiters.pop(request_id)(False)

    # -- incoming ------------------------------------------------------------------------------
    def _readable(self) -> None:
        while self.channel is not None and self.receiver is not None:
            try:
                received = self.receiver.receive()
            except BlockingIOError:
                return
            except (ValueError, OSError) as exc:
                log.error("redis bridge channel: %s", exc)
                return
            if received is None:
                self._close_channel()
                return
            self._dispatch(received[0])

    def _dispatch(self, message: Any) -> None:
        bus = self.master.bus
        if isinstance(message, control.Inbound):
            bus.publish_remote(message.event)
        elif isinstance(message, control.RemoteDeliver):
            bus.deliver(message.owner, message.payload)
        elif isinstance(message, control.L2Done):
            answer = self.l2_waiters.pop(message.request_id, None)
            if answer is not None:
                answer(message.ok)
        elif isinstance(message, control.RedisState):
            self._set_up(message.up, message.detail)
        elif isinstance(message, control.RedisPing):
            self.ping_s = message.slowest_s

    def _set_up(self, up: bool, detail: str) -> None:
        if up == self.up and (up or self.was_down):  # "down" from the start is an outage too
            return
        self.up = up
        if not up:
            self.was_down = True
            self.resyncs += 1
            self._trust(False)
            log.warning("Redis is unreachable or too slow to rely on (%s): cache, invalidations and sessions "
                        "are host-local until it answers in time again; tool calls go on", detail)
            return
        log.info("Redis is reachable (%s)", detail)
        if not self.was_down:
            self._trust(True)
            return
        # Invalidations raised during the outage reached neither L2 (left stale for every host) nor the
        # hosts that were subscribed: empty L2, then every L1 on every host. A cold cache is never stale.
        # Workers use L2 again only after that, and only if Redis did not fail again meanwhile.
        log.info("resynchronising after the Redis outage: dropping every cached result (L2, every host's L1)")
        self.resyncs += 1
        resync = self.resyncs

        def resynchronised(_seq: int, _complete: bool) -> None:
            if resync == self.resyncs and self.up:
                self._trust(True)
        self.master.bus.publish_from_master(events.Invalidate(all=True), resynchronised)

    def _trust(self, trusted: bool) -> None:
        """Tell this host's workers whether to read and fill L2 (an event of this host's ring only)."""
        if trusted != self.workers_trust:
            self.workers_trust = trusted
            self.master.bus.publish_local(events.RedisTrust(trusted))

    def _close_channel(self) -> None:
        if self.channel is not None:
            try:
                self.master.selector.unregister(self.channel)
            except (KeyError, ValueError):
                pass
            self.channel.close()
            self.channel = None
            self.sender = None  # what waited for the bridge is lost with it: its return resynchronises
            self.receiver = None
