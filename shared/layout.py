"""The cluster's shared-memory segment: one fixed cell per worker process lane, written by one worker,
read by the master.

Format (version 1), little-endian, in a memfd the master creates (so it survives a SIGUSR2 re-exec):

    header   64 bytes  magic b"MCPHERD1" | version u32 | lanes u32 | cell_size u32 | (reserved)
    cell[i]  CELL_SIZE bytes each, i = slot * 2 + lane

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
VERSION = 1
HEADER = struct.Struct("<8sIII")
HEADER_SIZE = 64
WORDS = 64  # per cell: room for the metrics of the shared-memory issue without a format change
CELL_SIZE = WORDS * 8
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

STARTING, READY, DRAINING, STOPPED = 1, 2, 3, 4


class Segment:
    """The mapped segment. The master creates it; a worker maps the inherited fd."""

    def __init__(self, fd: int, lanes: int, create: bool) -> None:
        self.fd = fd
        self.lanes = lanes
        size = HEADER_SIZE + lanes * CELL_SIZE
        if create:
            os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if create:
            self.map[:HEADER.size] = HEADER.pack(MAGIC, VERSION, lanes, CELL_SIZE)
        else:
            magic, version, found_lanes, cell_size = HEADER.unpack_from(self.map)
            if (magic, version, cell_size) != (MAGIC, VERSION, CELL_SIZE) or found_lanes != lanes:
                raise ValueError("shared memory segment has another layout version")
        self.words = memoryview(self.map).cast("B")[HEADER_SIZE:].cast("Q")

    @classmethod
    def create(cls, slots: int) -> Segment:
        fd = os.memfd_create("mcpherd-shm", 0)  # close-on-exec unless handed over on purpose
        return cls(fd, slots * LANES_PER_SLOT, create=True)

    def cell(self, lane: int) -> Cell:
        return Cell(self.words, lane * WORDS)

    def close(self) -> None:
        self.words.release()
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
