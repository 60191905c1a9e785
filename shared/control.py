"""The master <-> worker control channel: one AF_UNIX SOCK_SEQPACKET socketpair per worker process.

Commands travel here first and signals second (nginx's order). One datagram is one message, a
msgpack-encoded msgspec Struct tagged by its class name (`Stop`, `Wake`, ...); a file descriptor
(connection hand-over) rides along as SCM_RIGHTS ancillary data.

Master -> worker
    Stop          stop accepting now, finish in-flight work (a successor shares the socket)
    Retire        keep accepting until the slot's accept queue is empty, then stop (scale-down:
                  new connections are already steered away from the socket)
    ReopenLogs    reopen log files (SIGUSR1)
    Wake(seq)     cluster events up to `seq` are in the shared-memory ring: apply them, then ack
    Snapshot      session tables (log levels, subscriptions, ended sessions) for a new worker, with
                  the ring position to apply events from (megabytes with many sessions: chunked)
    Published     your Publish(request_id) was applied by every live worker (or timed out)
    Deliver       a client's answer to one of your server-to-client requests, received elsewhere
    Adopt  + fd   a client connection handed to you (it resumes one of your streams)

Worker -> master
    Hello         I am up: my tool names (metric labels); send me a Snapshot
    Applied(seq)  I applied every event up to `seq` (acknowledged delivery)
    Publish       publish this event to the cluster; answer Published when all applied it
    Forward       route this client message to the process named by `owner`
    Handoff + fd  route this connection (and the request bytes already read) to `owner`

A worker whose channel reaches end-of-file (the master died) stops as if told Stop.

Any message larger than CHUNK_BYTES (a client's answer of an image, forwarded between workers or hosts)
travels as consecutive `Chunk`s: a datagram holds at most MAX_DATAGRAM, and the send buffer little more.
`Sender` splits, `Receiver` joins; the pieces of one message are never interleaved with another's,
since a channel has one sender, whose queue keeps order.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

MAX_DATAGRAM = 1 << 17


class Stop(msgspec.Struct, tag=True):
    pass


class Retire(msgspec.Struct, tag=True):
    pass


class ReopenLogs(msgspec.Struct, tag=True):
    pass


class Wake(msgspec.Struct, tag=True):
    seq: int


class Snapshot(msgspec.Struct, tag=True):
    seq: int
    log_levels: dict[str, str]
    subscriptions: dict[str, list[str]]
    ended: list[bytes]
    redis_trusted: bool = True  # the last events.RedisTrust this host published
    revoked_before: float = 0.0  # every session token issued at or before this is ended (shared/revocations.py)


class Published(msgspec.Struct, tag=True):
    request_id: int
    seq: int
    complete: bool  # False: some worker did not acknowledge in time (it is being replaced)


class Deliver(msgspec.Struct, tag=True):
    payload: bytes


class Adopt(msgspec.Struct, tag=True):
    request: bytes


class Hello(msgspec.Struct, tag=True):
    tools: list[str]


class Applied(msgspec.Struct, tag=True):
    seq: int


class Publish(msgspec.Struct, tag=True):
    request_id: int
    event: bytes  # an encoded mcpherd.shared.events event
    wait: bool = True
    # An Invalidate whose shared L2 entries the worker could not delete (Redis error, its back-off): the
    # master has them deleted through its bridge before anyone is told, as for its own invalidations.
    l2: bool = False


class Forward(msgspec.Struct, tag=True):
    owner: str
    payload: bytes


class Handoff(msgspec.Struct, tag=True):
    owner: str
    request: bytes


# Master <-> Redis bridge (supervisor/bridge.py), only when a Redis URL is configured.
class Outbound(msgspec.Struct, tag=True):
    """A cluster event raised on this host: publish it to the other hosts."""

    event: bytes


class Inbound(msgspec.Struct, tag=True):
    """A cluster event raised on another host: publish it into this host's ring."""

    event: bytes


class RemoteForward(msgspec.Struct, tag=True):
    host: str
    owner: str
    payload: bytes


class RemoteDeliver(msgspec.Struct, tag=True):
    owner: str
    payload: bytes


class L2Invalidate(msgspec.Struct, tag=True):
    request_id: int
    event: bytes  # the Invalidate event whose L2 entries must go before the hosts are told


class L2Done(msgspec.Struct, tag=True):
    request_id: int
    ok: bool


class RedisState(msgspec.Struct, tag=True):
    up: bool
    detail: str


class RedisPing(msgspec.Struct, tag=True):
    slowest_s: float  # the slowest of the bridge's recent PING round trips (bridge.SLOW_WINDOW of them)


class Chunk(msgspec.Struct, tag=True):
    data: bytes  # a piece of an encoded message
    more: bool  # False on the last piece


