"""HTTP/1.1 server connections: httptools parses, this module frames responses.

One `HttpConnection` per TCP connection. Requests on a keep-alive connection may be pipelined; their
responses leave in request order, whatever order the handler finishes them in (RFC 9112 section 9.3.2).
A response is either complete (`Response`) or a server-sent-event stream (`EventStream`) that stays
open until the handler ends it or the client goes away.

Limits are enforced here, before the MCP layer sees a byte: header block size (431), body size (413),
a deadline to finish sending a request (408) and an idle keep-alive timeout. A client whose answers
fill the transport's buffer is neither read nor answered until it reads them (flow control), and one
that reads none of them for `send_timeout` is disconnected; one with `max_pipelined` requests in hand is
not read until one of them is answered. The deadlines are checked by one sweep per
second over all connections rather than a timer per request, which costs nothing on the hot path.

Writes are coalesced per event-loop turn (`_WriteBatch`): what the connections of one worker write while
the loop handles a batch of readable sockets leaves together, right after that batch, as one write per
connection. Sending each answer the moment it is ready wakes a client (or proxy) that sleeps between
answers once per answer; sent back to back, one wake-up serves the whole batch. On loopback, where the
waking is charged to the sender, that was a quarter of the worker's CPU per request (see bench/README.md).
Nothing waits for a timer: the batch goes out on the loop's next turn, before it polls for more input.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import os
import weakref
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import httptools

from mcpherd.worker.limits import HttpLimits

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_GZIP_MIN_BYTES = 1024
_CHUNK_END = b"0\r\n\r\n"
_DRAIN_IDLE_GRACE_S = 2.0  # an idle keep-alive client may be mid-send when the drain starts
_FIRST_REQUEST_GRACE_S = 1.0  # draining: how long a just-accepted connection may take to start its request
# Written this turn past this, a connection's output goes to its transport at once rather than at the turn's
# end, so that flow control (pause_writing) sees it: the transport's own high-water mark (uvloop: 64 KiB).
_OUT_FLUSH_BYTES = 64 * 1024
# Raw header name -> its lower-case str key. Clients repeat the same few names on every request; the
# bound keeps a client that sends endless distinct names from growing it (they are then decoded each time).
_header_keys: dict[bytes, str] = {}
_HEADER_KEYS_MAX = 512


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", " (RFC 9110 5.3)
    body: bytes
    keep_alive: bool
    connection: HttpConnection
    counted: bool = False  # a Call took over counting this request in the metrics
    started: int = 0  # perf_counter_ns when the worker began handling it: the start of its recorded duration

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # close the connection after this response

    @classmethod
    def json(cls, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> Response:
        return cls(status, body, "application/json", headers or [])


class Stream(Protocol):
    """What a connection needs of a streaming response."""

    def attach(self, connection: HttpConnection) -> None: ...
    def detach(self) -> None: ...


ResponseLike = Response | Stream

# Returned by a handler that gave the connection to another process: write nothing, let go of it.
HANDED_OFF = Response(0)
Handler = Callable[[Request], "ResponseLike | Awaitable[ResponseLike]"]


class ConnState(enum.Enum):
    IDLE = 0  # keep-alive, waiting for the next request
    READING = 1  # a request has begun arriving
    BUSY = 2  # every byte of the request arrived; the handler owns it


class HttpConnection(asyncio.Protocol):
    """One client connection. The parser calls the `on_*` methods from inside `data_received`."""

    # Slots: these are read on every callback of every request. As an instance dict of 30 attributes
    # they cost 0.4 us a request more than of 28 (measured, CPython 3.11); slots cost the same at any count.
    __slots__ = ("_handler", "_limits", "_max_header_bytes", "_max_headers", "_registry", "_traffic", "_loop",
                 "_parser", "transport", "state", "deadline", "closed", "_url", "_headers", "_header_bytes", "_body",
                 "_body_bytes", "_rejected", "_queue", "_active_stream", "_write_paused", "_send_deadline", "_backlog",
                 "_releasing", "_batch", "_out", "_out_bytes", "_drain_waiters", "on_close", "draining", "fresh")

    def __init__(self, handler: Handler, limits: HttpLimits, registry: set[HttpConnection],
                 traffic: list[int] | None = None) -> None:
        self._handler = handler
        self._limits = limits
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._registry = registry
        self._traffic = traffic  # [bytes in, bytes out] of the whole worker
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.state = ConnState.IDLE
        self.deadline = 0.0
        self.closed = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._rejected = False
        # Responses in request order: a completed Response, a Stream, or None while the handler runs.
        self._queue: deque[list[ResponseLike | None]] = deque()
        self._active_stream: Stream | None = None
        self._write_paused = False
        self._send_deadline = 0.0  # while writes are paused: when a client that reads nothing is given up on
        # Requests parsed since writes paused, handled once the client reads; None while none are held back.
        self._backlog: deque[Request] | None = None
        self._releasing = False
        self._batch = _write_batch(self._loop)
        self._out: list[bytes] = []  # written this loop turn, not yet handed to the transport
        self._out_bytes = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.on_close: list[Callable[[], None]] = []
        self.draining = False  # graceful shutdown: close once the last response is written
        self.fresh = True  # no request has begun yet: the client connected to send one

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self._registry.add(self)
        self.deadline = self._loop.time() + self._limits.keepalive_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_output()
        self._backlog = None
        self._registry.discard(self)
        if self._active_stream is not None:
            self._active_stream.detach()
            self._active_stream = None
        for entry in self._queue:
            if entry[0] is not None and not isinstance(entry[0], Response):
                entry[0].detach()
        self._queue.clear()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        for callback in self.on_close:
            callback()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._traffic is not None:
            self._traffic[0] += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, b"protocol upgrade is not supported")
        except httptools.HttpParserError as exc:
            if not self._rejected:
                self._reject(400, f"malformed HTTP request: {exc}".encode())

    def pause_writing(self) -> None:
        # Flow control, as nginx and uvicorn do it: a client that does not read its answers is neither
        # read nor answered further. Otherwise one pipelining requests without reading has the worker
        # answer all of them into memory: 148 MB for 20,000 tools/list of 381 bytes, 20 times what it
        # sent. What stays buffered is about the transport's high-water mark. As nginx's send_timeout,
        # a client that reads nothing for `send_timeout` is disconnected (`expire`).
        self._write_paused = True
        self._send_deadline = self._loop.time() + self._limits.send_timeout
        self._hold()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release()
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- holding a client back -----------------------------------------------------------------
    def _hold(self) -> None:
        """Stop reading the client; what it already sent waits parsed in `_backlog` until `_release`.

        Two things hold a client back: it does not read its answers (pause_writing), or it pipelined
        `max_pipelined` requests still being handled. Either way what the worker holds for it is what
        it sent (one read's worth, at most), not what answering or handling all of it would take.
        """
        if self._backlog is None:
            self._backlog = deque()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _release(self) -> None:
        """Handle what waits while the client reads and the pipeline has room; read it again once nothing
        waits and there is still room."""
        backlog = self._backlog
        if backlog is None or self._releasing:
            return  # not held back; or called again by a request this loop handles (see below)
        limit = self._limits.max_pipelined
        self._releasing = True
        try:
            while backlog and not self._write_paused and not self._rejected and len(self._queue) < limit:
                self._dispatch(backlog.popleft())  # its answer may come back here through `_flush`
        finally:
            self._releasing = False
        if not backlog and not self._write_paused and len(self._queue) < limit:
            self._backlog = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- parser callbacks ----------------------------------------------------------------------
    # No `on_message_begin`: httptools skips callbacks a protocol does not define, and every request
    # line has a URL, so the first `on_url` of a message begins it (one Python call less per request).
    def _begin(self) -> None:
        self.state = ConnState.READING
        self.fresh = False
        self.deadline = self._loop.time() + self._limits.request_timeout
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        if self.state is not ConnState.READING:
            self._begin()
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # The hottest callback (every header of every request): one limit check, one dict lookup.
        size = self._header_bytes + len(name) + len(value) + 4
        self._header_bytes = size
        if size > self._max_header_bytes:
            self._header_limit_exceeded()
            return
        key = _header_keys.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_header_keys) < _HEADER_KEYS_MAX:
                _header_keys[name] = key
        headers = self._headers
        if key in headers:  # a repeated header: joined, and already counted by name
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}"
        elif len(headers) < self._max_headers:
            headers[key] = value.decode("latin-1")
        else:
            self._header_limit_exceeded()

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body_bytes:
            self._reject(413, b"request body exceeds %d bytes" % self._limits.max_body_bytes)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            self._reject(413, b"request body exceeds %d bytes" % self._limits.max_body_bytes)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._rejected:
            return
        self.state = ConnState.BUSY
        target = _target(self._url)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(
            _METHODS.get(self._parser.get_method()) or self._parser.get_method().decode("ascii"),
            target[0],
            target[1],
            self._headers,
            body,
            self._parser.should_keep_alive(),
            self,
        )
        if self._backlog is not None:  # held back (`_hold`): handled once the client may go on
            self._backlog.append(request)
            return
        self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        """Hand the request to the handler; its answer is written in request order."""
        # Nothing ahead of it (the usual case): a synchronous answer can be written at once, skipping the
        # ordering queue. Otherwise it waits its turn behind earlier pipelined requests.
        first = not self._queue and self._active_stream is None
        entry: list[ResponseLike | None] = [None]
        self._queue.append(entry)
        try:
            result = self._handler(request)
        except Exception as exc:  # a handler bug must cost one request, never the connection loop
            result = internal_error(exc)
        if type(result) is Response:
            if first and result is not HANDED_OFF and not self.closed:
                self._queue.pop()
                self._write_complete(request, result)
                return
            if result is HANDED_OFF:
                self._let_go()
                return
            self._complete(entry, request, result)
        elif hasattr(result, "attach"):
            self._complete(entry, request, result)  # type: ignore[arg-type]
        else:
            future = asyncio.ensure_future(result)  # type: ignore[arg-type]
            future.add_done_callback(lambda f: self._complete(entry, request, _task_result(f)))
        if len(self._queue) >= self._limits.max_pipelined:
            self._hold()  # not on the path above: an answer written at once never fills the queue

    def _write_complete(self, request: Request, response: Response) -> None:
        """`_complete` then `_flush` for a response that is first in line, without the queue."""
        self._finalize(request, response)
        self._write_response(response)
        if response.close:
            self._close_after_write()
            return
        self._idle()

    @staticmethod
    def _finalize(request: Request, response: Response) -> None:
        """What a complete response gets before it is written: close when the client asked, gzip when it pays."""
        if not request.keep_alive:
            response.close = True
        if len(response.body) >= _GZIP_MIN_BYTES and response.content_type == "application/json":
            gzip_if_worth_it(request, response)

    def _idle(self) -> None:
        """The last answer went out: wait for the next request, or close when draining."""
        if self._backlog or self.state is not ConnState.BUSY:
            # Not idle: the next requests arrived already and wait their turn, or the next one is arriving
            # (READING: its deadline runs, and a URL that comes in pieces must not start over).
            return
        self.state = ConnState.IDLE
        self.deadline = self._loop.time() + self._limits.keepalive_timeout
        if self.draining:
            self._close_after_write()

    # -- responses -----------------------------------------------------------------------------
    def _complete(self, entry: list[ResponseLike | None], request: Request, result: ResponseLike) -> None:
        if self.closed:
            if not isinstance(result, Response):
                result.detach()
            return
        if isinstance(result, Response):
            self._finalize(request, result)
        entry[0] = result
        self._flush()

    def _flush(self) -> None:
        while self._queue and self._active_stream is None:
            head = self._queue[0][0]
            if head is None:
                break  # still being handled; those behind it wait (but the pipeline may have room now)
            self._queue.popleft()
            if isinstance(head, Response):
                self._write_response(head)
                if head.close:
                    self._close_after_write()
                    return
            else:
                self._active_stream = head
                head.attach(self)
        if self._backlog is not None:
            self._release()
        if not self._queue and self._active_stream is None:
            self._idle()

    def stream_finished(self, stream: Stream) -> None:
        """Called by a stream once its terminating chunk is written."""
        if self._active_stream is stream:
            self._active_stream = None
            self._flush()

    def _write_response(self, response: Response) -> None:
        assert self.transport is not None
        body = response.body
        head = _head_start(response.status, response.content_type)
        headers = response.headers
        if len(headers) == 1:  # the usual extra: a session id
            head += f"{headers[0][0]}: {headers[0][1]}\r\n".encode("latin-1")
        elif headers:
            head += "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1")
        if response.close or self.draining:
            head += b"connection: close\r\n"
        head += b"content-length: %d\r\n\r\n" % len(body)
        if self._traffic is not None:
            self._traffic[1] += len(head) + len(body)
        if len(body) < 65536:  # `_send`, inlined: every response comes through here
            if not self._out:
                self._batch.add(self)
            self._out.append(head + body)
            self._out_bytes += len(head) + len(body)
            if self._out_bytes > _OUT_FLUSH_BYTES:
                self.flush_output()
        else:  # not copied into one buffer: the transport writes both with one writev
            self._send(head)
            self._send(body)

    def write_stream_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        lines.append("transfer-encoding: chunked\r\n\r\n")
        self._send("\r\n".join(lines).encode("latin-1"))

    def write_chunk(self, data: bytes) -> None:
        if not self.closed and data:
            if self._traffic is not None:
                self._traffic[1] += len(data)
            self._send(b"%x\r\n%b\r\n" % (len(data), data))

    def write_last_chunk(self) -> None:
        if not self.closed:
            self._send(_CHUNK_END)

    # -- output: every write goes through here, in order ------------------------------------------
    def _send(self, data: bytes) -> None:
        """Queue bytes for the end of this loop turn (see `_WriteBatch`)."""
        if not self._out:
            self._batch.add(self)
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes > _OUT_FLUSH_BYTES:
            self.flush_output()

    def flush_output(self) -> None:
        """Hand what this turn wrote to the transport: one write, or one writev for several pieces."""
        out = self._out
        if not out:
            return
        self._out = []
        self._out_bytes = 0
        if self.transport is None or self.closed or self.transport.is_closing():
            return  # the transport refuses writes once closing: these were meant for a client that is gone
        if len(out) == 1:
            self.transport.write(out[0])
        else:
            self.transport.writelines(out)

    def _drop_output(self) -> None:
        self._out = []
        self._out_bytes = 0

    def duplicate_fd(self) -> int | None:
        """A duplicate of the socket's fd, for handing the connection to another process.

        Earlier answers on this connection go out first: the new owner's must not overtake them.
        """
        self.flush_output()
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        return os.dup(sock.fileno()) if sock is not None else None

    def _let_go(self) -> None:
        """Another process owns the connection now: drop our end without a FIN or a reset."""
        self._rejected = True
        self._queue.clear()
        self._backlog = None
        if self.transport is not None:
            self.transport.pause_reading()
            self.transport.abort()  # closes only our fd; the socket lives on in its new owner

    def loop_time(self) -> float:
        return self._loop.time()

    def abort(self) -> None:
        self._close_now()

    @property
    def active_stream(self) -> Stream | None:
        return self._active_stream

    @property
    def write_buffer_size(self) -> int:
        queued = sum(map(len, self._out))  # asked per SSE event, not per response: summed when asked
        return queued + (0 if self.transport is None else self.transport.get_write_buffer_size())

    async def drained(self) -> None:
        """Wait until the transport accepts writes again (backpressure for streams)."""
        if not self._write_paused or self.closed:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    # -- limits and closing --------------------------------------------------------------------
    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._limits.max_header_bytes and not self._rejected:
            self._reject(431, b"request header block too large")

    def _header_limit_exceeded(self) -> None:
        if self._rejected:
            return  # already answered; the parser is only finishing the header block
        if self._header_bytes > self._limits.max_header_bytes:
            self._reject(431, b"request header block too large")
        else:
            self._reject(431, b"too many request headers")

    def _reject(self, status: int, message: bytes) -> None:
        """Answer a request that cannot be parsed or is over a limit, then close the connection."""
        self._rejected = True
        self._queue.clear()
        self._backlog = None
        if self._active_stream is not None:
            self._close_now()
            return
        self._write_response(Response(status, message + b"\n", "text/plain; charset=utf-8", close=True))
        self._close_after_write()

    def _close_after_write(self) -> None:
        self._rejected = True  # ignore anything the client still sends
        self.flush_output()  # the transport sends what it holds before the FIN
        if self.transport is not None:
            self.transport.close()

    def _close_now(self) -> None:
        self._drop_output()
        if self.transport is not None:
            self.transport.abort()

    def expire(self, now: float) -> None:
        """Enforce the send, idle and request-read deadlines (called by the server's sweep)."""
        if self._write_paused:
            if now >= self._send_deadline:
                self._close_now()  # it read nothing of its answers for send_timeout
            return
        if self.state is ConnState.BUSY or now < self.deadline:
            return
        if self.state is ConnState.READING:
            self._reject(408, b"request not received in time")
        else:
            self._close_after_write()

    def close_when_idle(self) -> None:
        """Graceful shutdown: close now if nothing is in flight, else after the last response.

        An idle keep-alive connection is not closed at once either: its client may be sending the next
        request right now, and a close crossing it on the wire fails that request. It gets a short grace
        (a connection accepted just before the drain, a shorter one for its first request); a request
        that comes is answered with `Connection: close`, and `expire` closes the rest afterwards.
        """
        self.draining = True
        if self.state is ConnState.IDLE:
            grace = _FIRST_REQUEST_GRACE_S if self.fresh else _DRAIN_IDLE_GRACE_S
            self.deadline = min(self.deadline, self._loop.time() + grace)


class _WriteBatch:
    """The connections that wrote during this loop turn; flushed together at the turn's end.

    `call_soon` from inside an I/O callback runs after every other socket that was readable in the same
    poll has been handled, and before the loop polls again: the answers to that whole batch of requests
    leave back to back, without a timer and without waiting for more input.

    A turn can handle hundreds of readable sockets (a burst after a stall, thousands of clients); the
    first answer must not wait for all of them. Once `max_connections` wrote, they leave at once and a
    new batch begins: the wake-ups are already 1/32 of one per answer, and the wait the batch adds to an
    answer is bounded by 32 requests' worth of work (~0.7 ms here).
    """

    __slots__ = ("_loop", "_dirty", "max_connections")

    def __init__(self, loop: asyncio.AbstractEventLoop, max_connections: int = 32) -> None:
        self._loop = loop
        self._dirty: list[HttpConnection] = []
        self.max_connections = max_connections

    def add(self, connection: HttpConnection) -> None:
        dirty = self._dirty
        if not dirty:
            self._loop.call_soon(self.flush)
        elif len(dirty) >= self.max_connections:
            self.flush()  # the call already scheduled sends the new batch at the turn's end
            dirty = self._dirty
        dirty.append(connection)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush_output()


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriteBatch] = weakref.WeakKeyDictionary()


def _write_batch(loop: asyncio.AbstractEventLoop) -> _WriteBatch:
    batch = _batches.get(loop)
    if batch is None:
        batch = _batches[loop] = _WriteBatch(loop)
    return batch


@functools.lru_cache(maxsize=256)
def _target(url: bytes) -> tuple[str, str]:
    """(path, query) of a request target: the next request usually has the same one."""
    path, _, query = url.decode("latin-1").partition("?")
    return path, query


_METHODS = {m.encode(): m for m in ("GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS", "PATCH")}


@functools.lru_cache(maxsize=64)
def _head_start(status: int, content_type: str | None) -> bytes:
    """The status line and content type: the same few on every response, so built once each."""
    line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
    return (f"{line}content-type: {content_type}\r\n" if content_type else line).encode("latin-1")


def _task_result(task: asyncio.Future[ResponseLike]) -> ResponseLike:
    if task.cancelled():
        return Response(503, b"request cancelled\n", "text/plain; charset=utf-8", close=True)
    exc = task.exception()
    return internal_error(exc) if exc is not None else task.result()


def internal_error(exc: BaseException) -> Response:
    import logging

    logging.getLogger("mcpherd.worker").error("request handler failed", exc_info=exc)
    return Response(500, b"internal server error\n", "text/plain; charset=utf-8")


def gzip_if_worth_it(request: Request, response: Response) -> Response:
    """Compress JSON bodies above 1 KiB when the client accepts gzip."""
    if len(response.body) < _GZIP_MIN_BYTES or "gzip" not in request.headers.get("accept-encoding", ""):
        return response
    compressor = zlib.compressobj(5, zlib.DEFLATED, 31)
    response.body = compressor.compress(response.body) + compressor.flush()
    response.headers.append(("content-encoding", "gzip"))
    response.headers.append(("vary", "accept-encoding"))
    return response
