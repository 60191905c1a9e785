"""A tiny HTTP/1.1 server for the master's selectors loop: /metrics now, a dashboard at / later.

It answers GET and HEAD for the paths in its `routes` (path -> `Reply` maker), 404 for other paths and
405 for other methods, without ever blocking the loop or starting a thread: non-blocking sockets, a
pending buffer per client and no reading from a client until its previous response is out (so a
client that pipelines a flood gets at most MAX_PIPELINED answers per read, then is closed). At most
`max_clients` request-response clients at a time, each closed when it has not completed an exchange
within `timeout_s` of connecting or of its last response (checked by `tick`, once per loop turn), plus
at most `max_streams` SSE viewers, counted apart so that open dashboards never lock out a scrape.

Callbacks registered in the selector take no arguments (`key.data()`), as the master's loop calls them.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import NamedTuple

import httptools

from mcpherd.supervisor.sockets import receive

log = logging.getLogger("mcpherd.metrics")


class Reply(NamedTuple):
    status: int
    content_type: str
    body: bytes


Route = Callable[[], Reply]
_REASONS = {s.value: s.phrase for s in HTTPStatus}
MAX_REQUEST_BYTES = 16384  # a scrape is one GET line and a few headers
MAX_PIPELINED = 4  # answers queued per client; more means a client flooding the master loop
ACCEPTS_PER_TURN = 16
MAX_STREAM_BACKLOG = 1 << 20


class _Client:
    """One connection: an httptools parser fed from recv and the bytes still to send."""

    __slots__ = ("sock", "parser", "url", "outbox", "queued", "received", "closing", "deadline", "on_request",
                 "streaming")

    def __init__(self, sock: socket.socket, deadline: float, on_request: Callable[[_Client], None]) -> None:
        self.sock = sock
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.outbox = bytearray()
        self.queued = 0  # responses in the outbox
        self.received = 0  # bytes of the request being parsed
        self.closing = False  # close once the outbox is sent
        self.deadline = deadline
        self.on_request = on_request
        self.streaming = False  # an SSE viewer: the response never ends, broadcast() appends to it

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.received = 0
        if not self.closing:
            self.on_request(self)


class MetricsServer:
    """HTTP/1.1 for the master's selectors loop; every callback returns without blocking."""

    def __init__(self, address: tuple[str, int], routes: dict[str, Route], max_clients: int = 64,
                 timeout_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.routes = routes  # path -> reply; add "/" for a dashboard
        self.max_clients = max_clients
        self.timeout_s = timeout_s
        self.clock = clock
        self.listener: socket.socket | None = None
        self.selector: selectors.BaseSelector | None = None
        self.accepting = False
        self.clients: dict[int, _Client] = {}  # fd -> client
        self.stream_routes: dict[str, Route] = {}  # path -> first event of a server-sent event stream
        self.streams: set[_Client] = set()
        self.max_streams = 64

    def listen(self, inherited: socket.socket | None = None) -> tuple[str, int]:
        """Bind (or adopt a listener handed over by a previous master); the address actually bound."""
        if inherited is None:
            host, port = self.address
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            inherited = socket.create_server((host, port), family=family, backlog=64)
        inherited.setblocking(False)
        self.listener = inherited
        bound = inherited.getsockname()
        return str(bound[0]), int(bound[1])

    def register(self, selector: selectors.BaseSelector) -> None:
        if self.listener is None:
            self.listen()
        self.selector = selector
        self._accept_again()

    def tick(self, now: float) -> None:
        """Close clients past their deadline; resume accepting after a transient accept error."""
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._drop(client)
        if not self.accepting and self.selector is not None:
            self._accept_again()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        if self.listener is not None:
            self._pause_accepting()
            self.listener.close()
            self.listener = None

    # -- accepting ---------------------------------------------------------------------------
    def _accept_again(self) -> None:
        assert self.selector is not None and self.listener is not None
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.accepting = True

    def _pause_accepting(self) -> None:
        if self.accepting and self.selector is not None and self.listener is not None:
            self.selector.unregister(self.listener)
        self.accepting = False

    def _accept(self) -> None:
        assert self.listener is not None and self.selector is not None
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: a readable listener would spin the loop
                log.warning("metrics: accept failed (%s); retrying next tick", errno.errorcode.get(exc.errno or 0, exc))
                self._pause_accepting()
                return
            if len(self.clients) - len(self.streams) >= self.max_clients:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self.clock() + self.timeout_s, self._answer)
            self.clients[sock.fileno()] = client
            self.selector.register(sock, selectors.EVENT_READ, lambda c=client: self._ready(c))

    # -- one client --------------------------------------------------------------------------
    def _ready(self, client: _Client) -> None:
        if client.outbox:  # registered for writing only while something is pending
            self._flush(client)
        else:
            self._read(client)

    def _read(self, client: _Client) -> None:
        data = receive(client.sock)
        if data is None:
            return
        if not data:
            self._drop(client)
            return
        client.received += len(data)
        if client.streaming:
            return  # a viewer has nothing more to say; only its disconnect matters
        try:
            client.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(client, 400)
        except httptools.HttpParserError:
            self._fail(client, 400)
        if client.received > MAX_REQUEST_BYTES:
            self._fail(client, 431)
        self._flush(client)

    def _answer(self, client: _Client) -> None:
        method = client.parser.get_method()
        keep_alive = client.parser.should_keep_alive() and client.queued < MAX_PIPELINED
        try:
            path = httptools.parse_url(client.url).path.decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            self._fail(client, 400)
            return
        if path in self.stream_routes and method == b"GET" and len(self.streams) < self.max_streams:
            self._start_stream(client, self.stream_routes[path])
            return
        route = self.routes.get(path)
        if path in self.stream_routes:  # a stream path exists: wrong method, or every viewer place taken
            reply = _text(405 if method != b"GET" else 503)
        elif route is None:
            reply = _text(404)
        elif method not in (b"GET", b"HEAD"):
            reply = _text(405)
        else:
            reply = _call(route)
        self._queue(client, reply, keep_alive, head=method == b"HEAD")

    def _start_stream(self, client: _Client, first: Route) -> None:
        reply = _call(first)
        client.outbox += (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                          b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\n") + _event(reply.body)
        client.streaming = True
        client.deadline = float("inf")
        self.streams.add(client)

    def broadcast(self, data: bytes) -> None:
        """One event to every stream viewer; the payload is computed once, whatever their number.
        A viewer more than MAX_STREAM_BACKLOG behind is dropped rather than buffered without bound."""
        frame = _event(data)
        for client in list(self.streams):
            if len(client.outbox) > MAX_STREAM_BACKLOG:
                self._drop(client)
                continue
            client.outbox += frame
            self._flush(client)

    def _fail(self, client: _Client, status: int) -> None:
        if not client.closing:
            self._queue(client, _text(status), keep_alive=False, head=False)

    def _queue(self, client: _Client, reply: Reply, keep_alive: bool, head: bool) -> None:
        client.outbox += _encode(reply, keep_alive, head)
        client.queued += 1
        client.closing = not keep_alive

    def _flush(self, client: _Client) -> None:
        if client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(client)
                return
            del client.outbox[:sent]
            if not client.outbox and not client.streaming:
                client.queued = 0
                client.deadline = self.clock() + self.timeout_s  # the keep-alive idle allowance
        if not client.outbox and client.closing:
            self._drop(client)
            return
        events = selectors.EVENT_WRITE if client.outbox else selectors.EVENT_READ
        assert self.selector is not None
        if self.selector.get_key(client.sock).events != events:
            self.selector.modify(client.sock, events, lambda c=client: self._ready(c))

    def _drop(self, client: _Client) -> None:
        self.streams.discard(client)
        if self.clients.pop(client.sock.fileno(), None) is None:
            return
        if self.selector is not None:
            self.selector.unregister(client.sock)
        client.sock.close()


def _call(route: Route) -> Reply:
    try:
        return route()
    except Exception:  # a failing collector must not take the master loop down with it
        log.exception("metrics: route failed")
        return _text(500)


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _text(status: int) -> Reply:
    return Reply(status, "text/plain; charset=utf-8", f"{status} {_REASONS.get(status, '')}\n".encode())


def _encode(reply: Reply, keep_alive: bool, head: bool) -> bytes:
    head_lines = (f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}\r\n"
                  f"Content-Type: {reply.content_type}\r\n"
                  f"Content-Length: {len(reply.body)}\r\n"
                  f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head_lines.encode("latin-1") + (b"" if head else reply.body)
