"""Handshake-era (2025-*) sessions that any worker can serve.

A session id is a signed token (`mcpherd.shared.signing`) carrying what every request needs: the
negotiated protocol version, the client's capability bits and a digest of the credential that created
it. Any worker holding the cluster secret validates it without asking anyone. What changes during a
session (log level, subscriptions, the GET stream, the event log for resumption, server-to-client
requests awaiting answers) lives in a `Session` on the worker that holds it; a worker that sees a valid
token it does not know builds a fresh `Session` for it. Ended sessions are remembered as revoked until
their token would have expired anyway, so memory stays bounded. So is the number of `Session`s a worker
holds (`max_sessions`): a client that opens a session per call, or floods `initialize`, would otherwise
grow it for the whole idle timeout (~1 KB each); past the bound, the oldest that can be forgotten are
(as `expire` forgets idle ones), and their tokens stay valid.

Ownership is named in ids so the cluster layer can route: stream ids, event ids and server request
ids all start with this worker's tag (`w<slot>`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mcpherd.shared.events import MAX_TABLE_ENTRIES
from mcpherd.shared.revocations import SESSION_MAX_AGE_S, Revocations
from mcpherd.shared.signing import Signer, credential_digest
from mcpherd.worker.sse import EventStream

log = logging.getLogger("mcpherd.worker")

HANDSHAKE_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
MAX_LOG_EVENTS = 1024  # per stream, as the Redis copy (stream_mirror.py)
EVENT_OVERHEAD_BYTES = 128  # what a held event costs beyond its data: its tuple, bytes object and number
EXPIRE_EVERY_S = 10.0  # how often idle sessions are looked for (the idle timeout is half an hour)
_TOKEN = struct.Struct(">16sIBH")  # session nonce, issued (unix s), version index, capability bits
_CAPABILITY_BITS = ("sampling", "elicitation", "roots", "elicitation.form", "elicitation.url",
                    "sampling.tools", "sampling.context", "roots.listChanged")


def capability_bits(capabilities: dict[str, Any]) -> int:
    bits = 0
    for i, path in enumerate(_CAPABILITY_BITS):
        node: Any = capabilities
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            bits |= 1 << i
    return bits


def capabilities_from_bits(bits: int) -> dict[str, Any]:
    capabilities: dict[str, Any] = {}
    for i, path in enumerate(_CAPABILITY_BITS):
        if bits & (1 << i):
            node = capabilities
            for part in path.split("."):
                node = node.setdefault(part, {})
    return capabilities


@dataclass(slots=True)
class StreamLog:
    """The events of one SSE stream, kept so that a client can resume it with Last-Event-ID.

    At most MAX_LOG_EVENTS, and whatever the worker's `ReplayBudget` lets it keep: the oldest go first.
    `dropped_through` remembers how far that went, so that a resumption from before it is known to be
    partial rather than silently so.
    """

    stream_id: str
    events: deque[tuple[int, bytes]] = field(default_factory=deque)
    next_seq: int = 1
    live: EventStream | None = None  # the connection currently receiving it, if any
    done: bool = False  # the request it answers has finished: nothing more will be appended
    mirror: Callable[[int, bytes | None], None] | None = None  # copy for other hosts (stream_mirror.py)
    budget: ReplayBudget | None = None
    size: int = 0  # bytes held, as the budget counts them (event_cost)
    dropped_through: int = 0  # the last sequence number no longer held; 0 while none was let go

    def append(self, data: bytes) -> str:
        seq = self.next_seq
        self.next_seq += 1
        self.events.append((seq, data))
        grown = event_cost(data)
        self.size += grown
        if len(self.events) > MAX_LOG_EVENTS:
            grown -= self.drop_oldest()
        if self.mirror is not None:
            self.mirror(seq, data)
        event_id = f"{self.stream_id}.{seq}"
        if self.live is not None and not self.live.send(data, event_id):
            self.live = None
        if self.budget is not None:
            self.budget.grew(self, grown)
        return event_id

    def drop_oldest(self) -> int:
        """Let the oldest event go; what it cost."""
        seq, data = self.events.popleft()
        self.dropped_through = seq
        cost = event_cost(data)
        self.size -= cost
        return cost

    def finish(self) -> None:
        self.done = True
        if self.mirror is not None:
            self.mirror(self.next_seq, None)

    def replay_after(self, seq: int) -> list[tuple[str, bytes]]:
        return [(f"{self.stream_id}.{s}", d) for s, d in self.events if s > seq]

    def missing_after(self, seq: int) -> int:
        """How many events that followed `seq` are no longer held (a replay from `seq` lacks them)."""
        return max(0, self.dropped_through - seq)


def event_cost(data: bytes) -> int:
    return len(data) + EVENT_OVERHEAD_BYTES


class ReplayBudget:
    """The bytes all of one worker's stream logs hold for resumption, bounded as one pool.

    Every log is also bounded on its own (MAX_LOG_EVENTS, `max_streams` per session), but a session's GET
    stream gets every list-changed or resource-updated notification, and `max_sessions` sessions times
    64 logs times 1,024 events is far more than any worker has. Past `max_bytes` the oldest events of the
    logs appended to least recently are let go first: a stream that went quiet long ago is the one least
    likely to be resumed, and within a stream its result is its last event, the last to go.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._logs: OrderedDict[int, StreamLog] = OrderedDict()  # by id(), least recently appended to first
        self.full_since = 0.0  # when the budget first let an event go (logged once)

    def grew(self, log_: StreamLog, by: int) -> None:
        self.held += by
        key = id(log_)
        if key in self._logs:
            self._logs.move_to_end(key)
        else:
            self._logs[key] = log_
        if self.held > self.max_bytes:
            self._trim()

    def release(self, log_: StreamLog) -> None:
        """The log can no longer be resumed (its session or its stream was let go): its bytes are free."""
        if self._logs.pop(id(log_), None) is not None:
            self.held -= log_.size
        log_.events.clear()
        log_.size = 0
        log_.dropped_through = log_.next_seq - 1

    def _trim(self) -> None:
        if not self.full_since:
            self.full_since = time.monotonic()
            log.warning("the streams this worker keeps for resumption hold %d MiB (resume_buffer_mb): the oldest "
                        "events of the streams quiet longest are let go, and resuming one of those replays only "
                        "what is left", self.max_bytes >> 20)
        logs = self._logs
        while self.held > self.max_bytes and logs:
            key, oldest = next(iter(logs.items()))
            self.held -= oldest.drop_oldest()
            if not oldest.events:
                del logs[key]


