"""The admin socket, served by the master's own loop (no thread): see shared/admin.py for the protocol.

Every client is non-blocking and bounded: a line longer than MAX_LINE, a client silent for
CLIENT_TIMEOUT_S or one that stops reading its replies is dropped, so a thousand idle or hostile
clients cost the loop a few microseconds each and never delay a restart or a heartbeat check.
Commands that finish later (an invalidation waits for every worker's acknowledgement) reply when done.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from mcpherd.shared import admin
from mcpherd.supervisor.sockets import receive

log = logging.getLogger("mcpherd.master")
CLIENT_TIMEOUT_S = 10.0
MAX_CLIENTS = 4096
MAX_PENDING_OUT = 1 << 20

Handler = Callable[["Client", admin.Request], Any]


class AlreadyRunning(Exception):
    pass


class Client:
    def __init__(self, sock: socket.socket, server: AdminServer) -> None:
        self.sock = sock
        self.server = server
        self.inbox = b""
        self.outbox = b""
        self.deadline = time.monotonic() + CLIENT_TIMEOUT_S
        self.waiting = 0  # replies still owed (deferred commands)
        self.closed = False
        self.eof = False  # the client half-closed while waiting for a deferred reply

    def reply(self, result: Any = None, error: tuple[str, str] | None = None) -> None:
        if self.closed:
            return
        message = admin.Reply(False, error=admin.Error(*error)) if error else admin.Reply(True, result)
        self.outbox += admin.encode(message)
        self.deadline = time.monotonic() + CLIENT_TIMEOUT_S
        self.flush()

    def flush(self) -> None:
        if not self.outbox or self.closed:
            return
        try:
            sent = self.sock.send(self.outbox)
            self.outbox = self.outbox[sent:]
        except BlockingIOError:
            pass
        except OSError:
            self.server.drop(self)
            return
        if len(self.outbox) > MAX_PENDING_OUT or (self.eof and not self.waiting and not self.outbox):
            self.server.drop(self)  # not reading its replies, or done with a half-closed client
            return
        if not self.eof:
            self.server.watch(self, writable=bool(self.outbox))


class AdminServer:
    def __init__(self, path: str, selector: selectors.BaseSelector, handlers: dict[str, Handler],
                 inherited: socket.socket | None = None) -> None:
        self.path = path
        self.selector = selector
        self.handlers = handlers
        self.clients: dict[int, Client] = {}
        self.listener = inherited if inherited is not None else _bind(path)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _accept(self) -> None:
        for _ in range(64):  # bounded per turn, so a flood cannot starve the rest of the loop
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("admin socket: out of file descriptors")
                return
            uid = _peer_uid(sock)
            crowded = len(self.clients) >= MAX_CLIENTS
            if uid not in (0, os.getuid()) or crowded:
                log.warning("admin socket: refused a client (uid %s%s)", uid, ", too many clients" if crowded else "")
                _refuse(sock, "too many admin clients are connected" if crowded else
                        f"uid {uid} may not use this admin socket (only root and uid {os.getuid()} may)")
                continue
            sock.setblocking(False)
            client = Client(sock, self)
            self.clients[sock.fileno()] = client
            self.selector.register(sock, selectors.EVENT_READ, lambda c=client: self._ready(c))

    def _ready(self, client: Client) -> None:
        if client.outbox:
            client.flush()
        data = receive(client.sock)
        if data is None:
            return
        if not data:
            if not client.waiting:
                self.drop(client)
                return
            # Half-closed while a deferred reply is owed: stop watching (an EOF stays readable and
            # would spin the loop); reply() still writes, then the client is dropped.
            client.eof = True
            try:
                self.selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            return
        if not client.inbox:  # a request starts: it has CLIENT_TIMEOUT_S to arrive whole, however it trickles
            client.deadline = time.monotonic() + CLIENT_TIMEOUT_S
        client.inbox += data
        while b"\n" in client.inbox and not client.closed:
            line, client.inbox = client.inbox.split(b"\n", 1)
            self._handle(client, line)
        if len(client.inbox) > admin.MAX_LINE:
            client.reply(error=("bad_request", f"request line longer than {admin.MAX_LINE} bytes"))
            self.drop(client)

    def _handle(self, client: Client, line: bytes) -> None:
        try:
            request = admin.decode_request(line)
        except ValueError as exc:
            code = "unsupported_version" if isinstance(exc, admin.UnsupportedVersion) else "bad_request"
            client.reply(error=(code, str(exc)))
            return
        try:
            self.handlers[request.cmd](client, request)
        except (ValueError, TypeError) as exc:
            client.reply(error=("bad_request", str(exc)))

    def watch(self, client: Client, writable: bool) -> None:
        if client.closed:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        try:
            self.selector.modify(client.sock, events, lambda c=client: self._ready(c))
        except (KeyError, ValueError):
            pass

    def drop(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.clients.pop(client.sock.fileno(), None)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def tick(self, now: float) -> None:
        for client in [c for c in self.clients.values() if c.deadline < now and not c.waiting]:
            self.drop(client)

    def close(self, unlink: bool) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        self.selector.unregister(self.listener)
        self.listener.close()
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _bind(path: str) -> socket.socket:
    """Bind the socket at `path`: replace a stale one (crashed master), refuse a live one."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    owner = os.stat(directory).st_uid
    if owner not in (0, os.getuid()):  # its owner could swap the socket: /tmp/mcpherd-<uid> can be made by anyone
        raise AlreadyRunning(f"{directory} is owned by uid {owner}, not by this user or root; "
                             "refusing to put the admin socket there")
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AlreadyRunning(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise AlreadyRunning(f"another mcpherd master is already running (admin socket {path})")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a master that died
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(1024)
    listener.setblocking(False)
    return listener


def _refuse(sock: socket.socket, why: str) -> None:
    """Say why, then close, so the client can tell a refusal from a crash (a new socket's buffer takes it)."""
    try:
        sock.setblocking(False)
        sock.send(admin.encode(admin.Reply(False, error=admin.Error("refused", why))))
    except OSError:
        pass
    sock.close()


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])
