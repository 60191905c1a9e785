"""The Redis bridge: one process per host that connects this host's cluster to the others.

Why a process and not code in the master: the master's loop must never wait on the network, and it
runs no threads. The bridge is forked like a worker, talks to the master over a control channel
(shared/control.py: Outbound, Inbound, RemoteForward, RemoteDeliver, L2Invalidate, RedisState) and
holds the host's single Redis subscription, so N workers cost Redis one subscriber per host.

Channels (payloads msgpack):
    <prefix>events        [origin host id, event]   every cluster event raised on any host
    <prefix>host:<id>     [owner tag, payload]      a client's answer for a process on host <id>

When Redis goes away the bridge reports it (the master logs one warning and exports
mcpherd_redis_up 0), retries with exponential back-off and jitter, and on reconnecting reports it
again: the master then drops every L1 cache on the host, because invalidations published while the
subscription was down are lost (pub/sub keeps nothing).

A Redis that is alive but slow loses events just the same: a publish or an L2 delete that misses its
timeout is gone, though the subscription never broke. So "up" means more than subscribed: `Health`
also turns it down when a write to Redis fails or PINGs keep missing the timeout, and back up only
after PINGs come back on time again. Going down and up is what makes the master resynchronise, so an
event lost to a slow Redis costs a cold cache, never a stale one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import RedisError

from mcpherd.shared import control, events
from mcpherd.shared.l2 import L2Cache

log = logging.getLogger("mcpherd.redis")
RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 10.0
HEALTH_INTERVAL_S = 1.0  # PING the subscription this often
HEALTH_TIMEOUT_S = 3.0  # a subscription that heard nothing (not even a PONG) for this long is dead
PUBLISH_BATCH = 512  # messages per pipelined round trip
SLOW_WINDOW = 10  # PINGs remembered (one a second)
SLOW_PINGS = 3  # late PINGs within the window that make Redis too slow to rely on
ON_TIME_PINGS = 3  # consecutive on-time PINGs that make it reliable again
IGNORED_REASONS_MAX = 64  # distinct reasons for dropping a message from Redis that get their own warning


@dataclass
class Health:
    """Whether this host can rely on Redis, from what the bridge observes (pure: no I/O, no clock).

    One late PING is a hiccup (the bridge itself may have been descheduled); SLOW_PINGS late ones in
    the last SLOW_WINDOW are a slow Redis. A failed write is decisive at once: something was lost.
    Trust returns after ON_TIME_PINGS in a row, with a clean window, so a flapping Redis is not
    trusted again on one good answer.
    """

    timeout_s: float  # the Redis calls' own timeout: slower than this, they fail
    trusted: bool = True
    on_time: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=SLOW_WINDOW))

    def pinged(self, seconds: float) -> str | None:
        """A PING's round trip; returns why trust was lost or regained by it, if it was."""
        self.recent.append(seconds)
        late = seconds > self.timeout_s
        self.on_time = 0 if late else self.on_time + 1
        if self.trusted and late and self._late() >= SLOW_PINGS:
            return self._distrust()
        if not self.trusted and self.on_time >= ON_TIME_PINGS:
            self.trusted = True
            self.recent.clear()
            return f"{ON_TIME_PINGS} PINGs in a row answered within {self.timeout_s * 1000:g} ms"
        return None

    def write_failed(self) -> bool:
        """A publish or an L2 delete missed: True if that lost our trust just now."""
        if not self.trusted:
            return False
        self._distrust()
        return True

    def _distrust(self) -> str:
        self.trusted = False
        self.on_time = 0
        return (f"{self._late()} of the last {len(self.recent)} PINGs took longer than {self.timeout_s * 1000:g} ms "
                f"(slowest {self.slowest_s * 1000:,.0f} ms)")

    def _late(self) -> int:
        return sum(1 for s in self.recent if s > self.timeout_s)

    @property
    def slowest_s(self) -> float:
        return max(self.recent, default=0.0)


