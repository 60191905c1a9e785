"""The master <-> worker control channel: one AF_UNIX SOCK_SEQPACKET socketpair per worker process.

Commands travel here first and signals second (nginx's order): a datagram is one command, ASCII,
`verb` or `verb arg`. Master to worker:

    stop          stop accepting now and finish in-flight work (a successor shares the socket)
    retire        keep accepting until the slot's accept queue is empty, then stop (scale-down:
                  the master has already steered new connections away from the socket)
    reopen-logs   reopen log files (SIGUSR1 on the master)

A worker whose channel closes (the master died) stops as if told `stop`.
"""

from __future__ import annotations

import socket

STOP = b"stop"
RETIRE = b"retire"
REOPEN_LOGS = b"reopen-logs"
MAX_DATAGRAM = 65536


def channel() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end); both non-inheritable until the fork decides."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.setblocking(False)
    return master_end, worker_end


def send(sock: socket.socket, command: bytes) -> bool:
    try:
        sock.send(command)
        return True
    except (BlockingIOError, BrokenPipeError, ConnectionResetError, OSError):
        return False
