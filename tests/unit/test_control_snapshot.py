"""A new worker's session tables travel as many small datagrams (control.snapshot), whatever their size."""

from __future__ import annotations

import os

from mcpherd.shared import control


def test_large_tables_are_split_into_parts_that_fit_a_datagram_and_add_up_to_the_tables() -> None:
    levels = {f"m1.{os.urandom(30).hex()}": ("warning", "debug")[i % 2] for i in range(20_000)}
    subscriptions = {f"m1.{os.urandom(30).hex()}": {f"test://r/{i}/{j}" for j in range(i % 7)} for i in range(5_000)}
    subscriptions["m1.busy"] = {f"test://many/{j}" for j in range(3_000)}  # one session past a part's size
    ended = [os.urandom(16) for _ in range(30_000)]
    messages = control.snapshot(42, levels, subscriptions, ended, False)
    *parts, last = messages
    assert last == control.Snapshot(42, False)
    assert all(isinstance(p, control.SnapshotPart) for p in parts) and len(parts) > 10
    assert max(len(control._encoder.encode(p)) for p in parts) <= control.MAX_DATAGRAM // 2
    merged_levels: dict[str, str] = {}
    merged_subscriptions: dict[str, set[str]] = {}
    merged_ended: list[bytes] = []
    for part in parts:
        decoded = control._decoder.decode(control._encoder.encode(part))  # as the worker receives it
        merged_levels.update(decoded.log_levels)
        for token, uris in decoded.subscriptions.items():
            merged_subscriptions.setdefault(token, set()).update(uris)
        merged_ended += decoded.ended
    assert merged_levels == levels
    assert merged_subscriptions == {token: uris for token, uris in subscriptions.items() if uris}
    assert merged_ended == ended


def test_empty_tables_are_just_the_end() -> None:
    assert control.snapshot(0, {}, {}, [], True) == [control.Snapshot(0, True)]
