"""A worker process: one uvloop event loop serving the MCP endpoint on its listening socket(s).

Started by the master (one per CPU) or on its own. Shutdown is graceful on SIGTERM/SIGINT: stop
accepting, end SSE streams cleanly so clients resume elsewhere, let in-flight requests finish within
the graceful timeout, then exit. SIGQUIT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

import uvloop

from mcpherd.worker.app import App
from mcpherd.worker.http import HttpConnection
from mcpherd.worker.invoke import Invoker
from mcpherd.worker.limits import HttpLimits
from mcpherd.worker.methods import Methods
from mcpherd.worker.security import AllowList, default_hosts, loopback_origins
from mcpherd.worker.sessions import SessionStore
from mcpherd.worker.sse import EventStream
from mcpherd.worker.streamable import Endpoint

log = logging.getLogger("mcpherd.worker")


@dataclass(slots=True)
class WorkerConfig:
    app: str = "mcpherd.demo:app"
    slot: int = 0
    secret: bytes = b""
    path: str = "/mcp"
    tool_threads: int = 32
    graceful_timeout: float = 30.0
    session_idle_timeout: float = 1800.0
    allowed_hosts: list[str] = field(default_factory=list)  # empty: loopback plus the bind address
    allowed_origins: list[str] = field(default_factory=list)  # empty: loopback origins
    limits: HttpLimits = field(default_factory=HttpLimits)


def load_app(spec: str) -> App:
    """`module:attribute` -> the App; a clear error for anything else."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--app must look like module:attribute, got {spec!r}")
    app = getattr(importlib.import_module(module_name), attribute, None)
    if not isinstance(app, App):
        raise ValueError(f"{spec} is not an mcpherd App (got {type(app).__name__})")
    return app


class Runtime:
    """What `app.invalidate()` and `app.notify_*()` reach inside this worker."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def invalidate(self, **selector: Any) -> int:
        return 0  # the L1 cache arrives with the shared-memory issue

    async def resource_updated(self, uri: str) -> None:
        self.endpoint.broadcast("notifications/resources/updated", {"uri": uri}, uri)

    async def list_changed(self, kind: str) -> None:
        if kind not in ("tools", "resources", "prompts"):
            raise ValueError(f"kind must be tools, resources or prompts, not {kind!r}")
        self.endpoint.broadcast(f"notifications/{kind}/list_changed", {})


class Worker:
    def __init__(self, config: WorkerConfig, app: App, sockets: list[socket.socket]) -> None:
        self.config = config
        self.app = app
        self.sockets = sockets
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self.servers: list[asyncio.base_events.Server] = []
        bind_hosts = [s.getsockname()[0] for s in sockets]
        self.endpoint = Endpoint(
            Methods(app, Invoker(self.loop, config.tool_threads), config.secret),
            SessionStore(config.secret, f"w{config.slot}", idle_timeout=config.session_idle_timeout),
            AllowList(config.allowed_hosts or default_hosts(bind_hosts)),
            AllowList(config.allowed_origins or loopback_origins()),
            config.path,
        )
        app.runtime = Runtime(self.endpoint)
        self.stopping = asyncio.Event()
        self.immediate = False

    async def start(self) -> None:
        for sock in self.sockets:
            server = await self.loop.create_server(
                lambda: HttpConnection(self.endpoint.handle, self.config.limits, self.connections),
                sock=sock, backlog=2048)
            self.servers.append(server)
        self.loop.call_later(1.0, self._sweep)

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
        if not self.stopping.is_set():
            self.loop.call_later(1.0, self._sweep)

    def request_stop(self, immediate: bool) -> None:
        self.immediate = self.immediate or immediate
        self.stopping.set()

    async def drain(self) -> None:
        """Stop accepting, end streams, finish in-flight requests within the graceful timeout."""
        for server in self.servers:
            server.close()
        for session in list(self.endpoint.sessions.sessions.values()):
            get_stream = session.get_stream
            if get_stream is not None and get_stream.live is not None:
                get_stream.live.end()  # clean end: the client reconnects, to whichever worker remains
        for listener in list(self.endpoint.modern.listeners):
            listener.stream.end()
        for connection in list(self.connections):
            connection.close_when_idle()
        deadline = self.loop.time() + (0 if self.immediate else self.config.graceful_timeout)
        while self.connections and self.loop.time() < deadline and not self.immediate:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()


async def serve(config: WorkerConfig, sockets: list[socket.socket], ready: Any = None) -> None:
    app = load_app(config.app)
    worker = Worker(config, app, sockets)
    loop = asyncio.get_running_loop()
    for signum, immediate in ((signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGQUIT, True)):
        loop.add_signal_handler(signum, worker.request_stop, immediate)
    async with app.run_lifespans():
        await worker.start()
        if ready is not None:
            ready()
        await worker.stopping.wait()
        await worker.drain()
    worker.endpoint.methods.invoker.shutdown()


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run(config: WorkerConfig, sockets: list[socket.socket]) -> None:
    if not config.secret:
        config.secret = os.urandom(32)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(config, sockets))
