"""SIGUSR2: replace the master binary without closing a listening socket (nginx's binary upgrade).

    old master            fork + exec `python -m mcpherd <same args>`, handing over every listening
                          socket (MCPHERD_LISTEN_FDS) and the cluster secret (a memfd), so sessions
                          and request states stay valid
    new master            adopts the sockets, starts its own workers (next generation, new code)
                          and, once every one of them accepts, sends SIGTERM to the old master
    old master            drains its workers gracefully and exits without touching the sockets

If the new master dies before it takes over, the old one reaps it, logs why and keeps serving.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from mcpherd.supervisor.sockets import INHERIT_ENV

if TYPE_CHECKING:
    from mcpherd.supervisor.master import Master

log = logging.getLogger("mcpherd.master")
FROM_ENV = "MCPHERD_UPGRADE_FROM"
SECRET_ENV = "MCPHERD_SECRET_FD"
SOCKETS_ENV = "MCPHERD_CONTROL_FDS"


class Upgrade:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.child_pid = 0  # the new master we started (old side)
        self.predecessor = int(os.environ.pop(FROM_ENV, "0"))  # the master we replace (new side)
        self.handed_over = False
        self.failed = ""

    # -- old master ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.child_pid:
            log.warning("SIGUSR2 ignored: an upgrade (new master %d) is already in progress", self.child_pid)
            return
        secret_fd = os.memfd_create("mcpherd-secret", 0)
        os.write(secret_fd, self.master.secret)
        handover = ";".join(group.inheritable() for group in self.master.groups)
        extra = {name: sock for name, sock in (("admin", self._admin()), ("metrics", self._metrics())) if sock}
        env = {**os.environ, INHERIT_ENV: handover, SECRET_ENV: str(secret_fd), FROM_ENV: str(os.getpid()),
               "MCPHERD_GENERATION": str(self.master.generation + 1),
               SOCKETS_ENV: ",".join(f"{name}={sock.fileno()}" for name, sock in extra.items())}
        notifier = self.master.notifier
        if notifier.enabled:  # the new master becomes the main pid: systemd must hear from it
            env["NOTIFY_SOCKET"] = notifier.address
            if notifier.watchdog_interval:
                env["WATCHDOG_USEC"] = str(int(notifier.watchdog_interval * 2e6))
        argv = [sys.executable, "-m", "mcpherd", *sys.argv[1:]]
        pid = os.fork()
        if pid == 0:
            try:
                os.set_inheritable(secret_fd, True)
                for sock in extra.values():
                    os.set_inheritable(sock.fileno(), True)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        for group in self.master.groups:  # only the child needed them inheritable
            for sock in group.sockets:
                os.set_inheritable(sock.fileno(), False)
        os.close(secret_fd)
        self.child_pid = pid
        log.info("upgrade: started new master %d", pid)

    def reaped(self, pid: int, status: int) -> bool:
        """True if `pid` was the new master: it died before taking over."""
        if pid != self.child_pid or not pid:
            return False
        self.child_pid = 0
        self.failed = f"new master {pid} exited with status {os.waitstatus_to_exitcode(status)} before taking over"
        log.error("upgrade failed, this master keeps serving: %s", self.failed)
        return True

    def superseded(self) -> bool:
        """A SIGTERM while our new master lives is the hand-over signal."""
        if self.child_pid:
            self.handed_over = True
        return self.handed_over

    def _admin(self) -> socket.socket | None:
        return self.master.admin.listener if self.master.admin is not None else None

    def _metrics(self) -> socket.socket | None:
        server = self.master.metrics_server
        return server.listener if server is not None else None

    # -- new master ----
    def inherited_socket(self, name: str) -> socket.socket | None:
        """The admin or metrics listener handed over by the master we replace (else None)."""
        for entry in filter(None, os.environ.get(SOCKETS_ENV, "").split(",")):
            key, _, fd = entry.partition("=")
            if key == name:
                sock = socket.socket(fileno=int(fd))
                os.set_inheritable(sock.fileno(), False)
                return sock
        return None

    def inherited_secret(self) -> bytes:
        fd = os.environ.pop(SECRET_ENV, "")
        if not fd:
            return b""
        secret = os.pread(int(fd), 4096, 0)
        os.close(int(fd))
        return secret

    def tick(self) -> None:
        if not self.predecessor:
            return
        slots = [s for s in self.master.slots if s.wanted]
        if slots and all(s.current is not None and s.current.state.value == "ready" for s in slots):
            log.info("upgrade: every worker of generation %d accepts; stopping old master %d",
                     self.master.generation, self.predecessor)
            self.master.notifier.mainpid(os.getpid())
            try:
                os.kill(self.predecessor, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.predecessor = 0
