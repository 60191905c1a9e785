"""A worker process: one uvloop event loop serving the MCP endpoint on its slot's listening socket(s).

Started by the master (one per CPU, see supervisor/) or alone. It reports to the master through its
shared-memory cell (heartbeat from the loop itself, state, request count) and takes commands on its
control channel (shared/control.py). Shutdown is graceful: stop accepting, end GET/listen streams
cleanly so clients reconnect (to another worker), let in-flight requests finish within the graceful
timeout, then exit. Exit codes are a protocol the master reads: see EXIT_*.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from mcpherd.shared import control, events, layout
from mcpherd.worker.app import App
from mcpherd.shared.l2 import L2Cache
from mcpherd.worker.cache import ResultCache
from mcpherd.worker.stream_mirror import StreamMirror, reader_for
from mcpherd.worker.cluster import Cluster
from mcpherd.shared.metrics import Recorder
from mcpherd.shared.netstat import accept_queue_length
from mcpherd.worker.http import HttpConnection, Response
from mcpherd.worker.invoke import Invoker
from mcpherd.worker.limits import HttpLimits
from mcpherd.worker.methods import Methods
from mcpherd.worker.security import AllowList, default_hosts, loopback_origins
from mcpherd.worker.sessions import SessionStore
from mcpherd.worker.sse import EventStream
from mcpherd.worker.streamable import Endpoint

log = logging.getLogger("mcpherd.worker")

EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # the worker itself could not start (sockets, event loop)
EXIT_APP_LOAD_ERROR = 4  # the application failed to import or to enter its lifespan
HEARTBEAT_INTERVAL = 0.5


@dataclass(slots=True)
class WorkerConfig:
    app: str = "mcpherd.demo:app"
    slot: int = 0
    lane: int = 0
    generation: int = 1
    host: str = "00000000"  # the master's host id: ids other hosts route by start with it
    redis: Any = None  # supervisor.config.Redis when hosts share Redis
    metrics: bool = True  # record metrics in shared memory (off with --metrics-bind off)
    secret: bytes = b""
    path: str = "/mcp"
    tool_threads: int = 32
    graceful_timeout: float = 30.0
    session_idle_timeout: float = 1800.0
    max_sessions: int = 100_000  # sessions whose local state one worker holds (sessions.py)
    resume_buffer_mb: int = 64  # what its SSE streams keep for Last-Event-ID, all sessions together
    allowed_hosts: list[str] = field(default_factory=list)  # added to loopback and the bind address
    allowed_origins: list[str] = field(default_factory=list)  # added to the loopback origins
    limits: HttpLimits = field(default_factory=HttpLimits)


class AppLoadError(Exception):
    pass


def load_app(spec: str) -> App:
    """`module:attribute` -> the App; AppLoadError with one clear sentence otherwise."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise AppLoadError(f"--app must look like module:attribute, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise AppLoadError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise AppLoadError(f"{spec} is not an mcpherd App (got {type(app).__name__})")
    return app


class Runtime:
    """What `app.invalidate()` and `app.notify_*()` reach inside this worker: cluster events."""

    def __init__(self, cluster: Cluster, l2: L2Cache | None) -> None:
        self.cluster = cluster
        self.l2 = l2

    def invalidate(self, key: str | None, tag: str | None, prefix: str | None, all: bool) -> Any:
        """On the loop: an awaitable. From a pool thread: block until every worker applied it."""
        event = events.Invalidate(key, tag, prefix, all)

        async def publish() -> bool:
            # Shared entries first, or a worker (of any host) could refill its L1 from them. The direct
            # delete is the fast way; when it fails the master's bridge must do it, or the stale entry
            # stays in L2 for every host until its TTL.
            deleted = self.l2 is None or await self.l2.invalidate(key, tag, prefix, all)
            return await self.cluster.publish(event, l2=not deleted)

        loop = self.cluster.loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            return loop.create_task(publish())
        return asyncio.run_coroutine_threadsafe(publish(), loop).result()

    async def resource_updated(self, uri: str) -> None:
        await self.cluster.publish(events.ResourceUpdated(uri))

    async def list_changed(self, kind: str) -> None:
        if kind not in ("tools", "resources", "prompts"):
            raise ValueError(f"kind must be tools, resources or prompts, not {kind!r}")
        await self.cluster.publish(events.ListChanged(kind))


