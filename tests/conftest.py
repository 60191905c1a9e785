"""Shared helpers for tests that start real processes.

Every process a test starts runs in its own session and is torn down with killpg (TERM, then KILL);
every wait polls until a deadline; every address is loopback; every port is free.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TOOLS = Path(os.environ.get("MCPHERD_TOOLS", Path.home() / ".cache" / "mcpherd-tools"))
NODE = TOOLS / "node22" / "node_modules" / ".bin" / "node"
CONFORMANCE = {
    "0.1.16": TOOLS / "conformance-0.1.16" / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js",
    "0.2.0": TOOLS / "conformance-0.2.0" / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js",
}


_ports_given: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the kernel's ephemeral range, and never the same twice in a test session.

    Below the ephemeral range, because a port the kernel handed out (bind to 0) stays in that range: a
    process under test that opens a connection (to Redis, say) may take it as its local port before the
    server meant to listen on it starts, in this network namespace or in another where the port was
    never checked. Never twice, because two ports checked one after the other may be the same one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(10_000):
        port = rng.randrange(max(1024, low - 12_000), low)
        if port in _ports_given:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free port below {low} on {host}")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Process:
    """A child in its own session, output to a file, stopped with killpg TERM then KILL."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, **(env or {})}, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        # The group may still hold grandchildren (workers) after the leader exited.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(args: list[str], name: str = "proc", **kwargs: Any) -> Process:
        process = Process(args, tmp_path / f"{name}-{len(started)}.log", **kwargs)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


def mcpherd_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "mcpherd", *extra]


@pytest.fixture
def server(spawn: Callable[..., Process], tmp_path: Path) -> Iterator[str]:
    """A master with one worker serving the demo app; yields its endpoint URL. Its admin socket and
    metrics port are its own, so it never collides with another master on the machine."""
    port = free_port()
    process = spawn(mcpherd_args("serve", "--workers", "1", "--bind", f"127.0.0.1:{port}", "--metrics-bind", "off",
                                 "--admin-socket", str(tmp_path / "server-admin.sock")), name="server")
    wait_until(lambda: port_open("127.0.0.1", port) or process.proc.poll() is not None, message="server port")
    assert process.proc.poll() is None, process.output()
    yield f"http://127.0.0.1:{port}/mcp"


# -- raw HTTP/1.1 and MCP wire helpers (no client library between the test and the bytes) -------------
HANDSHAKE_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
BOTH_ACCEPTED = "application/json, text/event-stream"
WATCHED = "test://watched-resource"  # the demo app's resource whose updates a tool triggers


@dataclass
class Reply:
    """One HTTP response: status, lower-cased headers, the de-chunked body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Event]:
        return parse_sse(self.body.decode())

    def messages(self) -> list[Any]:
        """The JSON-RPC messages of an SSE body (priming events carry no data and are skipped)."""
        return [e.json() for e in self.events() if e.data]


@dataclass
class Event:
    id: str | None
    data: str
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(text: str) -> list[Event]:
    """Server-sent events (comment lines ignored), as the WHATWG parsing rules define them."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if fields:
            retry = fields.get("retry", [None])[0]
            events.append(Event(fields.get("id", [None])[-1], "\n".join(fields.get("data", [])),
                                int(retry) if retry else None))
    return events


