"""SIGUSR2: replace the master binary without closing a listening socket (nginx's binary upgrade).

    old master            fork twice + exec `python -m mcpherd <same args>` (see _spawn_new_master),
                          handing over every listening
                          socket (MCPHERD_LISTEN_FDS) and the cluster secret (a memfd), so sessions
                          and request states stay valid
    new master            adopts the sockets, starts its own workers (next generation, new code)
                          and, once every one of them accepts, writes "takeover" on the hand-over
                          channel (a SOCK_SEQPACKET socketpair) and sends SIGTERM to the old master
    old master            under systemd, sends MAINPID=<new master> (only the main pid may change the
                          main pid, NotifyAccess=main), writes "mainpid" back, then drains its workers
                          gracefully and exits without touching the sockets
    new master            on "mainpid" starts talking to systemd (READY=1, WATCHDOG=1, STATUS=)

A SIGTERM without "takeover" first is a stop request (systemd, an operator) arriving mid-upgrade: the
old master stops the new one too. If the new master dies before it takes over, its end of the channel
closes: the old one logs it and keeps serving.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

from mcpherd.supervisor.notify import HELD_ENV
from mcpherd.supervisor.sockets import INHERIT_ENV

if TYPE_CHECKING:
    from mcpherd.supervisor.master import Master

log = logging.getLogger("mcpherd.master")
FROM_ENV = "MCPHERD_UPGRADE_FROM"
SECRET_ENV = "MCPHERD_SECRET_FD"
SOCKETS_ENV = "MCPHERD_CONTROL_FDS"
HANDOVER_ENV = "MCPHERD_HANDOVER_FD"
TAKEOVER, MAINPID_SENT = b"takeover", b"mainpid"


class Upgrade:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.child_pid = 0  # the new master we started (old side)
        self.predecessor = int(os.environ.pop(FROM_ENV, "0"))  # the master we replace (new side)
        self.channel = _inherited_channel()  # to the other master, while an upgrade is under way
        self.handed_over = False
        self.aborted = False
        self.failed = ""

    # -- old master ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.child_pid or self.channel is not None:
            log.warning("SIGUSR2 ignored: an upgrade (new master %d) is still in progress",
                        self.child_pid or os.getpid())
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
            env.update({"NOTIFY_SOCKET": notifier.address, HELD_ENV: "1"})
            if notifier.watchdog_interval:
                env["WATCHDOG_USEC"] = str(int(notifier.watchdog_interval * 2e6))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env[HANDOVER_ENV] = str(theirs.fileno())
        argv = [sys.executable, "-m", "mcpherd", *sys.argv[1:]]
        intermediate = os.fork()
        if intermediate == 0:
            _spawn_new_master(argv, env, theirs, [secret_fd, *(sock.fileno() for sock in extra.values())])
        os.waitpid(intermediate, 0)
        for group in self.master.groups:  # only the new master needed them inheritable
            for sock in group.sockets:
                os.set_inheritable(sock.fileno(), False)
        os.close(secret_fd)
        theirs.close()
        ours.settimeout(5.0)
        try:
            pid = int(ours.recv(64))
        except (OSError, ValueError):
            log.error("upgrade failed, this master keeps serving: the new master could not be started")
            ours.close()
            return
        ours.setblocking(False)
        self.channel = ours
        self.child_pid = pid
        log.info("upgrade: started new master %d", pid)

    def reaped(self, pid: int, status: int) -> bool:
        """True if `pid` was the new master (only when this master is also the reaper of orphans)."""
        if pid != self.child_pid or not pid:
            return False
        self.child_pid = 0
        self._close_channel()
        if self.handed_over or self.aborted:
            return True
        self.failed = f"new master {pid} exited with status {os.waitstatus_to_exitcode(status)} before taking over"
        log.error("upgrade failed, this master keeps serving: %s", self.failed)
        return True

    def superseded(self) -> bool:
        """On SIGTERM: True if it is our new master taking over (it said so on the channel first)."""
        if not self.child_pid or self.handed_over or self.aborted:
            return self.handed_over
        if _receive(self.channel) == TAKEOVER:
            self.handed_over = True
            self.master.notifier.mainpid(self.child_pid)  # before the new master may speak
            _send(self.channel, MAINPID_SENT)
        else:
            self.aborted = True
            log.warning("stop requested during an upgrade: stopping the new master %d too", self.child_pid)
            os.kill(self.child_pid, signal.SIGTERM)
        return self.handed_over

    def _watch_new_master(self) -> None:
        """Old side: the new master is not our child (no SIGCHLD); its end of the channel closes if it dies."""
        if self.handed_over or self.aborted or self.channel is None:
            return
        try:
            if self.channel.recv(1, socket.MSG_PEEK):
                return  # "takeover": superseded() reads it on the SIGTERM that follows
        except BlockingIOError:
            return
        except OSError:
            pass
        self.failed = f"new master {self.child_pid} exited before taking over (its log lines say why)"
        log.error("upgrade failed, this master keeps serving: %s", self.failed)
        self.child_pid = 0
        self._close_channel()

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

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
        if self.child_pid:
            self._watch_new_master()
        if not self.predecessor:
            self._await_mainpid()
            return
        slots = [s for s in self.master.slots if s.wanted]
        if slots and all(s.current is not None and s.current.state.value == "ready" for s in slots):
            log.info("upgrade: every worker of generation %d accepts; stopping old master %d",
                     self.master.generation, self.predecessor)
            _send(self.channel, TAKEOVER)
            try:
                os.kill(self.predecessor, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.predecessor = 0

    def _await_mainpid(self) -> None:
        """New side, after "takeover": the old master's answer means systemd now takes us as main pid."""
        if self.channel is None or self.child_pid:
            return
        answer = _receive(self.channel)
        if answer == MAINPID_SENT:
            self.master.notifier.release()
        if answer is not None:  # the answer, or EOF: the old master is gone
            self._close_channel()


def _spawn_new_master(argv: list[str], env: dict[str, str], channel: socket.socket, fds: list[int]) -> NoReturn:
    """The intermediate child: fork the new master, tell the old one its pid, exit.

    Orphaned at once, the new master is adopted by the service manager (PID 1, or a subreaper), so
    systemd takes it as its own child when MAINPID= names it. It would not wait for the exit of a main
    pid that is not its child: on stop, KillMode=mixed would SIGKILL it right after SIGTERM.
    """
    code = 127
    try:
        pid = os.fork()
        if pid == 0:
            try:
                for fd in (channel.fileno(), *fds):
                    os.set_inheritable(fd, True)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        channel.send(str(pid).encode())
        code = 0
    finally:
        os._exit(code)


def _inherited_channel() -> socket.socket | None:
    fd = os.environ.pop(HANDOVER_ENV, "")
    if not fd.isdigit():
        return None
    channel = socket.socket(fileno=int(fd))
    os.set_inheritable(channel.fileno(), False)
    channel.setblocking(False)
    return channel


def _receive(channel: socket.socket | None) -> bytes | None:
    """One message, b"" at EOF, None when nothing is there (or there is no channel)."""
    if channel is None:
        return None
    try:
        return channel.recv(64)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _send(channel: socket.socket | None, message: bytes) -> None:
    if channel is not None:
        try:
            channel.send(message)
        except OSError:
            pass  # the other master is gone: nothing left to coordinate
