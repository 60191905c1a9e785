"""Debian's chromium, headless, driven over the Chrome DevTools Protocol on `--remote-debugging-pipe`.

Why not Selenium and chromedriver: the dashboard test needs four things (open a page, evaluate an
expression, capture a screenshot, see what the page fetched and threw), which are four CDP commands.
The pipe gives them with the standard library alone: no Python dependency whose version must track
the browser's, no chromedriver process in between, and no debugging port listening at all, not even
on loopback. The wire format is Chromium's: JSON messages, each ended by a NUL byte, written to the
browser's fd 3 and read from its fd 4.

The browser runs in its own session (start_new_session) and is stopped with killpg, TERM then KILL.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--no-default-browser-check", "--remote-debugging-pipe")
CHILD_IN, CHILD_OUT = 3, 4  # the fds Chromium reads commands from and writes answers to


class BrowserError(RuntimeError):
    """The browser exited, answered a command with an error, or said nothing before a deadline."""


class Chromium:
    """One headless browser and one page (a flattened CDP session attached to one tab)."""

    def __init__(self, profile: Path, log_path: Path, width: int = 1280, height: int = 900) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            raise BrowserError("chromium is not installed: tests/run.sh installs it (apt-get install chromium)")
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()
        # Above the fds the child is given, so that placing them on 3 and 4 never overwrites one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, answers_write)]
        for fd in (commands_read, answers_write):
            os.close(fd)
        self._log = open(log_path, "wb")
        argv = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True, pass_fds=(CHILD_IN, CHILD_OUT),
                                         preexec_fn=lambda: _place(high))
        finally:
            for fd in high:
                os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []  # every event received so far, in order
        self.session = ""

    # -- the protocol ------------------------------------------------------------------------------
    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0,
             session: bool = True) -> dict[str, Any]:
        """One command and its result; events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise BrowserError(f"no answer to {waiting_for} in time:\n{self.output()}")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited while answering {waiting_for}:\n{self.output()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def output(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-4000:]

    # -- one page ----------------------------------------------------------------------------------
    def open(self, url: str, timeout: float = 30.0) -> None:
        """A new tab, attached, with page, runtime and network events on; loads `url` and waits for it."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, timeout, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, timeout,
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable", timeout=timeout)
        self.send("Page.navigate", {"url": url}, timeout)
        self.wait_for("document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str, timeout: float = 10.0) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Poll a page expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {expression}")
            time.sleep(interval)

    def screenshot(self, *paths: Path) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
                               ["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        return png

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def exceptions(self) -> list[str]:
        """Uncaught page exceptions and console errors, as one line each."""
        details = [e["params"]["exceptionDetails"] for e in self.events if e.get("method") == "Runtime.exceptionThrown"]
        found = [str(d.get("exception", {}).get("description") or d.get("text")) for d in details]
        return found + [e["params"]["entry"].get("text", "") for e in self.events
                        if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"]

    # -- the process -------------------------------------------------------------------------------
    def close(self) -> None:
        """Browser.close first (a clean exit), then killpg TERM and KILL for whatever of its group is left:
        renderers and zygotes of this browser are in its session's process group."""
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=5.0, session=False)
                self.proc.wait(5.0)
        except (BrowserError, OSError, subprocess.TimeoutExpired):
            pass
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                continue
        for fd in (self._commands, self._answers):
            os.close(fd)
        self._log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _place(fds: list[int]) -> None:
    """In the child, before exec: the command pipe on fd 3, the answer pipe on fd 4 (both inheritable)."""
    os.dup2(fds[0], CHILD_IN)
    os.dup2(fds[1], CHILD_OUT)