class RawHttp:
    """A blocking HTTP/1.1 client on one socket: requests are written as given, responses read as sent."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.path = parsed.path or "/"
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def build(self, method: str, headers: dict[str, str] | None = None, body: bytes = b"",
              path: str | None = None) -> bytes:
        head = {"host": f"{self.host}:{self.port}", **{k.lower(): v for k, v in (headers or {}).items()}}
        if body or method == "POST":
            head.setdefault("content-length", str(len(body)))
        lines = [f"{method} {path or self.path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def request(self, method: str, headers: dict[str, str] | None = None, body: bytes = b"",
                path: str | None = None) -> Reply:
        self.send(self.build(method, headers, body, path))
        return self.read_reply()

    # -- reading -------------------------------------------------------------------------------
    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self._buffer += data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._fill()
        line, _, self._buffer = self._buffer.partition(marker)
        return line

    def _read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def read_head(self) -> tuple[int, dict[str, str]]:
        status_line, *lines = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split(" ", 2)[1]), headers

    def read_chunk(self) -> bytes:
        """One chunk of a chunked body; b"" for the terminating chunk."""
        size = int(self._read_until(b"\r\n").split(b";")[0], 16)
        if size == 0:
            self._read_until(b"\r\n")
            return b""
        data = self._read_exact(size)
        self._read_exact(2)
        return data

    def read_reply(self) -> Reply:
        status, headers = self.read_head()
        if headers.get("transfer-encoding") == "chunked":
            body = b"".join(iter(self.read_chunk, b""))
        else:
            body = self._read_exact(int(headers.get("content-length", "0")))
        return Reply(status, headers, body)

    def iter_events(self) -> Iterator[Event]:
        """The events of a chunked SSE body as they arrive; ends with the stream."""
        text = ""
        while True:
            chunk = self.read_chunk()
            if not chunk:
                break
            text += chunk.decode()
            *complete, text = text.split("\n\n")
            for block in complete:
                yield from parse_sse(block + "\n\n")

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within the timeout."""
        return closed_by_peer(self.sock, timeout)


def mcp_headers(session: str | None = None, version: str | None = HANDSHAKE_VERSION,
                **extra: str) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": BOTH_ACCEPTED}
    if version is not None:
        headers["mcp-protocol-version"] = version
    if session is not None:
        headers["mcp-session-id"] = session
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


def rpc_body(method: str, params: dict[str, Any] | None = None, request_id: int | str | None = 1) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        message["id"] = request_id
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def initialize(http: RawHttp, version: str = HANDSHAKE_VERSION, capabilities: dict[str, Any] | None = None,
               authorization: str | None = None) -> str:
    """The handshake (initialize + notifications/initialized); returns the session id."""
    extra = {"authorization": authorization} if authorization else {}
    reply = http.request("POST", mcp_headers(version=None, **extra), rpc_body("initialize", {
        "protocolVersion": version, "capabilities": capabilities or {},
        "clientInfo": {"name": "mcpherd-tests", "version": "1"}}))
    assert reply.status == 200, reply
    session = reply.headers["mcp-session-id"]
    done = http.request("POST", mcp_headers(session, version, **extra), rpc_body("notifications/initialized", None, None))
    assert done.status == 202, done
    return session


def modern_meta(capabilities: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
            "io.modelcontextprotocol/clientCapabilities": capabilities or {}, **extra}


def modern_headers(method: str, name: str | None = None, **extra: str) -> dict[str, str]:
    headers = mcp_headers(version=MODERN_VERSION, mcp_method=method, **extra)
    if name is not None:
        headers["mcp-name"] = name
    return headers


def modern_call(http: RawHttp, method: str, params: dict[str, Any], request_id: int = 1,
                capabilities: dict[str, Any] | None = None) -> Reply:
    """One stateless 2026-07-28 request with a correct envelope and headers."""
    name = params.get("uri") if method == "resources/read" else params.get("name")
    body = rpc_body(method, {**params, "_meta": modern_meta(capabilities, **params.get("_meta", {}))}, request_id)
    return http.request("POST", modern_headers(method, name if isinstance(name, str) else None), body)


def start_worker(start: Callable[..., Process], config: str = "", name: str = "worker") -> str:
    """A worker started through the Python API, for settings the command line does not expose.

    `config` is a WorkerConfig keyword list, e.g. "limits=HttpLimits(request_timeout=1.0)".
    """
    port = free_port()
    script = ("from mcpherd.worker.server import WorkerConfig, listen, run\n"
              "from mcpherd.worker.limits import HttpLimits\n"
              f"run(WorkerConfig({config}), [listen('127.0.0.1', {port})])\n")
    process = start([sys.executable, "-c", script], name=name)
    wait_until(lambda: port_open("127.0.0.1", port) or process.proc.poll() is not None, message="worker port")
    assert process.proc.poll() is None, process.output()
    return f"http://127.0.0.1:{port}/mcp"


