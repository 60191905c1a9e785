"""Every `mcpherd` command against a live two-worker cluster, as an operator runs it (a child process).

What each test asserts is what the operator sees: the exit code (0 done, 1 the master said no, 2 usage,
3 nothing reachable), one sentence on stderr when something is wrong, and state that matches what the
test did: the requests it sent, the connections it holds, the generation it asked for.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conftest import (Cluster, Process, RawHttp, assert_one_sentence, connect_to_workers, initialize, mcpherd_args,
                      modern_call, modern_headers, modern_meta, open_stream, rpc_body, run_cli, stream_headers,
                      wait_until)

MASTER_KEYS = {"pid", "version", "generation", "started_at", "uptime_s", "bind", "workers_target", "autoscale",
               "listen"}
WORKER_KEYS = {"slot", "pid", "cpu", "generation", "state", "started_at", "rss_bytes", "cpu_percent",
               "requests_total", "requests_per_s", "inflight", "connections", "streams", "p50_ms", "p99_ms",
               "restarts", "last_restart_reason", "heartbeat_age_s", "loop_lag_ms", "events_applied"}
TOTAL_KEYS = {"requests_total", "requests_per_s", "errors_total", "cache_hit_ratio"}


def cli(cluster: Cluster, *args: str) -> Any:
    return run_cli(*args, "--admin-socket", cluster.admin_socket)


def call_tool(http: RawHttp, name: str, **arguments: Any) -> dict[str, Any]:
    reply = modern_call(http, "tools/call", {"name": name, "arguments": arguments})
    assert reply.status == 200, reply
    return dict(reply.json())


def slow_call(seconds: float) -> tuple[dict[str, str], bytes]:
    """Headers and body of a 2026-07-28 call to slow_io, for a request sent without waiting for it."""
    params = {"name": "slow_io", "arguments": {"seconds": seconds}, "_meta": modern_meta()}
    return modern_headers("tools/call", "slow_io"), rpc_body("tools/call", params)


def by_pid(document: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {w["pid"]: w for w in document["workers"] if w["pid"] is not None}


@pytest.fixture
def pair(clusters: Callable[..., Cluster]) -> Cluster:
    return clusters(2)


# -- status ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_status_prints_a_table_within_100_columns_and_json_with_the_stable_keys(pair: Cluster) -> None:
    table = cli(pair, "status")
    assert table.code == 0 and table.err == "", table
    lines = table.out.rstrip("\n").splitlines()
    assert all(len(line) <= 100 for line in lines), lines
    assert f"master {pair.process.pid}" in lines[0] and lines[-1].startswith("total:")
    pids = sorted(pair.worker_pids())
    assert [int(row.split()[1]) for row in lines[2:-1]] == pids and all(" ready " in row for row in lines[2:-1])

    document = msgspec.json.decode(cli(pair, "status", "--json").out)
    assert MASTER_KEYS <= document["master"].keys() and TOTAL_KEYS <= document["totals"].keys()
    assert {"enabled", "min", "max", "last_decision"} <= document["master"]["autoscale"].keys()
    assert {"overflows", "drops"} <= document["master"]["listen"].keys()
    assert all(WORKER_KEYS <= w.keys() for w in document["workers"]), document["workers"]
    assert document["master"]["bind"] == [pair.url.split("/")[2]] and document["master"]["workers_target"] == 2


@pytest.mark.timeout(90)
def test_status_numbers_agree_with_what_the_test_sent(pair: Cluster) -> None:
    held = connect_to_workers(pair.url, pair.worker_pids())
    (a, http_a), (b, http_b) = sorted(held.items())
    before = pair.status()
    for i in range(30):
        assert call_tool(http_a, "echo", text=str(i))["result"]["content"][0]["text"] == str(i)
    for i in range(12):
        call_tool(http_b, "echo", text=str(i))
    for _ in range(3):
        unknown = modern_call(http_b, "tools/call", {"name": "no_such_tool", "arguments": {}})
        assert unknown.status == 400 and unknown.json()["error"]["code"] == -32602, unknown
    forecasts = {call_tool(http_a, "weather", city="Oslo")["result"]["structuredContent"]["computed_at"]
                 for _ in range(4)}
    assert len(forecasts) == 1  # one miss, then three hits from the same worker's cache
    extra = [RawHttp(pair.url) for _ in range(3)]

    def settled() -> dict[str, Any] | None:
        document = pair.status()
        gauges = sum(w["connections"] for w in document["workers"])
        return document if gauges == 2 + len(extra) else None

    after = wait_until(settled, 5.0, 0.1, "the connection gauges to count the held connections")
    was, now = by_pid(before), by_pid(after)
    assert now[a]["requests_total"] - was[a]["requests_total"] == 30 + 4
    assert now[b]["requests_total"] - was[b]["requests_total"] == 12 + 3
    assert after["totals"]["requests_total"] - before["totals"]["requests_total"] == 49
    assert after["totals"]["errors_total"] - before["totals"]["errors_total"] == 3
    assert after["totals"]["cache_hit_ratio"] == 0.75
    for pid in (a, b):
        worker = now[pid]
        assert worker["inflight"] == 0 and worker["streams"] == 0 and worker["state"] == "ready"
        assert 0 < worker["p50_ms"] <= worker["p99_ms"] and worker["heartbeat_age_s"] < 1.5
        assert worker["rss_bytes"] > 10 * 2**20 and worker["restarts"] == 0

    slow = threading.Thread(target=call_tool, args=(http_a, "slow_io"), kwargs={"seconds": 1.5})
    slow.start()
    wait_until(lambda: by_pid(pair.status())[a]["inflight"] == 1, 1.4, 0.05, "one request in flight")
    slow.join()
    assert by_pid(pair.status())[a]["inflight"] == 0

    sent, started = 0, time.monotonic()
    rates: list[float] = []
    while time.monotonic() - started < 3.0:  # ~40 requests a second on one worker, for 3 seconds
        call_tool(http_b, "echo", text="x")
        sent += 1
        if sent % 10 == 0:
            rates.append(by_pid(pair.status())[b]["requests_per_s"])
        time.sleep(0.025)
    actual = sent / (time.monotonic() - started)
    assert 0.5 * actual <= max(rates) <= 1.5 * actual, (actual, rates)
    for http in [http_a, http_b, *extra]:
        http.close()


# -- reload ------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_reload_waits_for_the_new_generation_showing_progress(pair: Cluster) -> None:
    old = pair.worker_pids()
    result = cli(pair, "reload")
    assert result.code == 0 and result.err == "", result
    lines = result.out.splitlines()
    assert lines[0] == "reloading: generation 1 -> 2", lines
    progress = [int(m[1]) for m in (re.fullmatch(r"generation 2: (\d)/2 workers serving", x) for x in lines[1:]) if m]
    assert len(progress) == len(lines) - 1 and progress == sorted(progress) and progress[-1] == 2, lines
    serving = pair.serving(generation=2)
    assert len(serving) == 2 and not {w["pid"] for w in serving} & old

    quick = cli(pair, "reload", "--no-wait")
    assert quick.code == 0 and quick.out == "reloading: generation 2 -> 3\n", quick
    pair.wait_serving(generation=3)


@pytest.mark.timeout(90)
def test_a_failed_reload_exits_1_with_the_reason_and_the_old_generation_keeps_serving(
        clusters: Callable[..., Cluster], tmp_path: Path) -> None:
    config = str(tmp_path / "mcpherd.toml")
    with open(config, "w") as file:
        file.write('app = "mcpherd.demo:app"\n')
    cluster = clusters(2, "--config", config)
    old = cluster.worker_pids()

    with open(config, "w") as file:
        file.write("app = [not toml\n")
    refused = cli(cluster, "reload")
    assert refused.code == 1 and "not valid TOML" in refused.err, refused
    assert_one_sentence(refused.err)

    with open(config, "w") as file:
        file.write('app = "mcpherd_no_such_module:app"\n')
    failed = cli(cluster, "reload")
    assert failed.code == 1 and "reload failed" in failed.err and "failed to load" in failed.err, failed
    assert failed.err.strip().splitlines()[-1].startswith("mcpherd: reload failed") and "Traceback" not in failed.err
    document = cluster.status()
    assert document["master"]["generation"] == 1 and "failed to load" in document["master"]["reload_failed"]
    assert cluster.worker_pids() == old

    with open(config, "w") as file:
        file.write('app = "mcpherd.demo:app"\n')
    assert cli(cluster, "reload").code == 0
    assert cluster.status()["master"]["reload_failed"] is None and not cluster.worker_pids() & old


# -- scale -------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_scale_absolute_and_relative_and_scale_down_spares_the_worker_holding_a_stream(pair: Cluster) -> None:
    slots = {w["slot"]: w["pid"] for w in pair.serving()}
    # A tie would retire the highest slot: hold a stream on slot 1 so that slot 0 must go instead.
    http = connect_to_workers(pair.url, {slots[1]})[slots[1]]
    events = open_stream(http, "GET", stream_headers(initialize(http)))
    next(events)  # the priming event: the stream is open
    wait_until(lambda: by_pid(pair.status())[slots[1]]["streams"] == 1, 5.0, 0.1, "the stream gauge")

    down = cli(pair, "scale", "-1")
    assert down.code == 0 and down.out == "workers target: 1\n", down
    pair.workers = 1
    assert pair.wait_serving() == {slots[1]}
    wait_until(lambda: [w["slot"] for w in pair.status()["workers"]] == [1], 10.0, 0.1, "slot 0 retired")
    http.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        http.sock.recv(1)  # the stream on the worker that stayed is still open and quiet

    assert cli(pair, "scale", "+1").out == "workers target: 2\n"
    pair.workers = 2
    assert slots[1] in pair.wait_serving()
    assert cli(pair, "scale", "2").code == 0 and pair.status()["master"]["workers_target"] == 2
    for bad in ("3", "0", "-5"):
        result = cli(pair, "scale", bad)
        assert result.code == 1 and "between 1 and 2" in result.err, (bad, result)
        assert_one_sentence(result.err)
    usage = cli(pair, "scale", "many")
    assert usage.code == 2 and usage.out == "", usage
    assert pair.status()["master"]["workers_target"] == 2
    http.close()


# -- invalidate --------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_invalidate_replies_after_every_worker_dropped_the_entries(pair: Cluster) -> None:
    held = connect_to_workers(pair.url, pair.worker_pids())

    def forecasts(city: str) -> dict[int, float]:
        return {pid: call_tool(http, "weather", city=city)["result"]["structuredContent"]["computed_at"]
                for pid, http in held.items()}

    def applied() -> dict[int, int]:
        return {w["pid"]: w["events_applied"] for w in pair.serving()}

    for selector, invalidated, kept in ((("--tag", "weather"), ["Paris", "Rome"], []),
                                        (("--key", 'weather:{"city":"Paris"}'), ["Paris"], ["Rome"]),
                                        (("--prefix", "weather:"), ["Paris", "Rome"], []),
                                        (("--all",), ["Paris", "Rome"], [])):
        cached = {city: forecasts(city) for city in ("Paris", "Rome")}
        assert all(forecasts(city) == cached[city] for city in cached)  # warm on both workers
        events_before = applied()
        result = cli(pair, "invalidate", *selector)
        assert result.code == 0 and "every worker acknowledged" in result.out, (selector, result)
        # The reply came after both acknowledged: no worker may answer from the old entry now.
        for city in invalidated:
            fresh = forecasts(city)
            assert all(fresh[pid] > cached[city][pid] for pid in held), (selector, city)
        for city in kept:
            assert forecasts(city) == cached[city], (selector, city)
        assert all(applied()[pid] == events_before[pid] + 1 for pid in held), selector
    for http in held.values():
        http.close()


# -- config, stop, top, the unreachable case ---------------------------------------------------------
@pytest.mark.timeout(60)
def test_config_prints_the_effective_configuration(pair: Cluster) -> None:
    result = cli(pair, "config")
    assert result.code == 0, result
    config = msgspec.json.decode(result.out)
    assert config["workers"] == 2 and config["admin_socket"] == pair.admin_socket
    assert config["bind"] == [pair.url.split("/")[2]] and config["autoscale"]["enabled"] is False


@pytest.mark.timeout(60)
def test_stop_is_graceful_the_request_in_flight_is_answered(pair: Cluster) -> None:
    http = RawHttp(pair.url)
    replies: list[dict[str, Any]] = []
    slow = threading.Thread(target=lambda: replies.append(call_tool(http, "slow_io", seconds=1.5)))
    slow.start()
    wait_until(lambda: sum(w["inflight"] for w in pair.status()["workers"]) == 1, 5.0, 0.05, "the slow call")
    result = cli(pair, "stop")
    assert result.code == 0 and result.out == "stopping\n", result
    slow.join(10)
    assert replies and replies[0]["result"]["content"][0]["text"] == "waited 1.5s", replies
    assert pair.process.proc.wait(15) == 0
    assert not os.path.exists(pair.admin_socket)
    gone = cli(pair, "status")
    assert gone.code == 3, gone
    assert_one_sentence(gone.err)


@pytest.mark.timeout(60)
def test_stop_now_does_not_wait_for_the_request_in_flight(pair: Cluster) -> None:
    http = RawHttp(pair.url)
    http.send(http.build("POST", *slow_call(30.0)))
    wait_until(lambda: sum(w["inflight"] for w in pair.status()["workers"]) == 1, 5.0, 0.05, "the slow call")
    started = time.monotonic()
    result = cli(pair, "stop", "--now")
    assert result.code == 0 and result.out == "stopping\n", result
    assert pair.process.proc.wait(10) == 0 and time.monotonic() - started < 5.0
    assert http.closed_by_peer(5.0) and not os.path.exists(pair.admin_socket)


@pytest.mark.timeout(60)
def test_top_refreshes_every_second_until_ctrl_c(pair: Cluster, spawn: Callable[..., Process]) -> None:
    top = spawn(mcpherd_args("top", "--admin-socket", pair.admin_socket), name="top")
    wait_until(lambda: top.output().count("\x1b[2J") >= 3, 10.0, 0.1, "three refreshes")
    os.kill(top.pid, signal.SIGINT)
    assert top.proc.wait(10) == 0
    assert "Traceback" not in top.output() and f"master {pair.process.pid}" in top.output()


@pytest.mark.timeout(30)
def test_no_master_is_exit_3_and_usage_errors_are_exit_2() -> None:
    for command in (("status",), ("top",), ("reload",), ("scale", "2"), ("invalidate", "--all"), ("stop",),
                    ("config",)):
        result = run_cli(*command, "--admin-socket", "/nonexistent/mcpherd/admin.sock")
        assert result.code == 3 and result.out == "" and "no mcpherd master is reachable" in result.err, result
        assert_one_sentence(result.err)
    for usage in (("invalidate",), ("scale",), ("scale", "lots"), ("status", "--bogus"), ("bogus",)):
        result = run_cli(*usage, "--admin-socket", "/nonexistent/mcpherd/admin.sock")
        assert result.code == 2 and result.out == "" and "Traceback" not in result.err, (usage, result)
