"""systemd integration, seen from systemd's side: the units verify, the master speaks sd_notify on a
real notification socket, and socket activation serves through the passed socket.

The receiver here is what systemd's notification socket is: an AF_UNIX datagram socket (a path, or an
abstract `@name`) with SO_PASSCRED, so every message arrives with its sender's pid. With
NotifyAccess=main systemd drops any message not sent by the main pid, so every test checks the pid.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Process, free_port, mcpherd_args, wait_until
from supervisor_support import alive, echo

UNITS = Path(__file__).resolve().parents[2] / "systemd"
EXEC_START = "/opt/mcpherd/bin/mcpherd"  # the path in mcpherd.service, replaced by the real one to verify
LIFECYCLE = ("READY", "RELOADING", "STOPPING", "MAINPID")


@dataclass
class Note:
    """One sd_notify datagram: when it arrived, who sent it, its assignments."""

    at: float
    pid: int
    fields: dict[str, str]


class NotifyReceiver:
    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.notes: list[Note] = []

    def receive(self, timeout: float) -> Note | None:
        if not select.select([self.sock], [], [], max(timeout, 0.0))[0]:
            return None
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("3i", d[:12])[0] for level, kind, d in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.notes.append(Note(time.monotonic(), pid, fields))
        return self.notes[-1]

    def wait_for(self, key: str, timeout: float = 30.0) -> Note:
        deadline = time.monotonic() + timeout
        while (note := self.receive(deadline - time.monotonic())) is not None:
            if key in note.fields:
                return note
        raise TimeoutError(f"no {key}= within {timeout}s; received {self.notes}")

    def collect(self, seconds: float) -> list[Note]:
        """Everything queued now and arriving in the next `seconds`."""
        deadline, notes = time.monotonic() + seconds, []
        while (note := self.receive(deadline - time.monotonic())) is not None:
            notes.append(note)
        return notes

    def lifecycle(self) -> list[tuple[str, int]]:
        """(key, sender pid) of every state change so far: WATCHDOG= and STATUS= alone are not."""
        return [(key, note.pid) for note in self.notes for key in LIFECYCLE if key in note.fields]


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory for AF_UNIX paths (108 bytes at most: pytest's tmp_path can be longer)."""
    directory = tempfile.mkdtemp(prefix="mcpherd-sd-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Notified:
    process: Process
    receiver: NotifyReceiver
    url: str
    admin_socket: str

    def serving(self, generation: int) -> int:
        from mcpherd.ctl import AdminClient

        client = AdminClient(self.admin_socket)
        try:
            workers = client.call("status")["workers"]
        finally:
            client.close()
        return sum(1 for w in workers if w["state"] == "ready" and w["generation"] == generation)


def serve_notified(spawn: Callable[..., Process], directory: str, address: str, workers: int = 2,
                   watchdog_usec: int = 2_000_000) -> Notified:
    receiver = NotifyReceiver(address)
    port, metrics_port = free_port(), free_port()
    admin_socket = os.path.join(directory, "admin.sock")
    process = spawn(mcpherd_args("serve", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                                 "--admin-socket", admin_socket, "--metrics-bind", f"127.0.0.1:{metrics_port}"),
                    name="notified", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(watchdog_usec),
                                          "WATCHDOG_PID": ""})
    return Notified(process, receiver, f"http://127.0.0.1:{port}/mcp", admin_socket)


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: tests/run.sh installs Debian's systemd package"
    return path


