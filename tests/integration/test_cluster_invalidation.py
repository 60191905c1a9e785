"""Cache invalidation in a 4-worker cluster: when the call that invalidated returns, no worker serves
the stale entry any more.

Each worker has its own L1 cache, so the demo app's `weather` tool (cached 30 s, tag "weather") is
first cached on every worker through one held connection per worker; each forecast carries the time
it was computed, so a stale answer is told from a fresh one exactly. Per-worker state is read from
the admin status (`events_applied`: the last cluster event a worker applied).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import Any

import pytest

from conftest import (
    Cluster,
    RawHttp,
    connect_to_workers,
    mcpherd_args,
    modern_call,
    whoami,
)

OSLO_KEY = 'weather:{"city":"Oslo"}'


def forecast(http: RawHttp, city: str) -> dict[str, Any]:
    reply = modern_call(http, "tools/call", {"name": "weather", "arguments": {"city": city}})
    assert reply.status == 200, reply
    structured = reply.json()["result"]["structuredContent"]
    assert structured["city"] == city, structured
    return dict(structured)


def cache_everywhere(held: dict[int, RawHttp], *cities: str) -> dict[tuple[int, str], float]:
    """Compute then cache each city's forecast on every worker; when each was computed."""
    computed = {}
    for pid, http in held.items():
        for city in cities:
            first = forecast(http, city)
            assert forecast(http, city) == first, f"worker {pid} did not cache {city}"
            computed[pid, city] = first["computed_at"]
    return computed


def applied(cluster: Cluster) -> dict[int, int]:
    return {w["pid"]: w["events_applied"] for w in cluster.serving()}


def refresh(http: RawHttp, city: str = "") -> None:
    arguments = {"city": city} if city else {}
    reply = modern_call(http, "tools/call", {"name": "refresh_weather", "arguments": arguments})
    assert reply.status == 200, reply
    assert reply.json()["result"]["content"][0]["text"] == f"forecasts invalidated: {city or 'all'}"


def invalidate_command(cluster: Cluster, *selector: str) -> tuple[int, str]:
    """`mcpherd invalidate ...` as an operator runs it: (exit code, output)."""
    done = subprocess.run(mcpherd_args("invalidate", *selector, "--admin-socket", cluster.admin_socket),
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.timeout(90)
def test_when_a_tool_call_invalidates_no_worker_serves_the_stale_entry_once_it_returns(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, set(pids))
    cached = cache_everywhere(held, "Oslo", "Bergen")
    before = applied(cluster)
    assert len(set(before.values())) == 1, before

    refresh(held[pids[0]], "Oslo")  # one key, from one worker
    returned_at = time.time()
    # Read at once, without waiting: the call returned only after every worker applied the event.
    assert applied(cluster) == {pid: before[pid] + 1 for pid in pids}
    for pid in [*pids[1:], pids[0]]:
        fresh = forecast(held[pid], "Oslo")
        assert returned_at <= fresh["computed_at"] != cached[pid, "Oslo"], f"worker {pid} served it stale"
        assert forecast(held[pid], "Bergen")["computed_at"] == cached[pid, "Bergen"], "other keys stay cached"

    recached = cache_everywhere(held, "Oslo", "Bergen")
    refresh(held[pids[1]])  # the whole tag, from another worker
    returned_at = time.time()
    assert applied(cluster) == {pid: before[pid] + 2 for pid in pids}
    for pid in pids:
        for city in ("Oslo", "Bergen"):
            fresh = forecast(held[pid], city)
            assert returned_at <= fresh["computed_at"] != recached[pid, city], (pid, city)
    assert {pid: whoami(http) for pid, http in held.items()} == {pid: pid for pid in pids}
    for http in held.values():
        http.close()


@pytest.mark.timeout(90)
def test_the_invalidate_command_returns_once_every_worker_dropped_the_entries(cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, set(pids))
    for selector, dropped in ((["--key", OSLO_KEY], {"Oslo"}), (["--prefix", "weather:"], {"Oslo", "Bergen"}),
                              (["--tag", "weather"], {"Oslo", "Bergen"}), (["--all"], {"Oslo", "Bergen"})):
        cached = cache_everywhere(held, "Oslo", "Bergen")
        code, output = invalidate_command(cluster, *selector)
        match = re.fullmatch(r"invalidated \(event (\d+)\): every worker acknowledged\n", output)
        assert code == 0 and match is not None, output
        assert set(applied(cluster).values()) == {int(match.group(1))}, "every worker applied that event"
        for pid in pids:
            for city in ("Oslo", "Bergen"):
                stale = forecast(held[pid], city)["computed_at"] == cached[pid, city]
                assert stale is (city not in dropped), (selector, pid, city)
    for http in held.values():
        http.close()


@pytest.mark.timeout(90)
def test_a_worker_that_died_does_not_hold_up_an_invalidation_and_its_successor_starts_current(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, set(pids))
    cached = cache_everywhere(held, "Oslo")
    os.kill(pids[0], signal.SIGKILL)
    started = time.monotonic()
    code, output = invalidate_command(cluster, "--tag", "weather")
    assert code == 0 and "every worker acknowledged" in output, output
    assert time.monotonic() - started < 5.0, "waited for the dead worker's acknowledgement"
    live = cluster.wait_serving(without={pids[0]})
    seq = int(re.findall(r"event (\d+)", output)[0])
    assert all(events >= seq for events in applied(cluster).values()), applied(cluster)
    for pid in pids[1:]:
        assert forecast(held[pid], "Oslo")["computed_at"] != cached[pid, "Oslo"], pid
    (successor,) = live - set(pids)
    fresh = connect_to_workers(cluster.url, {successor})
    assert forecast(fresh[successor], "Oslo")["computed_at"] not in cached.values()
    for http in [*held.values(), *fresh.values()]:
        http.close()


@pytest.mark.timeout(90)
def test_a_stalled_worker_makes_the_invalidation_report_it_and_applies_it_before_serving_again(
        cluster: Cluster) -> None:
    pids = sorted(cluster.worker_pids())
    held = connect_to_workers(cluster.url, set(pids))
    cached = cache_everywhere(held, "Oslo")
    os.kill(pids[0], signal.SIGSTOP)  # its loop stops turning: no acknowledgement can come
    try:
        started = time.monotonic()
        code, output = invalidate_command(cluster, "--tag", "weather")
        waited = time.monotonic() - started
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert code == 1, output
    assert re.fullmatch(r"invalidated \(event \d+\): NOT every worker acknowledged\n", output), output
    assert 4.5 < waited < 15.0, f"the master gives up on a silent worker after its ack timeout ({waited:.1f}s)"
    for pid in pids:  # the resumed worker applies the queued event before it answers anything
        assert forecast(held[pid], "Oslo")["computed_at"] != cached[pid, "Oslo"], pid
    assert cluster.worker_pids() == set(pids), "a 5 s stall is below --timeout: nobody was replaced"
    for http in held.values():
        http.close()
