"""An asyncio load client for the supervisor's chaos test: keep-alive and new connections calling
tools/call echo over raw HTTP/1.1, every request counted exactly once, every failure classified with
the client port and connect time of its connection (so that a kill snapshot can explain it)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from supervisor_support import echo_request, echoed


@dataclass
class Failure:
    kind: str  # reset, eof, timeout, refused, bad-response, ...
    port: int  # the client-side port of its connection (0: the connect itself failed)
    connected_at: float  # monotonic, taken before connect(): a later snapshot may hold the connection
    reused: bool  # the connection had already answered a request
    detail: str
    failed_at: float = field(default_factory=time.monotonic)


@dataclass
class KillSnapshot:
    pid: int
    taken_at: float  # monotonic, while the worker was stopped, before SIGKILL
    client_ports: set[int]


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    connected_at: float
    port: int


@dataclass
class LoadClient:
    """Keep-alive and new-connection echo traffic; every request counted exactly once."""

    port: int
    keepalive: int = 16
    fresh: int = 6
    timeout: float = 25.0
    sent: int = 0
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        loops = [self._keepalive_loop(stop) for _ in range(self.keepalive)]
        await asyncio.gather(*loops, *(self._fresh_loop(stop) for _ in range(self.fresh)))

    async def _connect(self) -> Connection:
        started = time.monotonic()
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), self.timeout)
        return Connection(reader, writer, started, writer.get_extra_info("sockname")[1])

    async def _exchange(self, conn: Connection, text: str, close: bool) -> bool:
        """One request and its answer; True if the connection stays open. Raises on any failure."""
        conn.writer.write(echo_request(self.port, text, close))
        head = await conn.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        body = await conn.reader.readexactly(int(headers.get("content-length", "0")))
        if echoed(int(status_line.split()[1]), body) != text:
            raise ValueError(f"wrong answer to {text}: {body[:200]!r}")
        return headers.get("connection", "").lower() != "close" and not close

    async def _request(self, conn: Connection | None, close: bool) -> Connection | None:
        """One request on `conn` (on a new connection if None); the connection to reuse, or None."""
        self.sent += 1
        text = f"r{self.sent}"
        reused, started = conn is not None, time.monotonic()
        keep = False
        try:
            conn = conn or await self._connect()
            keep = await asyncio.wait_for(self._exchange(conn, text, close), self.timeout)
            self.ok += 1
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.failures.append(Failure(_kind(exc), conn.port if conn else 0,
                                         conn.connected_at if conn else started, reused, repr(exc)))
        if not keep and conn is not None:
            conn.writer.close()
            return None
        return conn

    async def _keepalive_loop(self, stop: asyncio.Event) -> None:
        conn = None
        while not stop.is_set():
            conn = await self._request(conn, close=False)
        if conn is not None:
            conn.writer.close()

    async def _fresh_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._request(None, close=True)

    def unexplained(self, snapshots: list[KillSnapshot]) -> list[Failure]:
        """Failures not explained by a SIGKILL of the worker that had accepted their connection."""
        def explained(f: Failure) -> bool:
            return f.kind != "bad-response" and f.port != 0 and any(
                s.taken_at >= f.connected_at and f.port in s.client_ports for s in snapshots)
        return [f for f in self.failures if not explained(f)]


def _kind(exc: BaseException) -> str:
    kinds = [(ValueError, "bad-response"), (ConnectionResetError, "reset"), (asyncio.IncompleteReadError, "eof"),
             (TimeoutError, "timeout"), (ConnectionRefusedError, "refused")]
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), type(exc).__name__)
