"""Helpers for the supervisor's integration tests: a running cluster seen from outside (its process
titles, its children, its sockets), and echo requests over raw HTTP/1.1 (the load client that counts
every request is in supervisor_load.py).

Nothing here talks to the master except through what an operator has: signals, the port, /proc and
the log.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import Process, RawHttp, Reply, free_port, mcpherd_args, modern_call, wait_until

MASTER_TITLE = re.compile(r"^mcpherd: master \[gen (\d+)\] (\d+) workers (.+)$")
WORKER_TITLE = re.compile(r"^mcpherd: worker (\d+) \[cpu (\d+), gen (\d+)\]$")
LATENCY_LINE = re.compile(r"slot (\d+): worker (\d+) accepting ([\d.]+) ms after its predecessor died")


# -- /proc -------------------------------------------------------------------------------------------
def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def proc_state(pid: int) -> str:
    """The one-letter state of /proc/<pid>/stat ("" once the pid is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in ("", "Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status_field(pid: int, name: str) -> str:
    match = re.search(rf"^{name}:\s+(\S+)$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match is not None, name
    return match.group(1)


def thread_count(pid: int) -> int:
    return int(_status_field(pid, "Threads"))


def cpus_allowed(pid: int) -> str:
    return _status_field(pid, "Cpus_allowed_list")


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


@dataclass(frozen=True)
class TcpSocket:
    remote_port: int
    listening: bool
    queue: int  # listening: connections waiting in its accept queue; otherwise bytes not yet read
    inode: int  # 0 for sockets no process holds (TIME_WAIT)


def tcp_sockets(port: int) -> list[TcpSocket]:
    """Every TCP socket of this network namespace whose local port is `port`, from the kernel's socket
    diagnostics (`ss`): filtered in the kernel, so it stays fast with tens of thousands of TIME_WAIT
    sockets around, where reading /proc/net/tcp takes seconds."""
    found = []
    for states, listening in ((["listening"], True), (["connected", "exclude", "time-wait"], False)):
        lines = subprocess.run(["ss", "-tnHe", "state", *states, f"( sport = :{port} )"], capture_output=True,
                               text=True, check=True, timeout=30).stdout.splitlines()
        for fields in (line.split() for line in lines):
            fields = fields if fields[0].isdigit() else fields[1:]  # several states: a State column first
            inode = next((int(f[4:]) for f in fields if f.startswith("ino:")), 0)
            peer_port = fields[3].rpartition(":")[2]
            found.append(TcpSocket(int(peer_port) if peer_port.isdigit() else 0, listening, int(fields[0]), inode))
    return found


def accept_queue(pid: int, port: int) -> int:
    """Connections queued on the listening socket(s) that process `pid` holds for `port`."""
    inodes = socket_inodes(pid)
    return sum(s.queue for s in tcp_sockets(port) if s.listening and s.inode in inodes)


def client_ports_of(pid: int, port: int) -> set[int]:
    """The client-side ports of the connections that process `pid` has accepted on `port`."""
    inodes = socket_inodes(pid)
    return {s.remote_port for s in tcp_sockets(port) if not s.listening and s.inode in inodes}


def request_read(pid: int, port: int) -> bool:
    """Process `pid` accepted a connection on `port` and read all that was sent on it."""
    inodes = socket_inodes(pid)
    return any(s.inode in inodes and s.queue == 0 for s in tcp_sockets(port) if not s.listening)


def stop_and_wait(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP, then poll until the kernel reports the process stopped (it can no longer accept)."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: proc_state(pid) in ("T", "t", "", "Z"), timeout, 0.002, f"{pid} to stop")


# -- a cluster seen from outside ---------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerTitle:
    slot: int
    cpu: int
    generation: int


class Herd:
    """A master started with `mcpherd serve`, its workers, its port and its log, seen from outside."""

    def __init__(self, process: Process, port: int) -> None:
        self.process = process
        self.port = port
        self.master = process.pid  # follows a SIGUSR2 upgrade (the test sets it)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def log(self) -> str:
        return self.process.output()

    def signal(self, signum: int) -> None:
        os.kill(self.master, signum)

    def title(self) -> tuple[int, int] | None:
        """(generation, ready workers) from the master's process title."""
        match = MASTER_TITLE.match(cmdline(self.master))
        return (int(match.group(1)), int(match.group(2))) if match else None

    def workers(self) -> dict[int, WorkerTitle]:
        """The master's live worker processes by pid (draining ones included)."""
        found = {}
        for pid in children(self.master):
            match = WORKER_TITLE.match(cmdline(pid))
            if match and alive(pid):
                found[pid] = WorkerTitle(*(int(g) for g in match.groups()))
        return found

    def settled(self, count: int, generation: int) -> dict[int, WorkerTitle] | None:
        """The workers, once exactly `count` of `generation` serve slots 0..count-1 and nothing else is
        left (no older generation draining, no zombie waiting to be reaped); else None."""
        if self.title() != (generation, count):
            return None
        workers = self.workers()
        if len(children(self.master)) != count or len(workers) != count:
            return None
        if sorted(w.slot for w in workers.values()) != list(range(count)):
            return None
        return workers if all(w.generation == generation for w in workers.values()) else None

    def wait_settled(self, count: int, generation: int, timeout: float = 30.0) -> dict[int, WorkerTitle]:
        def check() -> dict[int, WorkerTitle] | None:
            if self.master == self.process.pid and self.process.proc.poll() is not None:
                raise AssertionError(f"the master exited ({self.process.proc.returncode}):\n{self.log()}")
            return self.settled(count, generation)
        try:
            return wait_until(check, timeout, 0.02, f"{count} workers of generation {generation}")  # type: ignore[no-any-return]
        except TimeoutError:
            raise AssertionError(f"{cmdline(self.master)!r}, workers {self.workers()}:\n{self.log()}") from None

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[re.Match[str]]:
        regex = re.compile(pattern)

        def found() -> list[re.Match[str]] | None:
            matches = list(regex.finditer(self.log()))
            return matches if len(matches) >= count else None
        try:
            return wait_until(found, timeout, 0.02, f"{count} x {pattern!r} in the log")  # type: ignore[no-any-return]
        except TimeoutError:
            raise AssertionError(f"{count} x {pattern!r} not logged:\n{self.log()}") from None

    def worker_on_slot(self, slot: int) -> int:
        pids = [pid for pid, w in self.workers().items() if w.slot == slot]
        assert len(pids) == 1, self.workers()
        return pids[0]


def serve_args(port: int, tmp_path: Path, *extra: str) -> list[str]:
    """`mcpherd serve` on 127.0.0.1:`port`, with its own admin socket and no metrics listener, so that
    no two clusters (of these tests or anyone else's on this machine) share a path or a port."""
    admin = tmp_path / "admin.sock"
    if len(str(admin)) > 100:  # AF_UNIX paths are limited to 108 bytes
        admin = Path(tempfile.mkdtemp(prefix="mcpherd-", dir="/tmp")) / "admin.sock"
    return mcpherd_args("serve", "--bind", f"127.0.0.1:{port}", "--admin-socket", str(admin),
                        "--metrics-bind", "off", *extra)


def start_herd(spawn: Callable[..., Process], tmp_path: Path, workers: int, *extra: str, name: str = "mcpherd",
               env: dict[str, str] | None = None, settle: bool = True) -> Herd:
    port = free_port()
    herd = Herd(spawn(serve_args(port, tmp_path, "--workers", str(workers), *extra), name=name, env=env), port)
    if settle:
        herd.wait_settled(workers, 1)
    return herd


def write_config(path: Path, **settings: object) -> Path:
    """A TOML file from keyword settings; a dict value becomes a table."""
    lines, tables = [], []
    for key, value in settings.items():
        if isinstance(value, dict):
            tables += [f"[{key}]", *(f"{k} = {json.dumps(v)}" for k, v in value.items())]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines + tables) + "\n")
    return path


# -- requests ----------------------------------------------------------------------------------------
def tool_text(reply: Reply) -> str:
    assert reply.status == 200, reply
    return str(reply.json()["result"]["content"][0]["text"])


def echo(url: str, text: str, timeout: float = 10.0) -> str:
    """One 2026-07-28 tools/call echo on a new connection; the text it answered."""
    with RawHttp(url, timeout) as http:
        return tool_text(modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": text}}))


def echo_request(port: int, text: str, close: bool = False) -> bytes:
    """The raw bytes of one stateless tools/call echo, as the issue spells it."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": text},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
    head = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nMCP-Protocol-Version: 2026-07-28\r\n"
            "Mcp-Method: tools/call\r\nMcp-Name: echo\r\nAccept: application/json, text/event-stream\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


def echoed(status: int, body: bytes) -> str:
    if status != 200:
        raise ValueError(f"HTTP {status}: {body[:200]!r}")
    return str(json.loads(body)["result"]["content"][0]["text"])


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one content-length HTTP/1.1 response, from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server inside a response body")
        body += chunk
    return int(status_line.split()[1]), body


class QueuedRequests:
    """`count` new connections, each with one echo request written at once (nothing read yet)."""

    def __init__(self, port: int, count: int, tag: str) -> None:
        self.texts = [f"{tag}-{i}" for i in range(count)]
        self.sockets = []
        for text in self.texts:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30.0)
            sock.sendall(echo_request(port, text, close=True))
            self.sockets.append(sock)

    def answered(self) -> int:
        """How many connections have something to read (an answer, or an end), reading nothing."""
        poller = select.poll()
        for sock in self.sockets:
            poller.register(sock, select.POLLIN)
        return len(poller.poll(0))

    def results(self) -> list[str]:
        """Each connection's answer, or the error it got instead, in order."""
        out = []
        for sock in self.sockets:
            try:
                out.append(echoed(*read_response(sock)))
            except (OSError, ValueError) as exc:
                out.append(f"{type(exc).__name__}: {exc}")
            finally:
                sock.close()
        return out