Message = (Stop | Retire | ReopenLogs | Wake | Snapshot | Published | Deliver | Adopt | Hello | Applied
           | Publish | Forward | Handoff | Outbound | Inbound | RemoteForward | RemoteDeliver | L2Invalidate
           | L2Done | RedisState | RedisPing | Chunk)
CHUNK_BYTES = 48 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a request body is at most a few MiB: anything past this is a broken peer
_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Message)


def channel() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end), both close-on-exec; the fork decides who keeps which."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.setblocking(False)
    return master_end, worker_end


class Sender:
    """Sends on a non-blocking channel, in order, without losing what does not fit.

    A SEQPACKET pair holds what fits in the sender's send buffer (net.core.wmem_default, 208 KiB), and
    every message is charged its kernel overhead too (~760 bytes): a few hundred small messages (278 of
    40 bytes here). A burst while the reader is busy or descheduled (acknowledgements, publishes, events
    from other hosts) would otherwise fail with EAGAIN and be lost. What does not fit waits here;
    `watch(True)` asks the sender's loop to call `drain` when the channel has room, `watch(False)` says
    nothing waits any more. `send` is False only when the peer is gone or has stopped reading
    altogether (`limit` messages waiting).
    """

    def __init__(self, sock: socket.socket, watch: Callable[[bool], None], limit: int = 10_000) -> None:
        self.sock = sock
        self.watch = watch
        self.limit = limit
        self.waiting: deque[bytes] = deque()

    @classmethod
    def on_loop(cls, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Sender:
        """A Sender whose room is reported by an asyncio loop (a worker, the Redis bridge)."""
        def watch(writable: bool) -> None:
            if writable:
                loop.add_writer(sock.fileno(), sender.drain)
            else:
                loop.remove_writer(sock.fileno())
        sender = cls(sock, watch)
        return sender

    def send(self, message: Any) -> bool:
        data = _encoder.encode(message)
        if len(data) <= CHUNK_BYTES:
            return self._send(data)
        pieces = range(0, len(data), CHUNK_BYTES)
        return all(self._send(_encoder.encode(Chunk(data[start:start + CHUNK_BYTES], start + CHUNK_BYTES < len(data))))
                   for start in pieces)

    def _send(self, data: bytes) -> bool:
        if not self.waiting:
            try:
                self.sock.send(data)
                return True
            except BlockingIOError:
                self.watch(True)
            except OSError:
                return False
        if len(self.waiting) >= self.limit:
            return False
        self.waiting.append(data)
        return True

    def drain(self) -> None:
        while self.waiting:
            try:
                self.sock.send(self.waiting[0])
            except BlockingIOError:
                return
            except OSError:
                self.waiting.clear()  # the peer is gone: its reader side notices
                break
            self.waiting.popleft()
        self.watch(False)


def send(sock: socket.socket, message: Any, fd: int | None = None) -> bool:
    """False when the peer is gone or its queue is full (the caller falls back to a signal)."""
    data = _encoder.encode(message)
    try:
        if fd is None:
            sock.send(data)
        else:
            socket.send_fds(sock, [data], [fd])
        return True
    except (BlockingIOError, BrokenPipeError, ConnectionResetError, OSError):
        return False


def receive(sock: socket.socket) -> tuple[Any, int | None] | None:
    """One message and its fd (if any); None at end-of-file. Raises BlockingIOError when empty."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_DATAGRAM, 1)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    try:
        return _decoder.decode(data), (fds[0] if fds else None)
    except msgspec.DecodeError:
        for fd in fds:
            socket.close(fd)
        raise ValueError(f"undecodable control message ({len(data)} bytes)") from None


class Receiver:
    """`receive` for one channel, with messages that came as `Chunk`s joined again."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pieces: list[bytes] = []
        self.size = 0

    def receive(self) -> tuple[Any, int | None] | None:
        """As `receive`: BlockingIOError also while only some pieces of a message have arrived."""
        while True:
            received = receive(self.sock)
            if received is None:
                return None
            message, fd = received
            if not isinstance(message, Chunk):
                self._drop()  # a sender that died between pieces: what came of it is useless
                return received
            self.pieces.append(message.data)
            self.size += len(message.data)
            if self.size > MAX_MESSAGE_BYTES:
                self._drop()
                raise ValueError(f"chunked control message past {MAX_MESSAGE_BYTES} bytes")
            if not message.more:
                data = b"".join(self.pieces)
                self._drop()
                try:
                    return _decoder.decode(data), None
                except msgspec.DecodeError:
                    raise ValueError(f"undecodable chunked control message ({len(data)} bytes)") from None

    def _drop(self) -> None:
        self.pieces, self.size = [], 0
