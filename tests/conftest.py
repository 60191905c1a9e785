"""Shared helpers for tests that start real processes.

Every process a test starts runs in its own session and is torn down with killpg (TERM, then KILL);
every wait polls until a deadline; every address is loopback; every port is free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TOOLS = Path(os.environ.get("MCPHERD_TOOLS", Path.home() / ".cache" / "mcpherd-tools"))
NODE = TOOLS / "node22" / "node_modules" / ".bin" / "node"
CONFORMANCE = {
    "0.1.16": TOOLS / "conformance-0.1.16" / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js",
    "0.2.0": TOOLS / "conformance-0.2.0" / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js",
}


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
def server(spawn: Callable[..., Process]) -> Iterator[str]:
    """A single mcpherd worker serving the demo app; yields its endpoint URL."""
    port = free_port()
    process = spawn(mcpherd_args("serve", "--bind", f"127.0.0.1:{port}"), name="server")
    wait_until(lambda: port_open("127.0.0.1", port) or process.proc.poll() is not None, message="server port")
    assert process.proc.poll() is None, process.output()
    yield f"http://127.0.0.1:{port}/mcp"
