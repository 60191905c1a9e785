"""The per-worker L1 cache of tool results: LRU within bounds on entries and bytes, plus a TTL.

Keys are `<tool>:<arguments as canonical JSON (sorted keys)>`, so the same call hits whatever order
the client sent the arguments in, and `prefix="weather:"` names every cached call of one tool.
Invalidation never reaches into other workers directly: it arrives here as a cluster event
(mcpherd.shared.events.Invalidate), applied by every worker before the invalidating call returns.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec

from mcpherd.shared import layout


@dataclass(slots=True)
class Entry:
    value: Any
    expires: float
    size: int
    tags: tuple[str, ...]


def cache_key(tool: str, raw_arguments: bytes) -> str:
    canonical = msgspec.json.encode(msgspec.json.decode(raw_arguments or b"{}"), order="sorted")
    return f"{tool}:{canonical.decode()}"


class ResultCache:
    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024,
                 cell: layout.Cell | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.cell = cell
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> Any | None:
        entry = self.entries.get(key)
        if entry is None or entry.expires < time.monotonic():
            if entry is not None:
                self._drop(key)
            self._count(layout.F_CACHE_MISSES)
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        self._count(layout.F_CACHE_HITS)
        return entry.value

    def put(self, key: str, value: Any, ttl: float, tags: tuple[str, ...]) -> None:
        size = len(msgspec.json.encode(value)) + len(key)
        if size > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = Entry(value, time.monotonic() + ttl, size, tags)
        self.bytes += size
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self.entries))
            self._drop(oldest)
            self.evictions += 1
            self._count(layout.F_CACHE_EVICTIONS)

    def invalidate(self, key: str | None = None, tag: str | None = None, prefix: str | None = None,
                   all: bool = False) -> int:
        if all:
            dropped = len(self.entries)
            self.entries.clear()
            self.bytes = 0
            return dropped
        doomed = [k for k, e in self.entries.items()
                  if k == key or (prefix is not None and k.startswith(prefix)) or (tag is not None and tag in e.tags)]
        for k in doomed:
            self._drop(k)
        return len(doomed)

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.size

    def _count(self, field: int) -> None:
        if self.cell is not None:
            self.cell.add(field)
