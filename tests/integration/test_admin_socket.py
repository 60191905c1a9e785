"""The admin socket itself: where it lives, who may use it, and what a hostile or broken client gets.

Each test runs a real master (conftest.start_cluster) with its admin socket in a fresh directory under
/tmp. A second uid is the `nobody` account: the test's Python imports the CLI as root, then drops to
uid/gid 65534 before it connects (the interpreter under /root is not executable by nobody), so the
master sees exactly what `runuser -u nobody -- mcpherd status` would give it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from conftest import (Cluster, Process, assert_one_sentence, closed_by_peer, free_port, mcpherd_args, run_cli,
                      start_cluster, wait_until)

NOBODY, NOGROUP = 65534, 65534
AS_ANOTHER_USER = """
import os, sys
from mcpherd.cli import build_parser, main
import mcpherd.ctl
build_parser()  # every module the command needs is loaded while still root
os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1]))
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def directory() -> Iterator[str]:
    """A fresh directory under /tmp (AF_UNIX paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="mcpherd-admin-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Line:
    """A raw admin connection: bytes in, one decoded reply line out."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the master closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return dict(msgspec.json.decode(line))

    def closed_by_master(self, timeout: float) -> bool:
        return closed_by_peer(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


def request(cmd: str, **args: Any) -> bytes:
    return msgspec.json.encode({"v": 1, "cmd": cmd, "args": args}) + b"\n"


def cli_as(uid: int, gid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", AS_ANOTHER_USER, str(uid), str(gid), *args], capture_output=True,
                          text=True, timeout=30, cwd="/", stdin=subprocess.DEVNULL)


def serve_args(admin_socket: str) -> list[str]:
    """A one-worker master that is expected to refuse to start: no metrics port to clash on."""
    return mcpherd_args("serve", "--workers", "1", "--bind", f"127.0.0.1:{free_port()}", "--metrics-bind", "off",
                        "--admin-socket", admin_socket)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- where the socket lives ----------------------------------------------------------------------------
def test_the_socket_path_is_the_flag_then_systemd_then_xdg_then_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcpherd.shared.admin import socket_path

    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/mcpherd:/run/other")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert socket_path("/srv/admin.sock") == "/srv/admin.sock"
    assert socket_path() == "/run/mcpherd/admin.sock"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert socket_path() == "/run/user/1000/mcpherd/admin.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert socket_path() == f"/tmp/mcpherd-{os.getuid()}/admin.sock"


@pytest.mark.timeout(60)
def test_the_master_creates_a_0700_directory_and_a_0600_socket(spawn: Callable[..., Process],
                                                                 directory: str) -> None:
    cluster = start_cluster(spawn, os.path.join(directory, "run", "mcpherd"), 1)
    info = os.lstat(cluster.admin_socket)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert mode(os.path.dirname(cluster.admin_socket)) == 0o700


@pytest.mark.timeout(60)
def test_without_a_flag_the_socket_is_under_xdg_runtime_dir_and_the_cli_finds_it(
        spawn: Callable[..., Process], directory: str) -> None:
    env = {"XDG_RUNTIME_DIR": directory, "RUNTIME_DIRECTORY": ""}
    port = free_port()
    master = spawn(mcpherd_args("serve", "--workers", "1", "--bind", f"127.0.0.1:{port}", "--metrics-bind", "off"),
                   name="xdg", env=env)
    expected = os.path.join(directory, "mcpherd", "admin.sock")
    wait_until(lambda: os.path.exists(expected) or master.proc.poll() is not None, 20.0, message="admin socket")
    assert mode(os.path.dirname(expected)) == 0o700, master.output()
    status = wait_until(lambda: (r := run_cli("status", "--json", env=env)).code == 0 and r, 20.0, message="status")
    assert msgspec.json.decode(status.out)["master"]["pid"] == master.pid, status
    systemd = {"RUNTIME_DIRECTORY": os.path.join(directory, "mcpherd"), "XDG_RUNTIME_DIR": "/nonexistent"}
    assert run_cli("status", env=systemd).code == 0  # $RUNTIME_DIRECTORY/admin.sock wins over XDG


@pytest.mark.timeout(60)
def test_a_live_socket_is_refused_with_already_running_and_left_alone(spawn: Callable[..., Process],
                                                                        directory: str) -> None:
    cluster = start_cluster(spawn, directory, 1)
    inode = os.stat(cluster.admin_socket).st_ino
    second = spawn(serve_args(cluster.admin_socket), name="second")
    assert second.proc.wait(20) != 0
    assert "already running" in second.output() and "Traceback" not in second.output(), second.output()
    assert os.stat(cluster.admin_socket).st_ino == inode
    assert cluster.status()["master"]["pid"] == cluster.process.pid


@pytest.mark.timeout(60)
def test_a_stale_socket_left_by_kill_9_is_replaced_by_the_next_master(spawn: Callable[..., Process],
                                                                        directory: str) -> None:
    first = start_cluster(spawn, directory, 1)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.proc.wait(10)
    assert os.path.exists(first.admin_socket)  # nobody cleaned up after a SIGKILL
    unreachable = run_cli("status", "--admin-socket", first.admin_socket)
    assert unreachable.code == 3 and unreachable.out == "", unreachable
    assert_one_sentence(unreachable.err)
    second = start_cluster(spawn, directory, 1)
    assert second.status()["master"]["pid"] == second.process.pid != first.process.pid
    assert stat.S_IMODE(os.lstat(second.admin_socket).st_mode) == 0o600


@pytest.mark.timeout(30)
def test_a_path_that_is_not_a_socket_is_refused_and_kept(spawn: Callable[..., Process], directory: str) -> None:
    path = os.path.join(directory, "admin.sock")
    with open(path, "w") as precious:
        precious.write("not a socket")
    master = spawn(serve_args(path), name="notsock")
    assert master.proc.wait(20) != 0 and "not a socket" in master.output(), master.output()
    assert open(path).read() == "not a socket"


@pytest.mark.timeout(30)
def test_a_directory_another_user_created_is_refused(spawn: Callable[..., Process], directory: str) -> None:
    """/tmp/mcpherd-<uid> is predictable: whoever owns the directory can swap the socket under the master."""
    squatted = os.path.join(directory, "squat")
    os.mkdir(squatted)
    os.chown(squatted, NOBODY, NOGROUP)
    os.chmod(squatted, 0o777)
    master = spawn(serve_args(os.path.join(squatted, "admin.sock")), name="squat")
    assert master.proc.wait(20) != 0, master.output()
    assert "owned by" in master.output() and "Traceback" not in master.output(), master.output()
    assert os.listdir(squatted) == []


# -- who may use it ------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_another_uid_is_refused_by_the_directory_and_by_so_peercred(spawn: Callable[..., Process],
                                                                      directory: str) -> None:
    cluster = start_cluster(spawn, directory, 1)
    blocked = cli_as(NOBODY, NOGROUP, "status", "--admin-socket", cluster.admin_socket)
    assert blocked.returncode == 3 and blocked.stdout == "" and "Permission denied" in blocked.stderr, blocked
    assert_one_sentence(blocked.stderr)

    # Make the path reachable, as a careless chmod would: the master itself must still refuse.
    os.chmod(directory, 0o711)
    os.chmod(cluster.admin_socket, 0o666)
    refused = cli_as(NOBODY, NOGROUP, "status", "--json", "--admin-socket", cluster.admin_socket)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert "uid 65534 may not use this admin socket" in refused.stderr and "(refused)" in refused.stderr, refused
    assert_one_sentence(refused.stderr)
    wait_until(lambda: "refused a client (uid 65534)" in cluster.process.output(), 5.0, message="refusal logged")
    assert run_cli("status", "--admin-socket", cluster.admin_socket).code == 0  # root (our uid) still served


