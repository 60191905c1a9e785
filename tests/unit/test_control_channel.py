"""The control channel carries what does not fit a datagram: chunked messages, session tables in parts."""

from __future__ import annotations

import os
from collections import deque

from mcpherd.shared import control


def test_large_tables_are_split_into_parts_that_fit_a_datagram_and_add_up_to_the_tables() -> None:
    levels = {f"m1.{os.urandom(30).hex()}": ("warning", "debug")[i % 2] for i in range(20_000)}
    subscriptions = {f"m1.{os.urandom(30).hex()}": {f"test://r/{i}/{j}" for j in range(i % 7)} for i in range(5_000)}
    subscriptions["m1.busy"] = {f"test://many/{j}" for j in range(3_000)}  # one session past a part's size
    ended = [os.urandom(16) for _ in range(30_000)]
    messages = control.snapshot(42, levels, subscriptions, ended, 1795000000.0, False)
    *parts, last = messages
    assert last == control.Snapshot(42, False, 1795000000.0)
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
    assert control.snapshot(0, {}, {}, [], 0.0, True) == [control.Snapshot(0, True, 0.0)]


def test_a_message_past_a_datagram_travels_in_chunks_and_arrives_whole_between_others() -> None:
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    watched: list[bool] = []
    sender, receiver = control.Sender(ours, watched.append), control.Receiver(theirs)
    big = os.urandom(300_000)
    assert sender.send(control.Wake(1)) and sender.send(control.Deliver(big)) and sender.send(control.Wake(2))
    assert len(sender.waiting) > 0 and watched == [True]  # 7 chunks of 48 KB: more than the send buffer holds
    received = []
    for _ in range(20):  # as the two loops would: read what arrived, then send what waits once there is room
        while True:
            try:
                got = receiver.receive()
            except BlockingIOError:
                break
            assert got is not None
            received.append(got[0])
        if sender.waiting:
            sender.drain()
    assert received == [control.Wake(1), control.Deliver(big), control.Wake(2)]
    assert sender.waiting == deque() and watched == [True, False]
    ours.close()
    theirs.close()


def test_pieces_of_a_message_whose_sender_died_midway_are_dropped() -> None:
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    receiver = control.Receiver(theirs)
    ours.send(control._encoder.encode(control.Chunk(b"half of something", True)))
    ours.send(control._encoder.encode(control.Wake(3)))  # its successor's first message
    assert receiver.receive() == (control.Wake(3), None) and receiver.pieces == []
    ours.close()
    assert receiver.receive() is None
    theirs.close()
