"""Listening sockets the master owns: one SO_REUSEPORT group per bind address, one socket per slot.

Closing a socket of a reuseport group resets every connection queued on it (nginx ticket 1300,
gunicorn PR 3612), so the master never closes one while it runs. A worker inherits its slot's socket;
its replacement takes over the same socket. Slots without a live worker are steered around with a
classic BPF program (SO_ATTACH_REUSEPORT_CBPF): it picks one of the live slots' sockets at random for
each new connection, so a socket being retired stops receiving connections, its worker empties the
queue, and the socket stays open, idle, for the next scale-up.

Socket activation (systemd/mcpherd.socket, ReusePort=yes): the passed sockets of one address are the
first slots of its group and the master creates the rest with the same options. Linux lets a socket join
a reuseport group only if it has the same owner as the group (socket(7)), and systemd creates the passed
sockets as root: a master running as another user cannot add to the group (EADDRINUSE), so its slots
then share the passed sockets, as they do when a passed socket lacks SO_REUSEPORT (`shared`).

Handing sockets to a re-executed master (SIGUSR2): `MCPHERD_LISTEN_FDS=host:port=fd,fd;host:port=fd`
(a shared group repeats its fds).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from dataclasses import dataclass, field

log = logging.getLogger("mcpherd.master")


def receive(sock: socket.socket, size: int = 65536) -> bytes | None:
    """One read from a non-blocking socket of the master's loop: None when nothing has arrived yet, b""
    when the peer closed or the socket failed (either way the client is gone)."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""

BACKLOG = 2048
SO_ATTACH_REUSEPORT_CBPF = 51
# Classic BPF opcodes (linux/filter.h) for: A = random(); A %= n; return table[A].
_LD_W_ABS, _ALU_MOD_K, _JEQ_K, _RET_K = 0x20, 0x94, 0x15, 0x06
_SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF
INHERIT_ENV = "MCPHERD_LISTEN_FDS"


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


def steering_program(live: list[int]) -> list[tuple[int, int, int, int]]:
    """cBPF returning a random index among `live` (indices into the group, in creation order)."""
    if not live:
        raise ValueError("steering needs at least one live slot")
    program = [(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM), (_ALU_MOD_K, 0, 0, len(live))]
    for position, index in enumerate(live):
        program += [(_JEQ_K, 0, 1, position), (_RET_K, 0, 0, index)]
    program.append((_RET_K, 0, 0, live[0]))
    return program


@dataclass
class ListenerGroup:
    host: str
    port: int
    sockets: list[socket.socket] = field(default_factory=list)
    steered: list[int] = field(default_factory=list)
    shared: bool = False  # one socket for every slot (socket activation without ReusePort=yes)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def ensure(self, count: int) -> None:
        """Grow the group to `count` sockets (never shrinks: see the module docstring)."""
        while len(self.sockets) < count and not self.shared:
            if len(self.sockets) == 1 and not self.steered:
                # Before a second socket joins, send every connection to the first: a socket without
                # a worker yet must never receive one (it would wait there for good).
                self.steer([0])
            template = self.sockets[0] if self.sockets else None
            try:
                self.sockets.append(_listener(self.host, self.port, template))
            except OSError as exc:
                if template is None or exc.errno != errno.EADDRINUSE:
                    raise
                log.warning("cannot add sockets to the passed listener %s (owned by another user: systemd "
                            "creates them as root): its %d socket(s) are shared by every worker; repeat "
                            "ListenStream= once per worker for one socket each", self.address, len(self.sockets))
                self.shared = True
            self.port = self.sockets[0].getsockname()[1]  # a requested port 0 became a real one
        distinct = list(dict.fromkeys(self.sockets))  # a shared group cycles through these
        self.sockets.extend(distinct[i % len(distinct)] for i in range(len(self.sockets), count))

    def steer(self, live: list[int]) -> bool:
        """Send new connections only to `live` slots' sockets; False when the kernel refused."""
        if live == self.steered or self.shared:
            return True
        code = steering_program(live)
        filters = (_Filter * len(code))(*(_Filter(*ins) for ins in code))
        program = _Program(len(code), filters)
        raw = ctypes.string_at(ctypes.addressof(program), ctypes.sizeof(program))
        try:
            self.sockets[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, raw)
        except OSError as exc:
            log.warning("cannot steer connections on %s (%s): idle slots would receive connections, "
                        "so every socket keeps a worker", self.address, exc.strerror)
            return False
        self.steered = list(live)
        return True

    def inheritable(self) -> str:
        for sock in self.sockets:
            os.set_inheritable(sock.fileno(), True)
        return f"{self.address}=" + ",".join(str(s.fileno()) for s in self.sockets)


# Options a .socket unit may set that an unprivileged master can copy (IP_TRANSPARENT and SO_MARK need
# CAP_NET_ADMIN). Only those that differ from a fresh socket's are set, so defaults stay defaults.
_IP_FREEBIND = 15
_COPIED_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE), (socket.IPPROTO_TCP, socket.TCP_NODELAY),
                   (socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                   (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                   (socket.IPPROTO_TCP, socket.TCP_FASTOPEN), (socket.IPPROTO_IP, _IP_FREEBIND)]


def _listener(host: str, port: int, template: socket.socket | None = None) -> socket.socket:
    """A new member of the group at host:port, with `template`'s options (else mcpherd's own)."""
    family = template.family if template is not None else socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if template is None:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            _copy_options(template, sock)
        sock.bind(template.getsockname() if template is not None else (host, port))
        sock.listen(BACKLOG)  # a worker listens again with the same backlog (worker/server.py)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _copy_options(template: socket.socket, sock: socket.socket) -> None:
    options = list(_COPIED_OPTIONS)
    if template.family == socket.AF_INET6:  # BindIPv6Only=: a dual-stack slot 0 needs dual-stack siblings
        options.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    for level, name in options:
        value = template.getsockopt(level, name)
        if value != sock.getsockopt(level, name):
            sock.setsockopt(level, name, value)
    device = template.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
    if device:  # BindToDevice=: a socket bound elsewhere would form a group of its own
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)


def adopt_activated(passed: list[socket.socket]) -> list[ListenerGroup]:
    """The sockets systemd passed, one group per address; ensure() creates the rest of each group."""
    groups: dict[tuple[str, int], ListenerGroup] = {}
    for sock in passed:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"socket-activated fd {sock.fileno()} is not a TCP socket (ListenStream=HOST:PORT)")
        host, port = sock.getsockname()[:2]
        sock.setblocking(False)
        groups.setdefault((host, port), ListenerGroup(host, port)).sockets.append(sock)
    for group in groups.values():
        if not all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in group.sockets):
            log.warning("the socket-activated listener %s lacks SO_REUSEPORT (set ReusePort=yes in the .socket "
                        "unit): every worker shares it, so a dying worker's queued connections are not isolated",
                        group.address)
            group.shared = True
    return list(groups.values())


def inherited_groups(value: str) -> list[ListenerGroup]:
    """Groups handed over by a previous master (SIGUSR2)."""
    groups = []
    for part in filter(None, value.split(";")):
        address, _, fds = part.rpartition("=")
        host, _, port = address.rpartition(":")
        group = ListenerGroup(host.strip("[]"), int(port))
        adopted: dict[int, socket.socket] = {}  # one object per fd: a shared group repeats its fds
        for fd in map(int, fds.split(",")):
            if fd not in adopted:
                adopted[fd] = socket.socket(fileno=fd)
                os.set_inheritable(fd, False)
            group.sockets.append(adopted[fd])
        group.shared = len(adopted) < len(group.sockets)
        groups.append(group)
    return groups
