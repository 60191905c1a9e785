"""When things go wrong: an app that cannot start (restart intensity, back-off, giving up), a blocked
event loop (heartbeat -> SIGABRT with a traceback -> replacement), recycling, and bad configuration at
start and on SIGHUP (the running configuration and generation keep serving).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Process, RawHttp, free_port, modern_call, wait_until
from supervisor_support import QueuedRequests, alive, echo, serve_args, start_herd, tool_text, write_config

from mcpherd.supervisor.topology import placement, read_topology

GOOD_APP = '''
import time
from mcpherd import App

app = App("supervisor-test-app", version="1")


@app.tool()
async def echo(text: str) -> str:
    """Returns its text."""
    return text


@app.tool()
async def block(seconds: float) -> str:
    """Blocks the event loop: a synchronous sleep inside an async tool."""
    time.sleep(seconds)
    return "unblocked"
'''

CRASH_ON_CPU = '''
import os
if os.sched_getaffinity(0) == {{{cpu}}}:
    raise RuntimeError("this app cannot start on cpu {cpu}")
''' + GOOD_APP


def app_module(tmp_path: Path, name: str, source: str) -> tuple[str, dict[str, str]]:
    (tmp_path / f"{name}.py").write_text(source)
    return f"{name}:app", {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}


def died_lines(log: str, slot: int) -> list[str]:
    return re.findall(rf"^.*slot {slot} \(cpu \d+\): worker \d+ died .*$", log, re.MULTILINE)


@pytest.mark.timeout(30)
def test_an_app_that_never_starts_trips_restart_intensity_and_the_master_gives_up(
        spawn: Callable[..., Process], tmp_path: Path) -> None:
    app, env = app_module(tmp_path, "broken_app", "raise ImportError('no such dependency: frobnicate')\n")
    herd = start_herd(spawn, tmp_path, 2, "--app", app, env=env, settle=False)
    assert herd.process.proc.wait(20) == 3
    log = herd.log()
    assert "cannot import broken_app: ImportError: no such dependency: frobnicate" in log
    for slot in (0, 1):  # exactly max_restarts + 1 forks per slot: no fork storm
        died = died_lines(log, slot)
        assert len(died) == 6, log
        assert all("(application failed to load)" in line for line in died), log
        assert died[-1].endswith("6 restarts in 30s exceeds 5: backing off 1s"), log
    assert "every worker slot exceeded its restart intensity: giving up (exit 3)" in log


@pytest.mark.timeout(45)
def test_one_crashing_slot_backs_off_exponentially_while_the_others_serve(
        spawn: Callable[..., Process], tmp_path: Path) -> None:
    order = placement(read_topology(), os.sched_getaffinity(0))
    assert len(order) >= 2, "this test needs two CPUs: one where the app crashes, one where it serves"
    app, env = app_module(tmp_path, "crash_on_cpu", CRASH_ON_CPU.format(cpu=order[0]))  # slot 0's CPU
    config = write_config(tmp_path / "mcpherd.toml", restart={"max_restarts": 2, "window_s": 60})
    herd = start_herd(spawn, tmp_path, 2, "--app", app, "--config", str(config), env=env, settle=False)
    herd.wait_log(r"slot 0 \(cpu \d+\): worker \d+ died .*3 restarts in 60s exceeds 2: backing off 1s")
    herd.wait_log(r"slot 0 \(cpu \d+\): worker \d+ died .*4 restarts in 60s exceeds 2: backing off 2s", timeout=10)
    herd.wait_log(r"slot 0 \(cpu \d+\): worker \d+ died .*5 restarts in 60s exceeds 2: backing off 4s", timeout=10)
    assert len(died_lines(herd.log(), 0)) == 5, herd.log()  # 3 quick deaths, then one after each back-off
    assert [w.slot for w in herd.workers().values()] == [1]
    for n in range(20):  # meanwhile (slot 0 backs off, steered around) every request is answered by slot 1
        assert echo(herd.url, f"healthy-{n}") == f"healthy-{n}"
    assert died_lines(herd.log(), 1) == [] and herd.process.proc.poll() is None


@pytest.mark.timeout(45)
def test_a_blocked_event_loop_is_aborted_with_a_traceback_and_replaced(spawn: Callable[..., Process],
                                                                       tmp_path: Path) -> None:
    app, env = app_module(tmp_path, "blocking_app", GOOD_APP)
    herd = start_herd(spawn, tmp_path, 1, "--app", app, "--timeout", "2", env=env)
    (stuck,) = herd.workers()
    outcome: list[str] = []

    def call_block() -> None:
        try:
            with RawHttp(herd.url, timeout=20.0) as http:
                reply = modern_call(http, "tools/call", {"name": "block", "arguments": {"seconds": 15}})
                outcome.append(tool_text(reply))
        except OSError as exc:
            outcome.append(type(exc).__name__)
    caller = threading.Thread(target=call_block)
    caller.start()
    herd.wait_log(rf"worker {stuck} \(slot 0\) event loop stalled for [\d.]+s: SIGABRT", timeout=10)
    caller.join(10)
    assert outcome in (["ConnectionResetError"], ["ConnectionError"])  # it was in flight on that worker
    log = herd.wait_log(rf"worker {stuck} died \(event loop stalled for [\d.]+s\); restarting")[0].string
    traceback = log[log.index("Fatal Python error: Aborted"):]
    assert re.search(r'File ".*blocking_app\.py", line \d+ in block', traceback), log
    (replacement,) = herd.wait_settled(1, 1)
    assert replacement != stuck and not alive(stuck)
    assert echo(herd.url, "alive again") == "alive again"


@pytest.mark.timeout(45)
def test_max_requests_recycles_each_worker_after_exactly_that_many(spawn: Callable[..., Process],
                                                                   tmp_path: Path) -> None:
    herd = start_herd(spawn, tmp_path, 1, "--max-requests", "5")
    served_by = []
    for round_ in range(3):
        (pid,) = herd.wait_settled(1, 1)
        served_by.append(pid)
        for n in range(5):
            assert echo(herd.url, f"{round_}-{n}") == f"{round_}-{n}"
        herd.wait_log(rf"slot 0: worker {pid} recycled after 5 requests")
        herd.wait_log(rf"worker {pid} \(slot 0, gen 1\) exited after recycled after 5 requests: exit code 0")
    assert len(set(served_by)) == 3
    assert herd.log().count("recycled after") == 6 and "died" not in herd.log()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("contents", "flags", "message"), [
    ('workers = "many"\n', [], "invalid configuration: workers: Invalid enum value 'many'"),
    ("[restart]\nmax_restarts = -1\n", [], "restart: max_restarts must be >= 0"),
    ("tmeout = 3\n", [], "unknown key `tmeout`"),
    ("timeout = [\n", [], "is not valid TOML"),
    ("", ["--workers", "0"], "workers must be between 1 and 1024"),
    ("", ["--bind", "localhost"], "bind address must look like HOST:PORT"),
])
def test_a_bad_configuration_is_refused_at_start_naming_the_key(tmp_path: Path, contents: str, flags: list[str],
                                                                message: str) -> None:
    config = tmp_path / "mcpherd.toml"
    config.write_text(contents)
    args = serve_args(free_port(), tmp_path, "--config", str(config), *flags)
    done = subprocess.run(args, capture_output=True, text=True, timeout=20, start_new_session=True, check=False)
    assert done.returncode == 2, done
    assert done.stderr.startswith("mcpherd: ") and message in done.stderr, done.stderr


@pytest.mark.timeout(45)
def test_sighup_with_a_broken_file_keeps_the_running_configuration(spawn: Callable[..., Process],
                                                                   tmp_path: Path) -> None:
    config = write_config(tmp_path / "mcpherd.toml", max_requests=0)
    herd = start_herd(spawn, tmp_path, 2, "--config", str(config))
    workers = herd.workers()
    config.write_text("max_requests = 4\nmax_requets = 3\n")
    herd.signal(signal.SIGHUP)
    herd.wait_log(r"reload refused, keeping the running configuration: .*unknown key `max_requets`")
    for n in range(12):  # max_requests = 0 still rules: nothing is recycled
        assert echo(herd.url, f"kept-{n}") == f"kept-{n}"
    assert herd.settled(2, 1) == workers and "recycled" not in herd.log()
    write_config(config, max_requests=4)
    herd.signal(signal.SIGHUP)
    new = herd.wait_settled(2, 2)
    assert not set(new) & set(workers)
    for n in range(12):  # the repaired file applies: a new worker recycles after (at least) 4 requests
        assert echo(herd.url, f"new-{n}") == f"new-{n}"
    recycled = herd.wait_log(r"worker \d+ recycled after (\d+) requests")
    assert int(recycled[0].group(1)) >= 4


SLOW_START = '''
import os, time
if os.path.exists(os.environ["SLOW_START_FLAG"]):
    time.sleep(60)
''' + GOOD_APP


@pytest.mark.timeout(60)
def test_kill_9_during_a_reload_restarts_workers_and_the_reload_completes(spawn: Callable[..., Process],
                                                                          tmp_path: Path) -> None:
    app, env = app_module(tmp_path, "slow_start_app", SLOW_START)
    flag = tmp_path / "slow"
    herd = start_herd(spawn, tmp_path, 1, "--app", app, env={**env, "SLOW_START_FLAG": str(flag)})
    (current,) = herd.workers()
    flag.touch()  # generation 2 now takes a minute to import: it is still starting while we kill
    herd.signal(signal.SIGHUP)
    successor = wait_until(lambda: next((pid for pid, w in herd.workers().items() if w.generation == 2), 0), 10.0,
                           message="the generation 2 worker")
    os.kill(current, signal.SIGKILL)
    herd.wait_log(rf"slot 0 \(cpu \d+\): worker {current} died \(killed by SIGKILL\); restarting")
    waiting = QueuedRequests(herd.port, 10, "no-worker")  # slot 0 has no worker ready: they wait in its queue
    flag.unlink()
    os.kill(successor, signal.SIGKILL)  # an outside kill says nothing about the new code
    herd.wait_log(rf"slot 0: replacement worker {successor} was killed by SIGKILL before serving; starting another")
    herd.wait_settled(1, 2)
    assert waiting.results() == waiting.texts
    assert "reload failed" not in herd.log() and herd.title() == (2, 1)


@pytest.mark.timeout(45)
def test_sighup_with_an_app_that_fails_to_import_keeps_the_old_generation(spawn: Callable[..., Process],
                                                                          tmp_path: Path) -> None:
    app, env = app_module(tmp_path, "reloaded_app", GOOD_APP)
    herd = start_herd(spawn, tmp_path, 2, "--app", app, env=env)
    workers = herd.workers()
    (tmp_path / "reloaded_app.py").write_text(GOOD_APP + "\nthis is not python\n")
    herd.signal(signal.SIGHUP)
    herd.wait_log(r"reload failed, generation 1 keeps serving: generation 2 did not start: "
                  r"the application failed to load")
    wait_until(lambda: herd.settled(2, 1) == workers, 10.0, message="the old generation alone")
    for n in range(10):
        assert echo(herd.url, f"old-{n}") == f"old-{n}"
    (tmp_path / "reloaded_app.py").write_text(GOOD_APP)
    herd.signal(signal.SIGHUP)
    new = herd.wait_settled(2, 2)
    assert not set(new) & set(workers)
    assert echo(herd.url, "repaired") == "repaired"
