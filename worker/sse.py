"""Server-sent event streams on an HTTP/1.1 connection (chunked, so the connection survives the stream).

An `EventStream` may be written to before the connection attaches it (a pipelined request still
waiting its turn); such events wait in a small buffer. Once the client goes away, writes are dropped:
whoever needs them later (resumption) keeps its own copy in the session's event log.
"""

from __future__ import annotations

from collections.abc import Callable

from mcpherd.worker.http import HttpConnection

SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache, no-transform"),
    ("x-accel-buffering", "no"),  # nginx would otherwise buffer the stream and hold events back
]


def frame(data: bytes, event_id: str | None = None, retry_ms: int | None = None) -> bytes:
    parts = []
    if event_id is not None:
        parts.append(b"id: " + event_id.encode())
    if retry_ms is not None:
        parts.append(b"retry: %d" % retry_ms)
    parts.append(b"event: message\ndata: " + data if data else b"data: ")
    return b"\n".join(parts) + b"\n\n"


class EventStream:
    def __init__(self, headers: list[tuple[str, str]], status: int = 200) -> None:
        self.status = status
        self.headers = SSE_HEADERS + headers
        self.connection: HttpConnection | None = None
        self.closed = False  # the client went away or the stream ended
        self.ended = False
        self.last_write = 0.0
        self._pending: list[bytes] = []
        self.on_detach: list[Callable[[EventStream], None]] = []
        self.max_buffer = 8 * 1024 * 1024

    # -- Stream protocol (called by the connection) ---------------------------------------------
    def attach(self, connection: HttpConnection) -> None:
        self.connection = connection
        connection.write_stream_head(self.status, self.headers)
        self.last_write = connection.loop_time()
        if self._pending:
            connection.write_chunk(b"".join(self._pending))
            self._pending.clear()
        if self.ended:
            self._finish()

    def detach(self) -> None:
        if self.closed and self.connection is None:
            return
        self.closed = True
        self.connection = None
        for callback in self.on_detach:
            callback(self)
        self.on_detach.clear()

    # -- writing -------------------------------------------------------------------------------
    def send(self, data: bytes, event_id: str | None = None, retry_ms: int | None = None) -> bool:
        """Queue one event; False when the client is gone (the caller keeps it for resumption)."""
        if self.closed or self.ended:
            return False
        chunk = frame(data, event_id, retry_ms)
        connection = self.connection
        if connection is None:
            self._pending.append(chunk)
            return True
        if connection.write_buffer_size > self.max_buffer:
            connection.abort()  # a reader this far behind would hold the worker's memory hostage
            return False
        connection.write_chunk(chunk)
        self.last_write = connection.loop_time()
        return True

    def comment(self, text: bytes = b"keepalive") -> None:
        if self.connection is not None and not self.closed and not self.ended:
            self.connection.write_chunk(b": " + text + b"\n\n")
            self.last_write = self.connection.loop_time()

    def end(self) -> None:
        """Finish the stream cleanly; the connection goes on serving keep-alive requests."""
        if self.ended:
            return
        self.ended = True
        if self.connection is not None:
            self._finish()

    def _finish(self) -> None:
        connection = self.connection
        assert connection is not None
        connection.write_last_chunk()
        self.connection = None
        self.closed = True
        for callback in self.on_detach:
            callback(self)
        self.on_detach.clear()
        connection.stream_finished(self)