# -- the units ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_units_verify_clean(tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing for either unit. It insists that ExecStart= exists, so the
    copy verified here runs the mcpherd this test suite installed instead of /opt/mcpherd/bin/mcpherd."""
    installed = shutil.which("mcpherd") or str(Path(sys.executable).parent / "mcpherd")
    assert os.access(installed, os.X_OK), "the mcpherd console script is not installed"
    service = (UNITS / "mcpherd.service").read_text()
    assert service.count(f"ExecStart={EXEC_START} ") == 1
    (tmp_path / "mcpherd.service").write_text(service.replace(f"ExecStart={EXEC_START} ", f"ExecStart={installed} "))
    shutil.copy(UNITS / "mcpherd.socket", tmp_path / "mcpherd.socket")
    result = subprocess.run([systemd_tool("systemd-analyze"), "verify", "mcpherd.service", "mcpherd.socket"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=50, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# -- sd_notify ---------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("namespace", ["path", "abstract"])
def test_start_reload_stop_sequence(spawn: Callable[..., Process], short_dir: str, namespace: str) -> None:
    address = os.path.join(short_dir, "notify") if namespace == "path" else f"@mcpherd-test-{os.getpid()}-{time.time_ns()}"
    herd = serve_notified(spawn, short_dir, address)
    master = herd.process.pid

    herd.receiver.wait_for("READY")
    assert echo(herd.url, "x") == "x"  # every worker accepts at the moment READY=1 arrives
    assert herd.serving(generation=1) == 2

    asked_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    herd.process.signal(signal.SIGHUP)
    reloading = herd.receiver.wait_for("RELOADING")
    assert abs(int(reloading.fields["MONOTONIC_USEC"]) - asked_at) < 5_000_000
    herd.receiver.wait_for("READY")
    assert herd.serving(generation=2) == 2  # READY=1 only once the new generation serves
    assert echo(herd.url, "y") == "y"

    herd.process.signal(signal.SIGTERM)
    herd.receiver.wait_for("STOPPING")
    assert herd.process.proc.wait(30) == 0
    herd.receiver.collect(0.2)
    assert herd.receiver.lifecycle() == [("READY", master), ("RELOADING", master), ("READY", master),
                                         ("STOPPING", master)]
    assert {note.pid for note in herd.receiver.notes} == {master}
    statuses = [n.fields["STATUS"] for n in herd.receiver.notes if "STATUS" in n.fields]
    assert any(re.fullmatch(r"2 workers, \d+ req/s, generation \d+", s) for s in statuses), statuses


@pytest.mark.timeout(90)
def test_watchdog_pings_only_while_the_loop_turns(spawn: Callable[..., Process], short_dir: str) -> None:
    """WATCHDOG_USEC=1s: a ping every 0.5 s; none while the master is stopped, again once it runs."""
    herd = serve_notified(spawn, short_dir, os.path.join(short_dir, "notify"), watchdog_usec=1_000_000)
    master = herd.process.pid
    herd.receiver.wait_for("READY")

    def pings(notes: list[Note]) -> int:
        return sum(1 for n in notes if n.fields.get("WATCHDOG") == "1" and n.pid == master)

    assert 4 <= pings(herd.receiver.collect(3.0)) <= 8  # 6 expected

    os.kill(master, signal.SIGSTOP)
    try:
        wait_until(lambda: Path(f"/proc/{master}/stat").read_text().rpartition(")")[2].split()[0] == "T", 5)
        herd.receiver.collect(0.0)  # sent before it stopped
        assert pings(herd.receiver.collect(2.5)) == 0
    finally:
        os.kill(master, signal.SIGCONT)
    resumed = herd.receiver.wait_for("WATCHDOG", timeout=2.0)
    assert resumed.pid == master
    assert 3 <= pings(herd.receiver.collect(2.5)) <= 7  # 5 expected
    assert herd.process.proc.poll() is None


@pytest.mark.timeout(120)
def test_reexec_hands_the_main_pid_over(spawn: Callable[..., Process], short_dir: str) -> None:
    """SIGUSR2: the old master (the main pid) sends MAINPID=<new master>, then the new one READY=1.
    Neither speaks when systemd (NotifyAccess=main) would drop it; requests never fail."""
    herd = serve_notified(spawn, short_dir, os.path.join(short_dir, "notify"), watchdog_usec=1_000_000)
    old = herd.process.pid
    herd.receiver.wait_for("READY")
    failures: list[str] = []
    served = 0
    done = threading.Event()

    def load() -> None:
        nonlocal served
        while not done.is_set():
            try:
                assert echo(herd.url, "during") == "during"
                served += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                failures.append(repr(exc))

    client = threading.Thread(target=load)
    client.start()
    try:
        herd.process.signal(signal.SIGUSR2)
        handover = herd.receiver.wait_for("MAINPID")
        new = int(handover.fields["MAINPID"])
        # Not the old master's child: systemd (the reaper of orphans) takes it as its own and so waits
        # for it on stop; a main pid it is not the parent of would be SIGKILLed right after SIGTERM.
        assert int(Path(f"/proc/{new}/stat").read_text().rpartition(")")[2].split()[1]) != old
        ready = herd.receiver.wait_for("READY")
        assert herd.process.proc.wait(30) == 0  # the old master drained and left
        assert echo(herd.url, "after") == "after"
        assert herd.receiver.wait_for("WATCHDOG", timeout=2.0).pid == new
    finally:
        done.set()
        client.join(20)
    assert not failures and served > 0, failures
    assert handover.pid == old and new != old and ready.pid == new
    before = herd.receiver.notes[: herd.receiver.notes.index(handover)]
    after = herd.receiver.notes[herd.receiver.notes.index(handover) + 1:]
    assert {n.pid for n in before} == {old} and {n.pid for n in after} == {new}
    assert herd.receiver.lifecycle() == [("READY", old), ("MAINPID", old), ("READY", new)]

    os.kill(new, signal.SIGTERM)
    assert herd.receiver.wait_for("STOPPING").pid == new
    wait_until(lambda: not alive(new), 30, message="the new master to exit")


# -- socket activation -------------------------------------------------------------------------------
def listeners(port: int) -> list[str]:
    """The listening TCP sockets on `port`, one line each (ss: every member of a reuseport group)."""
    return subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True,
                          timeout=30).stdout.splitlines()


def whoami_pids(url: str, count: int) -> set[int]:
    from conftest import RawHttp, whoami

    pids = set()
    for _ in range(count):
        with RawHttp(url) as http:
            pids.add(whoami(http))
    return pids


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activate_serves_through_the_passed_socket(spawn: Callable[..., Process],
                                                                  short_dir: str, workers: int) -> None:
    """systemd-socket-activate holds the port and execs mcpherd on the first connection; the passed
    socket has no SO_REUSEPORT, so every worker accepts from it and the master binds nothing."""
    port = free_port()
    process = spawn([systemd_tool("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", *mcpherd_args(
        "serve", "--workers", str(workers), "--bind", f"127.0.0.1:{free_port()}",
        "--admin-socket", os.path.join(short_dir, "admin.sock"), "--metrics-bind", f"127.0.0.1:{free_port()}")],
        name="activate")
    url = f"http://127.0.0.1:{port}/mcp"
    wait_until(lambda: listeners(port), 10, message="systemd-socket-activate")
    assert echo(url, "x", timeout=30) == "x"  # this connection starts mcpherd, then is served
    pids = wait_until(lambda: len(found := whoami_pids(url, 20)) == workers and found, 30, 0.1,
                      f"requests served by all {workers} workers")
    assert all(alive(pid) for pid in pids)
    assert len(listeners(port)) == 1, process.output()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("host", ["127.0.0.1", "::"])
def test_reuseport_socket_becomes_slot_zero_of_the_group(spawn: Callable[..., Process], short_dir: str,
                                                         host: str) -> None:
    """What mcpherd.socket (ReusePort=yes) passes: the master adds the rest of the group with the passed
    socket's options and every worker serves. On "::" the passed socket is dual-stack (BindIPv6Only=
    both): IPv4 clients reach both workers only if the added sockets are dual-stack too (IPV6_V6ONLY
    copied), since sockets that differ in it form separate groups."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET6 and not _ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    port = free_port()
    launcher = ("import os, socket, sys\n"
                f"s = socket.socket({int(family)}); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
                + ("s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n" if family == socket.AF_INET6 else "")
                + f"s.bind(({host!r}, {port})); s.listen(2048)\n"
                "os.dup2(s.fileno(), 3); os.set_inheritable(3, True)\n"
                "os.execve(sys.executable, sys.argv[1:], {**os.environ, 'LISTEN_FDS': '1', "
                "'LISTEN_PID': str(os.getpid())})\n")
    spawn([sys.executable, "-c", launcher, *mcpherd_args(
        "serve", "--workers", "2", "--bind", f"127.0.0.1:{free_port()}",
        "--admin-socket", os.path.join(short_dir, "admin.sock"), "--metrics-bind", "off")], name="reuseport")
    url = f"http://127.0.0.1:{port}/mcp"
    wait_until(lambda: listeners(port), 10, message="the passed socket")
    wait_until(lambda: len(whoami_pids(url, 20)) == 2, 30, 0.1, "requests served by both workers")
    assert len(listeners(port)) >= 2, listeners(port)  # the passed socket and the ones the master added


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.timeout(30)
def test_passed_socket_of_another_owner_is_shared(tmp_path: Path) -> None:
    """systemd creates mcpherd.socket's socket as root and the service runs as mcpherd: Linux refuses
    to add that user's sockets to root's reuseport group, so the slots share the passed socket."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create the socket as one user and adopt it as another")
    passed = socket.socket()
    passed.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    passed.bind(("127.0.0.1", 0))
    passed.listen()
    pid = os.fork()
    if pid == 0:  # the service user
        code = 1
        try:
            from mcpherd.supervisor.sockets import adopt_activated

            os.setgid(65534)
            os.setuid(65534)
            [group] = adopt_activated([passed])
            group.ensure(4)
            code = 0 if group.shared and {s.fileno() for s in group.sockets} == {passed.fileno()} else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
