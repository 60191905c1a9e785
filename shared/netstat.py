"""Kernel views of listening sockets both sides need: the master (autoscaling on backlog, listen
drops) and a retiring worker (it keeps accepting until its queue is empty)."""

from __future__ import annotations

import socket
import struct

_TCP_INFO_SIZE = 104
_TCPI_UNACKED = 24  # offset of tcpi_unacked: for a listening socket, its accept queue length


def accept_queue_length(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (TCP_INFO tcpi_unacked)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    return int(struct.unpack_from("I", info, _TCPI_UNACKED)[0])


def listen_drops(path: str = "/proc/net/netstat") -> tuple[int, int]:
    """(ListenOverflows, ListenDrops) for this network namespace, from TcpExt."""
    try:
        with open(path) as netstat:
            lines = netstat.read().splitlines()
    except OSError:
        return 0, 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0)), int(table.get("ListenDrops", 0))
    return 0, 0
