"""Cluster events and the shared-memory ring that carries them from the master to every worker.

Ring format (inside the segment of mcpherd.shared.layout, written by the master only):

    header   u64 write_seq (the last published sequence number; 0: none yet), 56 bytes reserved
    entry[s % RING_ENTRIES]   ENTRY_SIZE bytes: u64 seq | u64 published_ns | u32 length | payload

The master writes an entry completely, then advances write_seq, then wakes the workers over their
control channels. A worker reads entries (last applied, write_seq]; an entry whose seq is not the one
expected was overwritten, meaning the worker fell more than RING_ENTRIES behind: it drops its whole
cache instead (a cold cache is never stale). `published_ns` (CLOCK_MONOTONIC) lets the worker measure
propagation latency.

Events are msgpack-encoded msgspec Structs, tagged by class name.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import msgspec

from mcpherd.shared.layout import ENTRY_SIZE, RING_ENTRIES, RING_HEADER

_ENTRY = struct.Struct("<QQI")
MAX_PAYLOAD = ENTRY_SIZE - _ENTRY.size


class Invalidate(msgspec.Struct, tag=True):
    key: str | None = None
    tag_: str | None = msgspec.field(default=None, name="tag")
    prefix: str | None = None
    all: bool = False


class ResourceUpdated(msgspec.Struct, tag=True):
    uri: str


class ListChanged(msgspec.Struct, tag=True):
    kind: str  # tools | resources | prompts


class SetLogLevel(msgspec.Struct, tag=True):
    session: str
    level: str


class Subscribe(msgspec.Struct, tag=True):
    session: str
    uri: str
    on: bool  # False: unsubscribe


class SessionEnded(msgspec.Struct, tag=True):
    session: str
    nonce: bytes
    expires: float  # wall-clock time after which the token is invalid anyway


class RedisTrust(msgspec.Struct, tag=True):
    """Host-local, never published to other hosts: whether workers may read and fill the L2 cache. Off
    while this host cannot rely on Redis (an entry whose delete was lost could be read back), on again
    once the resynchronisation has emptied L2."""

    trusted: bool


Event = Invalidate | ResourceUpdated | ListChanged | SetLogLevel | Subscribe | SessionEnded | RedisTrust
# The session tables every process keeps from these events (log levels, subscriptions, ended sessions)
# hold at most this many tokens each, oldest first out: a client flooding `initialize` + `logging/setLevel`
# must not grow them for the day a token lives.
MAX_TABLE_ENTRIES = 100_000

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Event)


def encode(event: Any) -> bytes:
    data = _encoder.encode(event)
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"cluster event too large ({len(data)} bytes > {MAX_PAYLOAD})")
    return data


def decode(data: bytes) -> Any:
    return _decoder.decode(data)


class Ring:
    def __init__(self, ring: memoryview) -> None:
        self.ring = ring

    @property
    def write_seq(self) -> int:
        return int(struct.unpack_from("<Q", self.ring, 0)[0])

    def publish(self, payload: bytes) -> int:
        """Master only: append one encoded event; returns its sequence number."""
        seq = self.write_seq + 1
        offset = RING_HEADER + (seq % RING_ENTRIES) * ENTRY_SIZE
        _ENTRY.pack_into(self.ring, offset, seq, time.monotonic_ns(), len(payload))
        self.ring[offset + _ENTRY.size: offset + _ENTRY.size + len(payload)] = payload
        struct.pack_into("<Q", self.ring, 0, seq)  # publish last: readers never see a half entry
        return seq

    def read(self, after: int, upto: int) -> tuple[list[tuple[int, int, bytes]], bool]:
        """Entries (seq, published_ns, payload) in (after, upto]; False if some were overwritten."""
        entries: list[tuple[int, int, bytes]] = []
        for seq in range(max(after + 1, upto - RING_ENTRIES + 1), upto + 1):
            offset = RING_HEADER + (seq % RING_ENTRIES) * ENTRY_SIZE
            found, published, length = _ENTRY.unpack_from(self.ring, offset)
            if found != seq:
                return entries, False
            start = offset + _ENTRY.size
            entries.append((seq, published, bytes(self.ring[start:start + length])))
        return entries, upto - after <= RING_ENTRIES
