"""Resumable streams across hosts: with Redis configured, each event of a handshake-era stream is also
appended to a Redis stream, so a client that reconnects (GET + Last-Event-ID) to *another host*
gets the events it missed and the rest as they come.

Within one host the connection is handed to the owning worker instead (streamable.py), which is
cheaper; this path is only for a stream whose owner is on another host (or gone). Keys are
`<prefix>stream:<hash of the session token>:<stream id>`, so a stream can only be read with the
session that owns it; each is capped (MAXLEN ~1024, like the in-memory log) and expires an hour
after its last event. Appends are fire-and-forget: a slow or absent Redis never delays an event.

A replay follows its stream with XREAD BLOCK, which holds a connection and waits up to BLOCK_MS: it
reads on clients of its own (`reader`), whose timeout is past the block, and not on the L2 cache's
pool, whose 0.25 s timeout would end every quiet stream a quarter of a second after it went quiet.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mcpherd.worker.sessions import MAX_LOG_EVENTS
from mcpherd.worker.sse import EventStream

log = logging.getLogger("mcpherd.worker")
KEEP_S = 3600
BLOCK_MS = 15_000
READ_SLACK_S = 5.0  # an XREAD not answered this long after its block ended: Redis is gone, end the replay


def reader_for(url: str, connect_timeout: float, name: str) -> Any:
    """The client replays read with: one connection per following replay (at most redis-py's 100 per
    worker; past that a resumption ends with a warning and the client retries)."""
    return aioredis.from_url(url, socket_timeout=BLOCK_MS / 1000 + READ_SLACK_S,
                             socket_connect_timeout=connect_timeout, client_name=name)


class StreamMirror:
    def __init__(self, client: Any, prefix: str, reader: Any) -> None:
        self.client = client  # appends: short, on the L2 cache's pool
        self.reader = reader  # replays (reader_for)
        self.prefix = prefix
        self.loop = asyncio.get_running_loop()
        self.last_append: dict[str, asyncio.Task[None]] = {}  # per key: appends must land in order

    def key(self, token: str, stream_id: str) -> str:
        return f"{self.prefix}stream:{hashlib.sha256(token.encode()).hexdigest()[:24]}:{stream_id}"

    def record(self, token: str, stream_id: str, seq: int, data: bytes | None) -> None:
        """Append one event (data None: the stream is complete)."""
        fields = {"s": seq, "d": data} if data is not None else {"s": seq, "done": 1}
        key = self.key(token, stream_id)
        task = self.loop.create_task(self._append(key, fields, self.last_append.get(key)))
        self.last_append[key] = task
        task.add_done_callback(lambda done: self.last_append.pop(key) if self.last_append.get(key) is done else None)

    async def _append(self, key: str, fields: dict[str, Any], previous: asyncio.Task[None] | None) -> None:
        # Concurrent appends go out on different pooled connections and may land out of order: the
        # end marker before the result would end a resumed stream without it. So each waits for the last.
        if previous is not None:
            await asyncio.wait([previous])
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(key, fields, maxlen=MAX_LOG_EVENTS, approximate=True)
                pipe.expire(key, KEEP_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("stream mirror append failed: %s", exc)

    async def replay(self, token: str, stream_id: str, after: int, stream: EventStream) -> None:
        """Send the client every event after `after`, then follow the stream until it completes.

        The copy keeps about the last 1,024 events, and an append that failed is not in it: what the
        client then misses is logged, as the owner does when it replays (streamable.py)."""
        key, last, expected = self.key(token, stream_id), "0", after + 1
        try:
            while not stream.closed:
                found = await self.reader.xread({key: last}, count=256, block=BLOCK_MS)
                if not found:
                    stream.comment()  # quiet stream: keep proxies from timing out the connection
                    continue
                for entry_id, fields in found[0][1]:
                    last = entry_id
                    seq = int(fields[b"s"])
                    if b"done" in fields:
                        stream.end()
                        return
                    if seq > after:
                        if seq > expected:
                            log.info("resuming stream %s from Redis after event %d: %d events before %d are not in "
                                     "its copy (%d kept per stream); the client gets the rest",
                                     stream_id, expected - 1, seq - expected, seq, MAX_LOG_EVENTS)
                        expected = seq + 1
                        stream.send(fields[b"d"], f"{stream_id}.{seq}")
        except (RedisError, OSError) as exc:
            log.warning("resuming stream %s from Redis failed: %s", stream_id, exc)
            stream.end()
        except (KeyError, ValueError, TypeError) as exc:  # an entry some other writer put under our key
            log.warning("resuming stream %s from Redis: an entry mcpherd did not write (%s: %s); ending it",
                        stream_id, type(exc).__name__, exc)
            stream.end()