class Worker:
    def __init__(self, config: WorkerConfig, app: App, sockets: list[socket.socket],
                 cell: layout.Cell | None, segment: layout.Segment | None = None,
                 channel: socket.socket | None = None) -> None:
        self.config = config
        self.app = app
        self.sockets = sockets
        self.cell = cell
        self.words = cell.words if cell is not None else None
        self.cell_base = cell.base if cell is not None else 0
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        bind_hosts = [s.getsockname()[0] for s in sockets]
        self.cache = ResultCache(cell=cell)
        redis = config.redis
        tag = f"{config.host}w{config.slot}{'ab'[config.lane]}"
        redis_name = f"mcpherd-worker-{tag}-{os.getpid()}"  # its connections, as CLIENT LIST shows them
        self.l2 = L2Cache(redis.url, redis.key_prefix, redis.socket_timeout, redis.connect_timeout,
                          redis.max_entry_bytes, redis.max_connections, redis_name) \
            if redis is not None and redis.url else None
        self.endpoint = Endpoint(
            Methods(app, Invoker(self.loop, config.tool_threads), config.secret, cache=self.cache, l2=self.l2),
            SessionStore(config.secret, tag, idle_timeout=config.session_idle_timeout,
                         max_sessions=config.max_sessions, resume_buffer_bytes=config.resume_buffer_mb << 20),
            AllowList(default_hosts(bind_hosts) + config.allowed_hosts),
            AllowList(list(loopback_origins()) + config.allowed_origins),
            config.path,
        )
        if self.l2 is not None:
            self.endpoint.sessions.mirror = StreamMirror(
                self.l2.client, redis.key_prefix,
                reader_for(redis.url, redis.connect_timeout, f"{redis_name}-streams"))
        self.cluster = Cluster(self, channel, segment, tag)
        self.endpoint.cluster = self.cluster
        self.recorder = Recorder(cell, list(app.tools)) if cell is not None and config.metrics else None
        self.endpoint.recorder = self.recorder
        if self.recorder is not None:
            self.cluster.on_propagation = self.recorder.propagation
        self.traffic = [0, 0]  # bytes in, bytes out
        app.runtime = Runtime(self.cluster, self.l2)
        self.stopping = asyncio.Event()
        self.mode: Any = control.Stop()
        self.next_beat = 0.0

    def handle(self, request: Any) -> Any:
        """Every HTTP request: counted, timed (the busy ratio), and recorded when no Call did it."""
        request.started = started = time.perf_counter_ns()
        result = self.endpoint.handle(request)
        words = self.words
        if words is not None:  # recycling and the autoscaler need these even without metrics
            base = self.cell_base  # inlined Cell.add: two word updates on every request
            words[base + layout.F_REQUESTS] += 1
            words[base + layout.F_BUSY_NS] += time.perf_counter_ns() - started
        recorder = self.recorder
        if recorder is None:
            return result
        if not request.counted and request.method == "POST":
            if isinstance(result, Response):
                recorder.request(_method_of(request, result), _ok(result), (time.perf_counter_ns() - started) / 1e9)
            elif isinstance(result, asyncio.Future):
                result.add_done_callback(lambda f: self._record_later(request, f, started))
        return result

    def _record_later(self, request: Any, future: asyncio.Future[Any], started: int) -> None:
        if self.recorder is None or request.counted:
            return
        response = None if future.cancelled() or future.exception() else future.result()
        ok = isinstance(response, Response) and _ok(response)
        method = _method_of(request, response) if isinstance(response, Response) else "other"
        self.recorder.request(method, ok, (time.perf_counter_ns() - started) / 1e9)

    async def start(self) -> None:
        for sock in self.sockets:
            server = await self.loop.create_server(
                lambda: HttpConnection(self.handle, self.config.limits, self.connections, self.traffic), sock=sock,
                backlog=2048)
            self.servers.append(server)
        self.cluster.start(list(self.app.tools))
        self.next_beat = self.loop.time()
        self._beat()
        if self.cell is not None:
            self.cell.set(layout.F_READY_AT, time.monotonic_ns())
            self.cell.set(layout.F_STATE, layout.READY)
        self.loop.call_later(1.0, self._sweep)

    def _beat(self) -> None:
        """Heartbeat from the loop itself: if this stops, the loop stopped turning."""
        now = self.loop.time()
        if self.cell is not None:
            self.cell.set(layout.F_HEARTBEAT, time.monotonic_ns())
            self.cell.set(layout.F_LOOP_LAG_US, int(max(0.0, now - self.next_beat) * 1e6))
            streams = sum(1 for c in self.connections if c.active_stream is not None)
            if self.recorder is not None:
                self.recorder.gauges(len(self.connections), streams)
            self.cell.set(layout.F_BYTES_IN, self.traffic[0])
            self.cell.set(layout.F_BYTES_OUT, self.traffic[1])
        self.next_beat = now + HEARTBEAT_INTERVAL
        self.loop.call_at(self.next_beat, self._beat)

    def _sweep(self) -> None:
        """Once a second: expire idle connections and sessions, keep quiet SSE streams alive."""
        now = self.loop.time()
        interval = self.config.limits.sse_keepalive_interval
        for connection in list(self.connections):
            connection.expire(now)
            stream = connection.active_stream
            if isinstance(stream, EventStream) and now - stream.last_write >= interval:
                stream.comment()
        self.endpoint.sessions.expire()
        self.loop.call_later(1.0, self._sweep)

    def command(self, message: Any) -> None:
        if isinstance(message, (control.Stop, control.Retire)):
            self.mode = message
            self.stopping.set()
        elif isinstance(message, control.ReopenLogs):
            reopen_logs()

    def adopt(self, fd: int, request: bytes) -> None:
        """Take over a client connection another worker handed us, with the request it read."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)

        async def take() -> None:
            _transport, connection = await self.loop.connect_accepted_socket(
                lambda: HttpConnection(self.handle, self.config.limits, self.connections, self.traffic), sock)
            connection.data_received(request)

        self.loop.create_task(take())

    async def drain(self, immediate: bool) -> None:
        """Stop accepting (after emptying the accept queue when retiring), end streams, finish work."""
        if self.cell is not None:
            self.cell.set(layout.F_STATE, layout.DRAINING)
        if isinstance(self.mode, control.Retire) and not immediate:
            await self._empty_accept_queues()
        for server in self.servers:
            server.close()
        await asyncio.sleep(0)  # uvloop runs connection_made a turn after accept: let those register first
        for session in list(self.endpoint.sessions.sessions.values()):
            get_stream = session.get_stream
            if get_stream is not None and get_stream.live is not None:
                get_stream.live.end()  # a clean end: the client reconnects, to a worker that stays
        for listener in list(self.endpoint.modern.listeners):
            listener.stream.end()
        for connection in list(self.connections):
            connection.close_when_idle()
        deadline = self.loop.time() + (0 if immediate else self.config.graceful_timeout)
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()

    async def _empty_accept_queues(self) -> None:
        """Retiring: new connections are already steered elsewhere; serve what is queued here."""
        quiet_checks = 0
        deadline = self.loop.time() + self.config.graceful_timeout
        while quiet_checks < 3 and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            queued = sum(accept_queue_length(s) for s in self.sockets)
            quiet_checks = quiet_checks + 1 if queued == 0 else 0


def _ok(response: Response) -> bool:
    # Responses counted here never carry a result with free text: a JSON-RPC error shows as such.
    return 200 <= response.status < 300 and b'"error":{' not in response.body[:256]


def _method_of(request: Any, response: Response | None) -> str:
    """The JSON-RPC method of a request no Call counted: notifications, answers, rejections."""
    if response is not None and response.status == 202:
        return "notifications" if b'"method"' in request.body else "responses"
    header = request.headers.get("mcp-method")
    if header:
        return str(header)
    if b'"initialize"' in request.body[:512]:
        return "initialize"
    return "other"


def reopen_logs() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()  # the next record reopens the file (after rotation moved it away)


async def serve(config: WorkerConfig, sockets: list[socket.socket], cell: layout.Cell | None = None,
                channel: socket.socket | None = None, segment: layout.Segment | None = None) -> int:
    try:
        app = load_app(config.app)
    except AppLoadError as exc:
        log.error("%s", exc)
        return EXIT_APP_LOAD_ERROR
    worker = Worker(config, app, sockets, cell, segment, channel)
    loop = asyncio.get_running_loop()
    immediate = False

    def quit_now() -> None:
        nonlocal immediate
        immediate = True
        worker.stopping.set()

    loop.add_signal_handler(signal.SIGTERM, worker.command, control.Stop())
    loop.add_signal_handler(signal.SIGINT, worker.command, control.Stop())
    loop.add_signal_handler(signal.SIGQUIT, quit_now)
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
    try:
        async with app.run_lifespans():
            await worker.start()
            await worker.stopping.wait()
            await worker.drain(immediate)
    except Exception as exc:
        log.error("the application failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return EXIT_APP_LOAD_ERROR
    finally:
        worker.endpoint.methods.invoker.shutdown()
        if cell is not None:
            cell.set(layout.F_STATE, layout.STOPPED)
    return EXIT_OK


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run(config: WorkerConfig, sockets: list[socket.socket], cell: layout.Cell | None = None,
        channel: socket.socket | None = None, segment: layout.Segment | None = None) -> int:
    """Run one worker to completion on a fresh uvloop; returns its exit code."""
    if not config.secret:
        config.secret = os.urandom(32)
    try:
        return uvloop.run(serve(config, sockets, cell, channel, segment))
    except KeyboardInterrupt:
        return EXIT_OK
