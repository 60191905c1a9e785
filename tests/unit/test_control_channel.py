"""The control channel carries what does not fit a datagram: chunked messages, a new worker's session tables."""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable

from mcpherd.shared import control


def exchange(sender: control.Sender, receiver: control.Receiver) -> list[object]:
    """What arrives, reading and draining as the two loops would until nothing waits."""
    received = []
    for _ in range(10_000):
        while True:
            try:
                got = receiver.receive()
            except BlockingIOError:
                break
            assert got is not None
            received.append(got[0])
        if not sender.waiting:
            return received
        sender.drain()
    raise AssertionError("the channel never emptied")


def channel_pair(watch: Callable[[bool], None]) -> tuple[control.Sender, control.Receiver, list[socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    return control.Sender(ours, watch), control.Receiver(theirs), [ours, theirs]


def test_a_snapshot_of_large_tables_reaches_a_new_worker_whole() -> None:
    levels = {f"m1.{os.urandom(30).hex()}": ("warning", "debug")[i % 2] for i in range(20_000)}
    subscriptions = {f"m1.{os.urandom(30).hex()}": sorted(f"test://r/{i}/{j}" for j in range(1 + i % 7))
                     for i in range(5_000)}
    subscriptions["m1.busy"] = [f"test://many/{j}" for j in range(3_000)]
    ended = [os.urandom(16) for _ in range(30_000)]
    snapshot = control.Snapshot(42, levels, subscriptions, ended, False, 1795000000.0)
    assert len(control._encoder.encode(snapshot)) > 10 * control.MAX_DATAGRAM  # ~2,000 sessions fill one
    sender, receiver, sockets = channel_pair(lambda _writable: None)
    assert sender.send(control.Wake(1)) and sender.send(snapshot) and sender.send(control.Wake(2))
    assert exchange(sender, receiver) == [control.Wake(1), snapshot, control.Wake(2)]
    for sock in sockets:
        sock.close()


def test_a_message_past_a_datagram_travels_in_chunks_and_arrives_whole_between_others() -> None:
    watched: list[bool] = []
    sender, receiver, sockets = channel_pair(watched.append)
    big = os.urandom(300_000)
    assert sender.send(control.Wake(1)) and sender.send(control.Deliver(big)) and sender.send(control.Wake(2))
    assert len(sender.waiting) > 0 and watched == [True]  # 7 chunks of 48 KB: more than the send buffer holds
    assert exchange(sender, receiver) == [control.Wake(1), control.Deliver(big), control.Wake(2)]
    assert sender.waiting == deque() and watched == [True, False]
    for sock in sockets:
        sock.close()


def test_pieces_of_a_message_whose_sender_died_midway_are_dropped() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    receiver = control.Receiver(theirs)
    ours.send(control._encoder.encode(control.Chunk(b"half of something", True)))
    ours.send(control._encoder.encode(control.Wake(3)))  # its successor's first message
    assert receiver.receive() == (control.Wake(3), None) and receiver.pieces == []
    ours.close()
    assert receiver.receive() is None
    theirs.close()