@pytest.fixture
def worker(spawn: Callable[..., Process]) -> str:
    """One worker process serving the demo app, without a master in front: the MCP server of issue 2.

    Handshake-era state that spans connections (pending sampling answers, stream logs for Last-Event-ID,
    the GET stream) lives in the worker holding the session, so the protocol tests talk to exactly one.
    """
    return start_worker(spawn)


# -- a whole cluster: the master, its workers, its admin socket and /metrics ----------------------------
@dataclass
class Cluster:
    """A running `mcpherd serve --workers N`; `url` is its MCP endpoint, shared by every worker."""

    process: Process
    url: str
    admin_socket: str
    metrics_url: str
    workers: int

    def admin(self, cmd: str, **args: Any) -> Any:
        from mcpherd.ctl import AdminClient

        client = AdminClient(self.admin_socket)
        try:
            return client.call(cmd, **args)
        finally:
            client.close()

    def status(self) -> dict[str, Any]:
        return dict(self.admin("status"))

    def serving(self, generation: int | None = None) -> list[dict[str, Any]]:
        """The ready workers (of `generation`, when given), one per slot."""
        return [w for w in self.status()["workers"] if w["state"] == "ready"
                and (generation is None or w["generation"] == generation)]

    def worker_pids(self) -> set[int]:
        return {w["pid"] for w in self.serving()}

    def wait_serving(self, generation: int | None = None, timeout: float = 20.0,
                     without: frozenset[int] | set[int] = frozenset()) -> set[int]:
        """Wait until `workers` slots have a ready worker (none of them in `without`); their pids."""
        def ready() -> set[int] | None:
            from mcpherd.ctl import Unreachable

            try:
                pids = {w["pid"] for w in self.serving(generation)}
            except Unreachable:
                if self.process.proc.poll() is not None:
                    raise AssertionError(f"the master exited:\n{self.process.output()}") from None
                return None
            return pids if len(pids) == self.workers and not pids & without else None
        return set(wait_until(ready, timeout, 0.05, f"{self.workers} ready workers"))

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())


def start_cluster(start: Callable[..., Process], directory: str, workers: int = 4, *extra: str) -> Cluster:
    """`mcpherd serve` on free loopback ports, its admin socket in `directory`; returns once all serve."""
    port, metrics_port = free_port(), free_port()
    admin_socket = os.path.join(directory, "admin.sock")
    process = start(mcpherd_args("serve", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                                 "--admin-socket", admin_socket, "--metrics-bind", f"127.0.0.1:{metrics_port}",
                                 *extra), name="cluster")
    cluster = Cluster(process, f"http://127.0.0.1:{port}/mcp", admin_socket,
                      f"http://127.0.0.1:{metrics_port}/metrics", workers)
    wait_until(lambda: os.path.exists(admin_socket) or process.proc.poll() is not None, 20.0, message="admin socket")
    cluster.wait_serving()
    return cluster


@pytest.fixture
def clusters(spawn: Callable[..., Process]) -> Iterator[Callable[..., Cluster]]:
    """Starts clusters: `clusters(workers, *extra_serve_flags)`; stops them and removes their files."""
    started: list[tuple[Cluster, str]] = []

    def start(workers: int = 4, *extra: str) -> Cluster:
        # AF_UNIX paths are limited to 108 bytes, and pytest's tmp_path can be longer than that.
        directory = tempfile.mkdtemp(prefix="mcpherd-test-", dir="/tmp")
        started.append((start_cluster(spawn, directory, workers, *extra), directory))
        return started[-1][0]

    yield start
    for cluster, directory in reversed(started):
        cluster.process.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def cluster(clusters: Callable[..., Cluster]) -> Cluster:
    """Four workers on a shared port (more workers than this machine's 2 CPUs, as the issue asks)."""
    return clusters(4)


