"""systemd integration from the master only (`NotifyAccess=main`): sd_notify and socket activation.

sd_notify is the real protocol: an AF_UNIX datagram to $NOTIFY_SOCKET (a path, or `@name` for the
abstract namespace), newline-separated `KEY=VALUE` assignments. The master sends

    READY=1                       once every worker of the first generation accepts
    RELOADING=1 + MONOTONIC_USEC  on SIGHUP (works with Type=notify and Type=notify-reload)
    READY=1                       when the new generation serves (or the reload was abandoned)
    STOPPING=1                    when a stop begins
    WATCHDOG=1                    every WATCHDOG_USEC/2, only from a loop turn that went well: a hung
                                  master loop stops the pings and systemd kills and restarts the service
    STATUS=...                    workers and requests/s, at most once a second when it changes
    MAINPID=<pid>                 from the old master, naming the new one, when a SIGUSR2 upgrade
                                  hands over (upgrade.py); with NotifyAccess=main systemd accepts
                                  notifications only from the main pid, so the old master falls silent
                                  after it and the new one stays silent (held) until then

Socket activation: with LISTEN_PID = our pid and LISTEN_FDS = n, fds 3..3+n-1 are listening sockets
(the .socket unit sets ReusePort=yes); the master adopts each as slot 0 of the reuseport group of its
address and creates the rest of the group with the same options.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("mcpherd.master")
SD_LISTEN_FDS_START = 3
HELD_ENV = "MCPHERD_NOTIFY_HELD"  # set by the old master for the new one: not the main pid yet


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if enabled else 0.0
        self.next_watchdog = 0.0
        self.last_status = ""
        self.last_status_at = 0.0
        self.held = env.get(HELD_ENV) == "1"  # systemd would refuse (and log) what we send: send nothing
        self.pending_ready: str | None = None  # READY=1 asked for while held, sent on release()
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", HELD_ENV):
            os.environ.pop(name, None)  # workers must not talk to systemd (NotifyAccess=main)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *assignments: str) -> bool:
        if self.sock is None or self.held:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self.sock.sendto("\n".join(assignments).encode(), target)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc.strerror)
            return False

    def ready(self, status: str = "") -> None:
        if self.held:
            self.pending_ready = status
            return
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def mainpid(self, pid: int) -> None:
        """Name another process the main pid; from then on systemd refuses our notifications."""
        self.send(f"MAINPID={pid}")
        self.held = True

    def release(self) -> None:
        """Our predecessor named us the main pid: speak from now on, READY=1 first if it is due."""
        if not self.held:
            return
        self.held = False
        self.next_watchdog = 0.0  # ping at once: the predecessor stopped pinging when it handed over
        if self.pending_ready is not None:
            self.ready(self.pending_ready)
            self.pending_ready = None

    def watchdog(self, now: float) -> None:
        """Called from the master loop after a healthy turn; pings at half the watchdog period."""
        if self.watchdog_interval and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog_interval
            self.send("WATCHDOG=1")

    def status(self, text: str, now: float) -> None:
        if text != self.last_status and now - self.last_status_at >= 1.0 and self.send(f"STATUS={text}"):
            self.last_status, self.last_status_at = text, now


def activated_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed us (socket activation), or [] when not activated."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return []
    count = int(env["LISTEN_FDS"])
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"socket-activated fd {fd} is not a stream socket")
        sockets.append(sock)
    return sockets
