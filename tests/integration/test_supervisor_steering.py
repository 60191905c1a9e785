"""The master's SO_REUSEPORT group in the real kernel, inside this process (no workers needed): the cBPF
program steers new connections only to live slots' sockets, re-steering leaves queued connections
where they are, and the group survives the SIGUSR2 hand-over format (fds passed by number)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from mcpherd.shared.netstat import accept_queue_length
from mcpherd.supervisor.sockets import ListenerGroup, inherited_groups


@pytest.fixture
def group() -> Iterator[ListenerGroup]:
    listeners = ListenerGroup("127.0.0.1", 0)
    listeners.ensure(4)
    yield listeners
    for sock in listeners.sockets:
        sock.close()


def connect(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5.0) for _ in range(count)]


def queues(group: ListenerGroup) -> list[int]:
    return [accept_queue_length(sock) for sock in group.sockets]


@pytest.mark.timeout(30)
def test_new_connections_reach_only_the_live_slots_sockets(group: ListenerGroup) -> None:
    assert len({s.getsockname() for s in group.sockets}) == 1 and group.port != 0
    assert group.steer([1, 3])
    clients = connect(group.port, 200)
    try:
        lengths = queues(group)
        assert lengths[0] == lengths[2] == 0
        assert lengths[1] > 0 and lengths[3] > 0 and lengths[1] + lengths[3] == 200  # P(all on one) = 2**-199
    finally:
        for client in clients:
            client.close()


@pytest.mark.timeout(30)
def test_re_steering_moves_only_new_connections(group: ListenerGroup) -> None:
    assert group.steer([2])
    queued = connect(group.port, 30)
    assert group.steer([0, 1])
    fresh = connect(group.port, 60)
    try:
        lengths = queues(group)
        assert lengths[2] == 30 and lengths[3] == 0  # the queued ones stayed where they were
        assert lengths[0] + lengths[1] == 60 and lengths[0] > 0 and lengths[1] > 0
        assert group.steered == [0, 1]
    finally:
        for client in queued + fresh:
            client.close()


@pytest.mark.timeout(30)
def test_a_group_being_built_sends_everything_to_its_first_socket() -> None:
    growing = ListenerGroup("127.0.0.1", 0)
    try:
        growing.ensure(1)
        growing.ensure(3)  # sockets 1 and 2 have no worker yet: they must receive nothing
        clients = connect(growing.port, 40)
        assert queues(growing) == [40, 0, 0]
        for client in clients:
            client.close()
    finally:
        for sock in growing.sockets:
            sock.close()


@pytest.mark.timeout(30)
def test_the_hand_over_format_adopts_the_same_kernel_sockets(group: ListenerGroup) -> None:
    handover = group.inheritable()
    address, _, fds = handover.rpartition("=")
    assert address == f"127.0.0.1:{group.port}" and fds == ",".join(str(s.fileno()) for s in group.sockets)
    duplicates = [os.dup(s.fileno()) for s in group.sockets]  # what the new master finds after exec
    (adopted,) = inherited_groups(f"{address}=" + ",".join(map(str, duplicates)))
    try:
        assert (adopted.host, adopted.port, adopted.shared) == ("127.0.0.1", group.port, False)
        assert [os.fstat(s.fileno()).st_ino for s in adopted.sockets] == \
            [os.fstat(s.fileno()).st_ino for s in group.sockets]
        assert not any(os.get_inheritable(s.fileno()) for s in adopted.sockets)
        assert adopted.steer([3])  # the new master re-attaches its own program to the same group
        clients = connect(group.port, 10)
        assert queues(group) == [0, 0, 0, 10]
        for client in clients:
            client.close()
    finally:
        for sock in adopted.sockets:
            sock.close()
