"""The L2 cache in Redis, shared by every host: tool results under `<prefix>cache:<key>` with their TTL,
and one set per tag (`<prefix>tag:<tag>`) naming the keys that carry it, so tag invalidation is exact.

Redis is never on the critical path of correctness or availability: every operation has a short
timeout, a failure answers "miss" (the tool computes), and after a failure the client leaves Redis
alone for a back-off period (with jitter) instead of paying the timeout on every call.
Used by workers (read-through, write-behind) and by the Redis bridge (invalidation from the admin).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("mcpherd.redis")
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 15.0


class L2Cache:
    def __init__(self, url: str, prefix: str, timeout: float, connect_timeout: float, max_entry_bytes: int,
                 max_connections: int = 32, name: str = "mcpherd") -> None:
        # A bounded pool that makes a burst wait for a connection (at most `timeout`): a worker answering
        # hundreds of cache misses in one loop turn would otherwise open a connection per miss, N workers
        # times H hosts of them, and past the pool's limit each one fails and sends the worker into its
        # back-off. `name` shows in CLIENT LIST, so an operator can tell which process holds what.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=connect_timeout, health_check_interval=0, retry_on_timeout=False,
            client_name=name)
        self.client = aioredis.Redis.from_pool(pool)
        self.prefix = prefix
        self.timeout = timeout
        self.max_entry_bytes = max_entry_bytes
        self.down_until = 0.0
        self.failures = 0
        self.suspended = False  # the host does not rely on Redis (events.RedisTrust): no reads, no fills

    def _key(self, key: str) -> str:
        return f"{self.prefix}cache:{key}"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    async def get(self, key: str) -> Any | None:
        if self.suspended or not self.available:
            return None
        try:
            data = await asyncio.wait_for(self.client.get(self._key(key)), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            return None
        self._succeeded()
        if not isinstance(data, bytes):
            return None
        try:
            value = msgspec.msgpack.decode(data)
        except (msgspec.DecodeError, RecursionError):
            value = None
        if not isinstance(value, dict):  # every entry is a tool result: anything else was not written by us
            log.warning("ignored L2 cache entry %s: not a tool result written by mcpherd", self._key(key))
            return None
        return value

    async def put(self, key: str, value: Any, ttl: float, tags: tuple[str, ...]) -> None:
        data = msgspec.msgpack.encode(value)
        if self.suspended or not self.available or len(data) > self.max_entry_bytes or ttl <= 0:
            return
        milliseconds = max(1, int(ttl * 1000))
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self._key(key), data, px=milliseconds)
                for tag in tags:
                    pipe.sadd(f"{self.prefix}tag:{tag}", key)
                    # GT alone never sets a TTL on a new set (no TTL counts as infinite): NX sets the first.
                    pipe.pexpire(f"{self.prefix}tag:{tag}", milliseconds, nx=True)
                    pipe.pexpire(f"{self.prefix}tag:{tag}", milliseconds, gt=True)
                await asyncio.wait_for(pipe.execute(), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            return
        self._succeeded()

    async def invalidate(self, key: str | None, tag: str | None, prefix: str | None, all: bool) -> bool:
        """Delete the matching entries; False when Redis could not be reached (L1 still drops them)."""
        if not self.available:
            return False
        try:
            # A key or a tag is two round trips; a prefix or all is a SCAN of the keyspace: only that
            # one gets the longer bound, so a frozen Redis costs an invalidating tool call ~1 s, not 2.
            bound = max(1.0, self.timeout * (8 if prefix or all else 4))
            await asyncio.wait_for(self._invalidate(key, tag, prefix, all), bound)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return True

    async def _invalidate(self, key: str | None, tag: str | None, prefix: str | None, all: bool) -> None:
        doomed: list[str] = []
        if key:
            doomed.append(self._key(key))
        if tag:
            members = await self.client.smembers(f"{self.prefix}tag:{tag}")
            doomed += [self._key(m.decode() if isinstance(m, bytes) else m) for m in members]
            doomed.append(f"{self.prefix}tag:{tag}")
        if prefix or all:
            pattern = self._key(_glob_escape(prefix or "")) + "*"
            async for found in self.client.scan_iter(match=pattern, count=1000):
                doomed.append(found.decode() if isinstance(found, bytes) else found)
        for start in range(0, len(doomed), 500):
            await self.client.delete(*doomed[start:start + 500])

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(self.failures - 1, 10))
        self.down_until = time.monotonic() + delay * random.uniform(0.5, 1.0)
        if self.failures == 1:
            # Info, not a warning: the host's one warning per outage is the master's (redis_link.py),
            # which N workers repeating it would drown.
            log.info("L2 cache unreachable from this worker (%s: %s): serving from L1 and computation",
                     type(exc).__name__, exc)

    def _succeeded(self) -> None:
        if self.failures:
            log.info("Redis reachable again")
        self.failures = 0

    async def close(self) -> None:
        await self.client.aclose()


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
