"""The worker's per-turn write batch (worker/http.py `_WriteBatch`) on a real uvloop loop, with stand-in
connections that record when they were flushed: answers wait for the end of the loop turn they were
written in, never longer, and a turn with many writers sends them in bounded batches."""

from __future__ import annotations

import asyncio

import uvloop

from mcpherd.worker.http import _WriteBatch


class Writer:
    """Stands in for an HttpConnection: the batch only calls flush_output."""

    def __init__(self, name: int, log: list[tuple[str, int]]) -> None:
        self.name = name
        self.log = log

    def flush_output(self) -> None:
        self.log.append(("flushed", self.name))


def test_writes_of_one_turn_leave_together_at_its_end_and_not_later() -> None:
    log: list[tuple[str, int]] = []

    async def scenario() -> None:
        batch = _WriteBatch(asyncio.get_running_loop())
        for name in range(3):
            batch.add(Writer(name, log))  # type: ignore[arg-type]
        log.append(("turn ends", -1))
        await asyncio.sleep(0)  # the loop's next turn
        log.append(("next turn", -1))
        batch.add(Writer(3, log))  # type: ignore[arg-type]
        await asyncio.sleep(0)

    uvloop.run(scenario())
    assert log == [("turn ends", -1), ("flushed", 0), ("flushed", 1), ("flushed", 2), ("next turn", -1),
                   ("flushed", 3)]


def test_a_turn_with_many_writers_sends_them_in_batches_of_max_connections() -> None:
    log: list[tuple[str, int]] = []

    async def scenario() -> None:
        batch = _WriteBatch(asyncio.get_running_loop(), max_connections=4)
        for name in range(10):
            log.append(("wrote", name))
            batch.add(Writer(name, log))  # type: ignore[arg-type]
        log.append(("turn ends", -1))
        await asyncio.sleep(0)

    uvloop.run(scenario())
    # Writers 0-3 leave when the fifth writes, 4-7 when the ninth does, 8-9 at the end of the turn.
    assert log == [("wrote", 0), ("wrote", 1), ("wrote", 2), ("wrote", 3), ("wrote", 4),
                   ("flushed", 0), ("flushed", 1), ("flushed", 2), ("flushed", 3),
                   ("wrote", 5), ("wrote", 6), ("wrote", 7), ("wrote", 8),
                   ("flushed", 4), ("flushed", 5), ("flushed", 6), ("flushed", 7),
                   ("wrote", 9), ("turn ends", -1), ("flushed", 8), ("flushed", 9)]