def whoami(http: RawHttp) -> int:
    """The pid of the worker serving this connection (the demo app's `whoami` tool, stateless call)."""
    reply = modern_call(http, "tools/call", {"name": "whoami", "arguments": {}}, 900)
    assert reply.status == 200, reply
    return int(reply.json()["result"]["structuredContent"]["result"])


def connect_to_workers(url: str, pids: set[int], timeout: float = 20.0) -> dict[int, RawHttp]:
    """One open keep-alive connection per worker pid in `pids`.

    The kernel steers each new connection to a random worker of the SO_REUSEPORT group, so open fresh
    connections until every wanted worker holds one; the others are closed.
    """
    held: dict[int, RawHttp] = {}

    def all_held() -> bool:
        http = RawHttp(url)
        pid = whoami(http)
        if pid in pids and pid not in held:
            held[pid] = http
        else:
            http.close()
        return held.keys() == pids

    try:
        wait_until(all_held, timeout, 0.0, f"a connection to each of the workers {sorted(pids)}")
    except BaseException:
        for http in held.values():
            http.close()
        raise
    return held


def open_stream(http: RawHttp, method: str, headers: dict[str, str], body: bytes = b"") -> Iterator[Event]:
    """Send a request answered with an SSE stream; its events as they arrive (priming events included)."""
    http.send(http.build(method, headers, body))
    status, head = http.read_head()
    assert status == 200 and head.get("content-type", "").startswith("text/event-stream"), (status, head)
    return http.iter_events()


def next_message(events: Iterator[Event]) -> tuple[str | None, Any]:
    """The next JSON-RPC message of a stream and its event id (priming events are skipped)."""
    for event in events:
        if event.data:
            return event.id, event.json()
    raise AssertionError("the stream ended")


def stream_headers(session: str, last_event_id: str | None = None) -> dict[str, str]:
    """A handshake-era GET for the session's stream, or a resumption when `last_event_id` is given."""
    headers = {"accept": "text/event-stream", "mcp-session-id": session, "mcp-protocol-version": HANDSHAKE_VERSION}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    return headers


def session_call(http: RawHttp, session: str, method: str, params: dict[str, Any],
                 request_id: int = 1) -> dict[str, Any]:
    """A handshake-era request answered by one message (JSON, or an SSE stream ending with it): its result."""
    reply = http.request("POST", mcp_headers(session), rpc_body(method, params, request_id))
    assert reply.status == 200, reply
    message = reply.json() if reply.headers["content-type"].startswith("application/json") else reply.messages()[-1]
    assert message.get("id") == request_id and "error" not in message, message
    return dict(message["result"])


def tool_text(result: dict[str, Any]) -> str:
    """The text of a tool result's first content block."""
    return str(result["content"][0]["text"])


# -- Redis: a real redis-server (never a fake), and clusters bound to any address -----------------------
class Spawner:
    """`spawn` for processes that outlive one test (a module's shared hosts): stop_all() stops them, newest first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    def __call__(self, args: list[str], name: str = "proc", **kwargs: Any) -> Process:
        self.started.append(Process(args, self.directory / f"{name}-{len(self.started)}.log", **kwargs))
        return self.started[-1]

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


@dataclass
class RedisServer:
    """`redis-server` without persistence on host:port, in its own session. `wrap` prefixes the command
    (`ip netns exec NS`). kill() then start() again on the same port is an outage; pause() a hung Redis."""

    spawn: Callable[..., Process]
    host: str = "127.0.0.1"
    port: int = 0
    wrap: tuple[str, ...] = ()
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: tests/run.sh installs it (apt-get install redis-server)")
        self.port = self.port or free_port()
        process = self.spawn([*self.wrap, binary, "--port", str(self.port), "--bind", self.host, "--save", "",
                              "--appendonly", "no", "--protected-mode", "no"], name="redis")
        self.process = process
        wait_until(lambda: port_open(self.host, self.port) or process.proc.poll() is not None, 10.0,
                   message="redis-server port")
        assert process.proc.poll() is None, process.output()
        return self

    def kill(self) -> None:
        """SIGKILL, as in a crash: no client is told anything."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.proc.wait(10)

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP (a hung Redis: connections stay open, nothing answers) or SIGCONT."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def client(self) -> Any:
        import redis

        return redis.Redis(host=self.host, port=self.port, socket_timeout=5, socket_connect_timeout=5)


