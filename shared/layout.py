"""The cluster's shared-memory segment: one fixed cell per worker process lane, written by one worker,
read by the master.

Format (version 2), little-endian, in a memfd the master creates (so it survives a SIGUSR2 re-exec):

    header   64 bytes  magic b"MCPHERD1" | version u32 | lanes u32 | cell_size u32 | (reserved)
    cell[i]  CELL_SIZE bytes each, i = slot * 2 + lane
             words [0, METRICS_BASE): the process fields F_* below
             words [METRICS_BASE, WORDS): metrics, laid out by mcpherd.shared.metrics
    ring     RING_HEADER + RING_ENTRIES * ENTRY_SIZE bytes: the cluster's event ring, written by the
             master only (see mcpherd.shared.events)

Each worker slot has two lanes so that a replacement (reload, recycling) can start on the slot while
the worker it replaces still drains: the two never share a cell. A lane is reused only after the
master has reaped its previous process (and, from the shared-memory issue on, folded its counters).

A cell is an array of unsigned 64-bit words, so a worker updates a field with one aligned store
(`words[i] = v`): no locks, and a reader never sees a torn value. Field indices are the `F_*`
constants below; `F_HEARTBEAT` is CLOCK_MONOTONIC nanoseconds written by the worker's event loop
itself, so a stale heartbeat means the loop stopped turning, not just that a thread died.
"""

from __future__ import annotations

import mmap
import os
import struct

MAGIC = b"MCPHERD1"
VERSION = 2
HEADER = struct.Struct("<8sIII")
HEADER_SIZE = 64
WORDS = 1024  # per cell (8 KiB): process fields, then metrics
METRICS_BASE = 64
CELL_SIZE = WORDS * 8
RING_HEADER = 64  # write sequence u64, then reserved
RING_ENTRIES = 1024
ENTRY_SIZE = 1024  # seq u64 | published_ns u64 | length u32 | payload
RING_SIZE = RING_HEADER + RING_ENTRIES * ENTRY_SIZE
LANES_PER_SLOT = 2

# Field indices (u64 words) in a cell.
F_PID = 0
F_GENERATION = 1
F_STATE = 2  # the worker's own view: STARTING, READY, DRAINING, STOPPED
F_HEARTBEAT = 3  # monotonic ns of the last loop turn that wrote it
F_READY_AT = 4  # monotonic ns when it started accepting
F_STARTED_AT = 5  # monotonic ns when the child began (right after fork)
F_REQUESTS = 6  # HTTP requests answered since start (recycling, status)
F_INFLIGHT = 7
F_CONNECTIONS = 8
F_STREAMS = 9
F_LOOP_LAG_US = 10  # how late the last heartbeat tick ran, in microseconds
F_EVENTS_APPLIED = 11  # sequence number of the last cluster event this worker applied
F_BUSY_NS = 12  # time the loop spent handling requests (busy ratio = delta / wall delta)
F_BYTES_IN = 13
F_BYTES_OUT = 14
F_CACHE_HITS = 15
F_CACHE_MISSES = 16
F_CACHE_EVICTIONS = 17
F_ERRORS = 18  # requests answered with a JSON-RPC error or an HTTP error status

STARTING, READY, DRAINING, STOPPED = 1, 2, 3, 4


class Segment:
    """The mapped segment. The master creates it; a worker maps the inherited fd."""

    def __init__(self, fd: int, lanes: int, create: bool) -> None:
        self.fd = fd
        self.lanes = lanes
        size = HEADER_SIZE + lanes * CELL_SIZE + RING_SIZE
        if create:
            os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if create:
            self.map[:HEADER.size] = HEADER.pack(MAGIC, VERSION, lanes, CELL_SIZE)
        else:
            magic, version, found_lanes, cell_size = HEADER.unpack_from(self.map)
            if (magic, version, cell_size) != (MAGIC, VERSION, CELL_SIZE) or found_lanes != lanes:
                raise ValueError("shared memory segment has another layout version")
        cells_end = HEADER_SIZE + lanes * CELL_SIZE
        self.words = memoryview(self.map).cast("B")[HEADER_SIZE:cells_end].cast("Q")
        self.ring = memoryview(self.map).cast("B")[cells_end:cells_end + RING_SIZE]

    @classmethod
    def create(cls, slots: int) -> Segment:
        fd = os.memfd_create("mcpherd-shm", 0)  # close-on-exec unless handed over on purpose
        return cls(fd, slots * LANES_PER_SLOT, create=True)

    def cell(self, lane: int) -> Cell:
        return Cell(self.words, lane * WORDS)

    def close(self) -> None:
        self.words.release()
        self.ring.release()
        self.map.close()
        os.close(self.fd)


class Cell:
    """One process's words. Writers: the worker owning the lane. Readers: the master."""

    __slots__ = ("words", "base")

    def __init__(self, words: memoryview, base: int) -> None:
        self.words = words
        self.base = base

    def get(self, field: int) -> int:
        return int(self.words[self.base + field])

    def set(self, field: int, value: int) -> None:
        self.words[self.base + field] = value

    def add(self, field: int, delta: int = 1) -> None:
        self.words[self.base + field] += delta

    def clear(self) -> None:
        for i in range(WORDS):
            self.words[self.base + i] = 0


def lane_index(slot: int, lane: int) -> int:
    return slot * LANES_PER_SLOT + lane