# -- what a broken or hostile client gets ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_garbage_gets_error_replies_in_order_and_the_connection_keeps_working(cluster_1: Cluster) -> None:
    line = Line(cluster_1.admin_socket)
    garbage = [b"garbage", b"\x00\xff\xfe\x80", b"[]", b"{}", b"", b'{"v":1,"cmd":"nope"}',
               b'{"v":1,"cmd":"status","args":[1]}', b'{"v":1,"cmd":"scale","args":{"workers":"x"}}',
               b'{"v":1,"cmd":"scale","args":{"workers":1,"delta":1}}', b'{"v":1,"cmd":"invalidate","args":{}}',
               b'{"v":1,"cmd":"status","version":1}',  # an unknown field named "version" is not a version mismatch
               b'{"v":1,"cmd":"status","args":{"x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}}"]  # 25 KB deep
    line.send(b"\n".join(garbage) + b"\n" + request("status") + b'{"v":2,"cmd":"status"}\n')
    for sent in garbage:
        reply = line.reply()
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (sent, reply)
        assert reply["error"]["message"] and "\n" not in reply["error"]["message"]
    assert line.reply()["result"]["master"]["pid"] == cluster_1.process.pid
    assert line.reply()["error"]["code"] == "unsupported_version"
    line.send(request("scale", workers=99))
    assert line.reply()["error"]["code"] == "refused"
    line.send(request("config"))
    assert line.reply()["ok"] is True
    line.close()


@pytest.mark.timeout(60)
def test_half_messages_are_answered_once_complete_and_after_a_half_close(cluster_1: Cluster) -> None:
    line = Line(cluster_1.admin_socket)
    message = request("status")
    for piece in (message[:5], message[5:17], message[17:]):
        line.send(piece)
        time.sleep(0.2)
    assert line.reply()["ok"] is True
    line.send(request("config"))
    line.sock.shutdown(socket.SHUT_WR)  # `printf ... | nc -U`: the request, then EOF
    assert line.reply()["result"]["admin_socket"] == cluster_1.admin_socket
    assert line.closed_by_master(5.0)


@pytest.mark.timeout(60)
def test_silent_trickling_and_oversized_clients_are_dropped(cluster_1: Cluster) -> None:
    from mcpherd.shared.admin import MAX_LINE
    from mcpherd.supervisor.admin import CLIENT_TIMEOUT_S

    silent, partial, trickle = (Line(cluster_1.admin_socket) for _ in range(3))
    partial.send(b'{"v":1,"cmd":"sta')
    started = time.monotonic()
    huge = Line(cluster_1.admin_socket)
    try:
        huge.send(b"x" * (MAX_LINE + 4096))
    except (BrokenPipeError, ConnectionResetError):
        pass
    else:
        assert huge.reply()["error"]["code"] == "bad_request"
    assert huge.closed_by_master(5.0)
    # One byte a second, never a newline: each byte is activity, but the request never completes.
    while time.monotonic() - started < CLIENT_TIMEOUT_S + 3:
        try:
            trickle.send(b"{")
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(1.0)
    assert silent.closed_by_master(1.0) and partial.closed_by_master(1.0)
    assert trickle.closed_by_master(1.0), "a client trickling one byte a second was never dropped"
    assert time.monotonic() - started < CLIENT_TIMEOUT_S + 5
    assert cluster_1.status()["master"]["pid"] == cluster_1.process.pid


@pytest.mark.timeout(60)
def test_a_client_that_never_reads_its_replies_is_dropped(cluster_1: Cluster) -> None:
    greedy = Line(cluster_1.admin_socket, timeout=2.0)
    sent = 0
    try:
        for _ in range(20_000):  # ~3 KiB of status each: far past MAX_PENDING_OUT, never read
            greedy.send(request("status"))
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    except TimeoutError:
        pytest.fail(f"the master stopped reading after {sent} requests but kept the connection")
    assert sent < 20_000, "the master kept buffering replies for a client that never reads"
    start = time.monotonic()
    assert cluster_1.status()["workers"][0]["state"] == "ready"
    assert time.monotonic() - start < 1.0


@pytest.fixture
def cluster_1(spawn: Callable[..., Process], directory: str) -> Cluster:
    return start_cluster(spawn, directory, 1)