@pytest.fixture
def redis_server(spawn: Callable[..., Process]) -> RedisServer:
    """A fresh redis-server on a free loopback port, stopped with the test."""
    return RedisServer(spawn).start()


def start_cluster_at(start: Callable[..., Process], directory: str, host: str, workers: int, *extra: str,
                     wrap: tuple[str, ...] = ()) -> Cluster:
    """start_cluster bound to `host` (any local address, or one inside a network namespace through `wrap`)."""
    port, metrics_port = free_port(), free_port()
    admin_socket = os.path.join(directory, "admin.sock")
    process = start([*wrap, *mcpherd_args("serve", "--workers", str(workers), "--bind", f"{host}:{port}",
                                          "--admin-socket", admin_socket, "--metrics-bind", f"{host}:{metrics_port}",
                                          *extra)], name=f"cluster-{host}-{port}")
    cluster = Cluster(process, f"http://{host}:{port}/mcp", admin_socket, f"http://{host}:{metrics_port}/metrics",
                      workers)
    wait_until(lambda: os.path.exists(admin_socket) or process.proc.poll() is not None, 20.0, message="admin socket")
    cluster.wait_serving()
    return cluster


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample `name` in a Prometheus exposition, or None when absent."""
    for line in text.splitlines():
        sample, _, value = line.partition(" ")
        if sample == name:
            return float(value)
    return None


def host_id(cluster: Cluster) -> str:
    """The 8-hex id a Redis-linked cluster logs when its bridge starts (ids it owns begin with it)."""
    import re

    found = wait_until(lambda: re.search(r"host id ([0-9a-f]{8})", cluster.process.output()), 10.0,
                       message="the cluster's host id in its log")
    return str(found[1])


def wait_redis_up(cluster: Cluster, up: bool = True, timeout: float = 20.0) -> None:
    """Wait until the cluster's /metrics says mcpherd_redis_up is 1 (or 0)."""
    wait_until(lambda: metric_value(cluster.scrape(), "mcpherd_redis_up") == float(up), timeout, 0.05,
               f"mcpherd_redis_up {int(up)}")


# -- the operator's command line, as a user runs it ----------------------------------------------------
@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> CliResult:
    """`mcpherd <args>` in a child process: its exit code, stdout and stderr."""
    done = subprocess.run(mcpherd_args(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    return CliResult(done.returncode, done.stdout, done.stderr)


def assert_one_sentence(text: str) -> None:
    """An operator-facing error: one line on stderr, prefixed `mcpherd:`, never a traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcpherd: ") and "Traceback" not in text, text


def session_processes(sid: int) -> list[int]:
    """The live processes of session `sid` (a Process is its own session leader). A master started by a
    SIGUSR2 upgrade is not the old master's child, but it stays in the session."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split() if entry.name.isdigit() else []
        except OSError:
            continue
        if fields and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            found.append(int(entry.name))
    return found


def send_in_pieces(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    """Send `data` cut at the offsets `cuts` (any order; out of range ignored), pausing after each piece
    so that each arrives in a read of its own."""
    start = 0
    for end in sorted({cut for cut in cuts if 0 < cut < len(data)}) + [len(data)]:
        sock.sendall(data[start:end])
        start = end
        time.sleep(0.002)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes `sock` (EOF or reset) within the timeout; what is still unread is dropped."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
