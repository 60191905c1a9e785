"""Listening sockets the master owns: one SO_REUSEPORT group per bind address, one socket per slot.

Closing a socket of a reuseport group resets every connection queued on it (nginx ticket 1300,
gunicorn PR 3612), so the master never closes one while it runs. A worker inherits its slot's socket;
its replacement takes over the same socket. Slots without a live worker are steered around with a
classic BPF program (SO_ATTACH_REUSEPORT_CBPF): it picks one of the live slots' sockets at random for
each new connection, so a socket being retired stops receiving connections, its worker empties the
queue, and the socket stays open, idle, for the next scale-up.

Handing sockets to a re-executed master (SIGUSR2): `MCPHERD_LISTEN_FDS=host:port=fd,fd;host:port=fd`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from dataclasses import dataclass, field

from mcpherd.shared.netstat import accept_queue_length, listen_drops  # noqa: F401 - re-exported

log = logging.getLogger("mcpherd.master")

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
        if self.shared:
            self.sockets.extend([self.sockets[0]] * (count - len(self.sockets)))
            return
        while len(self.sockets) < count:
            self.sockets.append(_listener(self.host, self.port))
            self.port = self.sockets[0].getsockname()[1]  # a requested port 0 became a real one

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
        if self.shared:
            os.set_inheritable(self.sockets[0].fileno(), True)
            return f"{self.address}=" + ",".join(str(s.fileno()) for s in self.sockets)
        for sock in self.sockets:
            os.set_inheritable(sock.fileno(), True)
        return f"{self.address}=" + ",".join(str(s.fileno()) for s in self.sockets)


def _listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def adopt_activated(sock: socket.socket) -> ListenerGroup:
    """A socket systemd passed: slot 0 of its address's group; the rest get the same options."""
    host, port = sock.getsockname()[:2]
    group = ListenerGroup(host, port, [sock])
    sock.setblocking(False)
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        log.warning("the socket-activated listener %s lacks SO_REUSEPORT (set ReusePort=yes in the .socket "
                    "unit): every worker shares it, so a dying worker's queued connections are not isolated",
                    group.address)
        group.shared = True
    return group


def inherited_groups(value: str) -> list[ListenerGroup]:
    """Groups handed over by a previous master (SIGUSR2)."""
    groups = []
    for part in filter(None, value.split(";")):
        address, _, fds = part.rpartition("=")
        host, _, port = address.rpartition(":")
        group = ListenerGroup(host.strip("[]"), int(port))
        for fd in fds.split(","):
            sock = socket.socket(fileno=int(fd))
            os.set_inheritable(sock.fileno(), False)
            group.sockets.append(sock)
        groups.append(group)
    return groups