@dataclass(slots=True)
class Session:
    token: str
    protocol_version: str
    capabilities: dict[str, Any]
    credential: bytes
    log_level: str = "info"  # until logging/setLevel says otherwise
    client_info: dict[str, Any] = field(default_factory=dict)
    subscriptions: set[str] = field(default_factory=set)
    get_stream: StreamLog | None = None
    streams: OrderedDict[str, StreamLog] = field(default_factory=OrderedDict)
    pending: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    last_seen: float = 0.0


class SessionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SessionStore:
    """This worker's view of the cluster's sessions. The cluster layer extends `revoked` and routing."""

    def __init__(self, secret: bytes, worker_tag: str, *, idle_timeout: float = 1800.0,
                 max_age: float = SESSION_MAX_AGE_S, max_streams: int = 64, max_sessions: int = 100_000,
                 resume_buffer_bytes: int = 64 << 20) -> None:
        self._signer = Signer(secret, "session")
        self.worker_tag = worker_tag
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.max_streams = max_streams
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}  # in the order they were made or rebuilt here
        self.replay = ReplayBudget(resume_buffer_bytes)
        self.revoked = Revocations(max_age)  # ended sessions (shared/revocations.py)
        self.log_levels: dict[str, str] = {}  # token -> level, cluster-wide
        self.subscriptions: dict[str, set[str]] = {}  # token -> resource URIs, cluster-wide
        # A worker replacing a dead one in the same lane has the same tag, and ids must never repeat within
        # a session (a resumption would replay another stream): start past any id a predecessor can have
        # issued, i.e. at one id per microsecond of wall-clock time, far above any real rate.
        self._counter = time.time_ns() // 1000
        self.mirror: Any = None  # StreamMirror when hosts share Redis
        self._next_table_prune = 0.0
        self._next_expire = 0.0
        self.full_since = 0.0  # when `max_sessions` was first reached (logged once)

    def next_id(self, kind: str) -> str:
        """Ids that name this worker as their owner: streams (s), GET streams (g), requests (r).

        `<tag>-<kind><n>`, e.g. `w3a-s1795239161827786`: the cluster routes anything addressed to an
        id that is not ours (a client's answer, a resumption) to the process named by the tag.
        """
        self._counter += 1
        return f"{self.worker_tag}-{kind}{self._counter}"

    # -- cluster-wide tables (kept in step by cluster events; see worker/cluster.py) ------------
    def load_tables(self, log_levels: dict[str, str], subscriptions: dict[str, list[str]],
                    ended: list[bytes], revoked_before: float = 0.0) -> None:
        """The master's tables (control.Snapshot), added to what this worker has, with its watermark of
        ended sessions (tokens issued at or before it are refused); then applied to the sessions held here."""
        self.log_levels.update(log_levels)
        for token, uris in subscriptions.items():
            self.subscriptions.setdefault(token, set()).update(uris)
        expires = time.time() + self.max_age  # at the latest: the snapshot does not say
        for nonce in ended:
            if nonce not in self.revoked.until:
                self._revoke(nonce, expires)
        if self.revoked.raise_before(revoked_before):
            self._end_issued_before()
        for session in self.sessions.values():
            session.log_level = self.log_levels.get(session.token, session.log_level)
            session.subscriptions = self.subscriptions.get(session.token, set())

    def set_log_level(self, token: str, level: str) -> None:
        self.log_levels[token] = level
        _bound(self.log_levels)
        session = self.sessions.get(token)
        if session is not None:
            session.log_level = level

    def set_subscription(self, token: str, uri: str, on: bool) -> None:
        uris = self.subscriptions.setdefault(token, set())
        _bound(self.subscriptions)
        if on:
            uris.add(uri)
        else:
            uris.discard(uri)
        session = self.sessions.get(token)
        if session is not None:
            session.subscriptions = uris

    def ended(self, token: str, nonce: bytes, expires: float) -> None:
        """Another worker (or this one) ended the session: refuse its token from now on."""
        self._revoke(nonce, expires)
        self.log_levels.pop(token, None)
        self.subscriptions.pop(token, None)
        session = self.sessions.get(token)
        if session is not None:
            self.terminate(session)

    def nonce_and_expiry(self, token: str) -> tuple[bytes, float] | None:
        payload = self._signer.unseal(token)
        if payload is None or len(payload) < _TOKEN.size:
            return None
        nonce, issued = _TOKEN.unpack_from(payload)[:2]
        return nonce, issued + self.max_age

    def create(self, protocol_version: str, capabilities: dict[str, Any], authorization: str,
               client_info: dict[str, Any]) -> Session:
        nonce = os.urandom(16)
        payload = _TOKEN.pack(nonce, int(time.time()), HANDSHAKE_VERSIONS.index(protocol_version),
                              capability_bits(capabilities)) + credential_digest(authorization)
        token = self._signer.seal(payload)
        session = Session(token, protocol_version, capabilities, credential_digest(authorization),
                          client_info=client_info, last_seen=time.monotonic())
        self._hold(session)
        return session

    def lookup(self, token: str, authorization: str) -> Session:
        """The session for a request, or SessionError(404) as the spec asks for unknown/ended ones."""
        session = self.sessions.get(token)
        if session is None:
            session = self._rehydrate(token)
        if session.credential != credential_digest(authorization):
            # Someone else's session id: answer as if it did not exist, revealing nothing.
            raise SessionError(404, "Session not found")
        session.last_seen = time.monotonic()
        return session

    def _rehydrate(self, token: str) -> Session:
        payload = self._signer.unseal(token)
        if payload is None or len(payload) < _TOKEN.size:
            raise SessionError(404, "Session not found")
        nonce, issued, version_index, bits = _TOKEN.unpack_from(payload)
        if self.revoked.refuses(nonce, issued) or time.time() - issued > self.max_age \
                or version_index >= len(HANDSHAKE_VERSIONS):
            raise SessionError(404, "Session not found")
        session = Session(token, HANDSHAKE_VERSIONS[version_index], capabilities_from_bits(bits),
                          payload[_TOKEN.size:], last_seen=time.monotonic())
        session.log_level = self.log_levels.get(token, session.log_level)
        self._hold(session)
        return session

    def _hold(self, session: Session) -> None:
        # The cluster-wide table gets an entry only once the session subscribes (`set_subscription`):
        # an empty set per session would be kept until the token expires, a day later.
        session.subscriptions = self.subscriptions.get(session.token) or set()
        self.sessions[session.token] = session
        if len(self.sessions) > self.max_sessions:
            self._make_room()

    def _make_room(self) -> None:
        """Forget the local state of the oldest sessions that can be forgotten, down to `max_sessions`.

        Oldest by when they were made or rebuilt here (one in use is soon rebuilt, at the back). Only
        what a rebuild cannot restore is kept: a session awaiting a client's answer, or with a live
        stream, goes to the back of the line instead. Its finished streams' logs go with it, so resuming
        one of those answers 404 and the client starts over, as after `expire`. Bounded work per call.
        """
        for _ in range(2 * (len(self.sessions) - self.max_sessions) + 16):
            if len(self.sessions) <= self.max_sessions:
                return
            session = self.sessions.pop(next(iter(self.sessions)))
            if session.pending or not _no_live_streams(session):
                self.sessions[session.token] = session
                continue
            self._release_logs(session)
            if not self.full_since:
                self.full_since = time.monotonic()
                log.info("this worker holds %d sessions: forgetting the local state of the oldest idle ones "
                         "(their ids stay valid and are rebuilt on their next request)", self.max_sessions)

    def _revoke(self, nonce: bytes, expires: float) -> None:
        if self.revoked.add(nonce, expires):
            self._end_issued_before()

    def _end_issued_before(self) -> None:
        """The watermark rose: sessions held here that were issued before it are ended too."""
        before = self.revoked.before
        for session in list(self.sessions.values()):
            ending = self.nonce_and_expiry(session.token)
            if ending is not None and ending[1] - self.max_age <= before:
                self.sessions.pop(session.token, None)
                self._end(session)

    def terminate(self, session: Session) -> None:
        self.sessions.pop(session.token, None)
        ending = self.nonce_and_expiry(session.token)
        if ending is not None:
            self._revoke(*ending)
        self._end(session)

    def _end(self, session: Session) -> None:
        for future in session.pending.values():
            if not future.done():
                future.set_exception(ConnectionResetError("session terminated"))
        for log_ in list(session.streams.values()):
            if log_.live is not None:
                log_.live.end()
        self._release_logs(session)

    def _release_logs(self, session: Session) -> None:
        """The session's local state is let go: so are its streams' events, kept for resumption."""
        for log_ in session.streams.values():
            self.replay.release(log_)
        if session.get_stream is not None:
            self.replay.release(session.get_stream)

    def expire(self) -> int:
        """Free the local state of sessions idle here; forget what concerns tokens expired anyway.

        Idle here is not idle everywhere (the client may be talking to other workers), so this only
        forgets: the token stays valid until DELETE or `max_age`, and a later request here
        rebuilds the session from the token and the cluster tables.

        Called every second, it looks at the sessions every EXPIRE_EVERY_S and at the token tables
        every minute: each look is a pass over up to `max_sessions` (or a day of ended sessions), too
        much to pay every second for timeouts of half an hour and a day.
        """
        now, wall = time.monotonic(), time.time()
        if now < self._next_expire:
            return 0
        self._next_expire = now + EXPIRE_EVERY_S
        idle = [s for s in self.sessions.values()
                if now - s.last_seen > self.idle_timeout and not s.pending and _no_live_streams(s)]
        for session in idle:
            del self.sessions[session.token]
            self._release_logs(session)
        if now >= self._next_table_prune:
            self._next_table_prune = now + 60.0
            self.revoked.prune(wall)
            for table in (self.log_levels, self.subscriptions):
                for token in [t for t in table if (self.nonce_and_expiry(t) or (b"", 0.0))[1] < wall]:
                    del table[token]
        return len(idle)

    def open_stream(self, session: Session, kind: str = "s") -> StreamLog:
        log = StreamLog(self.next_id(kind), budget=self.replay)
        if self.mirror is not None:
            log.mirror = functools.partial(self.mirror.record, session.token, log.stream_id)
        session.streams[log.stream_id] = log
        excess = len(session.streams) - self.max_streams
        if excess > 0:
            # Oldest first, but never a stream still being written to; skipping (not stopping at) one
            # matters, since a session's GET stream is usually its oldest and lives as long as it does.
            evictable = [i for i, s in session.streams.items() if s.done or s.live is None]
            for stream_id in evictable[:excess]:
                evicted = session.streams.pop(stream_id)
                self.replay.release(evicted)
                if session.get_stream is evicted:  # not connected: the next GET opens a new one
                    session.get_stream = None
        return log


def _bound(table: dict[str, Any]) -> None:
    """Oldest first out, as the master bounds its copies (supervisor/bus.py)."""
    while len(table) > MAX_TABLE_ENTRIES:
        del table[next(iter(table))]


def _no_live_streams(session: Session) -> bool:
    return all(log.live is None for log in session.streams.values())