class Bridge:
    def __init__(self, channel: socket.socket, url: str, prefix: str, host: str, timeout: float,
                 connect_timeout: float, max_entry_bytes: int) -> None:
        self.channel = channel
        self.host = host
        self.prefix = prefix
        name = f"mcpherd-bridge-{host}-{os.getpid()}"  # in CLIENT LIST, with the role of each connection
        self.client = aioredis.from_url(url, socket_timeout=None, socket_connect_timeout=connect_timeout,
                                        client_name=f"{name}-subscriber")
        self.publisher = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout,
                                           client_name=f"{name}-publisher")
        self.l2 = L2Cache(url, prefix, timeout, connect_timeout, max_entry_bytes, name=f"{name}-l2")
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.up: bool | None = None
        self.subscribed = False
        self.health = Health(timeout)
        self.pings: deque[float] = deque()  # when each unanswered PING left (answers come in order)
        self.outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.sender = control.Sender.on_loop(self.loop, channel)  # a burst of remote events must not be lost
        self.receiver = control.Receiver(channel)
        self.ignored: set[str] = set()  # why messages from Redis were dropped (each warned about once)

    async def run(self) -> None:
        self.channel.setblocking(False)
        self.loop.add_reader(self.channel.fileno(), self._readable)
        tasks = [self.loop.create_task(self._listen()), self.loop.create_task(self._publish_in_order())]
        await self.stopping.wait()
        for task in tasks:
            task.cancel()

    # -- Redis -> master -----------------------------------------------------------------------
    async def _listen(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(f"{self.prefix}events", f"{self.prefix}host:{self.host}")
                self.l2.down_until = 0.0  # Redis answers again: the resynchronisation's L2 flush must not wait
                self.subscribed = True
                self._state(self.health.trusted, "subscribed")
                attempt = 0
                await self._receive(pubsub)
            except (RedisError, OSError) as exc:
                self._state(False, f"{type(exc).__name__}: {exc}")
            finally:
                self.subscribed = False
                self.pings.clear()
                await _discard(pubsub)
            attempt += 1
            delay = min(RECONNECT_MAX_S, RECONNECT_INITIAL_S * 2 ** min(attempt, 10))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _receive(self, pubsub: Any) -> None:
        """Messages until the connection fails or falls silent: a hung Redis or a partition closes
        nothing, so the subscription is PINGed and must hear something within HEALTH_TIMEOUT_S."""
        heard = pinged = self.loop.time()
        while True:
            message = await pubsub.get_message(timeout=HEALTH_INTERVAL_S)
            now = self.loop.time()
            if message is not None:
                heard = now
                if message.get("type") == "message":
                    self._inbound(message["channel"], message["data"])
                elif message.get("type") == "pong" and self.pings:
                    self._pinged(time.monotonic() - self.pings.popleft())
            if now - heard > HEALTH_TIMEOUT_S:
                raise TimeoutError(f"no answer from Redis for {now - heard:.1f}s")
            if now - pinged >= HEALTH_INTERVAL_S:
                pinged = now
                self.pings.append(time.monotonic())
                await pubsub.ping()

    def _pinged(self, seconds: float) -> None:
        changed = self.health.pinged(seconds)
        self.sender.send(control.RedisPing(self.health.slowest_s))
        if changed is not None:
            self._state(self.subscribed and self.health.trusted, changed)

    def _write_failed(self, what: str) -> None:
        """Something meant for other hosts is lost: down now, so that coming back up resynchronises."""
        if self.health.write_failed():
            self._state(False, what)

    def _inbound(self, channel: bytes, data: bytes) -> None:
        try:
            first, second = msgspec.msgpack.decode(data)
            if not isinstance(first, str) or not isinstance(second, bytes):
                raise TypeError("expected [host, payload]")
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            self._ignored(channel, f"{type(exc).__name__}: {exc}")
            return
        if channel.endswith(b":events"):
            if first == self.host:
                return  # our own events are already in our ring
            # What this host cannot apply must not reach its master or workers, where it would fail
            # their decoders: an event kind from a newer mcpherd mid rolling upgrade, or anything else.
            if len(second) > events.MAX_PAYLOAD:  # no host publishes one: it would overrun its ring entry
                self._ignored(channel, f"from host {first}: an event of more than {events.MAX_PAYLOAD} bytes")
                return
            try:
                event = events.decode(second)
            except (msgspec.DecodeError, TypeError, RecursionError) as exc:
                self._ignored(channel, f"from host {first}: {exc}")
                return
            if isinstance(event, events.RedisTrust):  # host-local: never published, so not a host's
                self._ignored(channel, f"from host {first}: a host-local {type(event).__name__} event")
                return
            self.sender.send(control.Inbound(second))
        else:
            self.sender.send(control.RemoteDeliver(first, second))

    def _ignored(self, channel: bytes, reason: str) -> None:
        """One warning per distinct reason (a newer host publishes many of the same), a bounded set of them."""
        if reason not in self.ignored and len(self.ignored) < IGNORED_REASONS_MAX:
            self.ignored.add(reason)
            log.warning("ignored a message on Redis channel %s that this host cannot decode (a newer mcpherd "
                        "on another host?): %s", channel.decode(errors="replace"), reason[:300])

    def _state(self, up: bool, detail: str) -> None:
        if up != self.up:
            self.up = up
            self.sender.send(control.RedisState(up, detail))

    # -- master -> Redis -----------------------------------------------------------------------
    def _readable(self) -> None:
        while True:
            try:
                received = self.receiver.receive()
            except BlockingIOError:
                return
            except (ValueError, OSError):
                return
            if received is None or isinstance(received[0], control.Stop):
                self.loop.remove_reader(self.channel.fileno())
                self.stopping.set()
                return
            self.loop.create_task(self._handle(received[0]))

    async def _handle(self, message: Any) -> None:
        if isinstance(message, control.Outbound):
            self.outbox.put_nowait((f"{self.prefix}events", msgspec.msgpack.encode([self.host, message.event])))
        elif isinstance(message, control.RemoteForward):
            payload = msgspec.msgpack.encode([message.owner, message.payload])
            self.outbox.put_nowait((f"{self.prefix}host:{message.host}", payload))
        elif isinstance(message, control.L2Invalidate):
            event = events.decode(message.event)
            ok = await self.l2.invalidate(event.key, event.tag_, event.prefix, event.all)
            if not ok:
                self._write_failed("deleting invalidated entries from the L2 cache failed")
            self.sender.send(control.L2Done(message.request_id, ok))

    async def _publish_in_order(self) -> None:
        """The only publisher. A task per message would take a pooled connection each: a burst past the
        pool's limit (100) fails outright, losing events, and the rest may reach Redis out of order."""
        while True:
            batch = [await self.outbox.get()]
            while not self.outbox.empty() and len(batch) < PUBLISH_BATCH:
                batch.append(self.outbox.get_nowait())
            try:
                async with self.publisher.pipeline(transaction=False) as pipe:
                    for channel, data in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                self._write_failed(f"publishing {len(batch)} messages failed: {type(exc).__name__}: {exc}")


async def _discard(pubsub: Any) -> None:
    """Close a subscription without waiting on a Redis that may not answer."""
    try:
        await asyncio.wait_for(pubsub.aclose(), HEALTH_INTERVAL_S)
    except (RedisError, OSError, asyncio.TimeoutError):
        pass


def run(channel: socket.socket, url: str, prefix: str, host: str, timeout: float, connect_timeout: float,
        max_entry_bytes: int) -> int:
    async def main() -> None:
        await Bridge(channel, url, prefix, host, timeout, connect_timeout, max_entry_bytes).run()

    uvloop.run(main())
    return 0


def agree_on_secret(url: str, prefix: str, connect_timeout: float) -> bytes | None:
    """The cluster secret every host shares: the first host to start sets it, the others read it."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=connect_timeout, socket_connect_timeout=connect_timeout)
    try:
        key = f"{prefix}secret"
        client.set(key, os.urandom(32).hex(), nx=True)
        value = client.get(key)
        text = value.decode() if isinstance(value, bytes) else value
        return bytes.fromhex(text) if text else None
    except (RedisError, OSError, ValueError) as exc:
        log.warning("cannot agree on the cluster secret through Redis (%s): sessions and request states "
                    "are valid on this host only until it restarts with Redis reachable", exc)
        return None
    finally:
        client.close()
