"""Ended sessions: their tokens are refused until they would have expired anyway (a day), in bounded memory.

Every process that can rebuild a session from its token (every worker) and the master (for a new
worker's snapshot) keeps one. Remembering every ended session for a day is ~110 bytes each: at a hundred
session ends a second, a gigabyte per process. So at most `limit` are remembered one by one; past that,
the oldest tenth is replaced by a watermark, `before`: every token issued at or before the newest of
them is refused as well. No ended session comes back, and the price of the bound is paid by sessions
that old still in use: they are refused (404) and their clients start new ones, as the spec has them
do. At a hundred ends a second the default bound holds the last ~3 hours one by one.
"""

from __future__ import annotations

import itertools
import time

MAX_REVOCATIONS = 1_000_000  # ~110 MB at most per process
SESSION_MAX_AGE_S = 86400.0  # a session token's lifetime (worker/sessions.py)
PRUNE_EVERY_S = 60.0


class Revocations:
    def __init__(self, max_age: float, limit: int = MAX_REVOCATIONS) -> None:
        self.max_age = max_age  # a token's lifetime: `expires` - `max_age` is when it was issued
        self.limit = limit
        self.until: dict[bytes, float] = {}  # nonce -> when its token expires anyway (unix s)
        self.before = 0.0  # every token issued at or before this (unix s) is refused
        self._next_prune = 0.0

    def __len__(self) -> int:
        return len(self.until)

    def add(self, nonce: bytes, expires: float) -> bool:
        """Remember one; True when the watermark rose (sessions issued before it are refused now)."""
        self.until[nonce] = expires
        if len(self.until) <= self.limit:
            return False
        oldest = list(itertools.islice(self.until, max(1, self.limit // 10)))
        newest_issued = max(self.until.pop(old) for old in oldest) - self.max_age
        return self.raise_before(newest_issued)

    def raise_before(self, before: float) -> bool:
        if before <= self.before:
            return False
        self.before = before
        return True

    def refuses(self, nonce: bytes, issued: float) -> bool:
        return issued <= self.before or nonce in self.until

    def prune(self, now: float | None = None) -> None:
        """Forget the ones whose tokens expired anyway; a pass over all of them, so once a minute."""
        monotonic = time.monotonic()
        if monotonic < self._next_prune:
            return
        self._next_prune = monotonic + PRUNE_EVERY_S
        wall = time.time() if now is None else now
        for nonce in [n for n, until in self.until.items() if until < wall]:
            del self.until[nonce]
