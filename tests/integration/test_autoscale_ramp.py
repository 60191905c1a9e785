"""The autoscaler on a live cluster: a load ramp from idle to saturation and back, `--autoscale off`, and
`mcpherd scale` while autoscaling.

This machine has 2 CPUs, so the cluster scales between 1 and 2 workers, with windows of a few seconds
(the [autoscale] table of a TOML file) so that a whole ramp takes well under a minute. The load is the
demo's CPU-bound `hash_work` tool, each call on a new connection (so that new workers get their share at
once), from a bounded number of client threads, bounded in requests and in time. Every answer is checked:
the supervisor promises that scaling never drops a request.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import MODERN_VERSION, Cluster, metric_value, run_cli, wait_until

ROUNDS = 3000  # about 2 ms of one CPU per call
CLIENTS = 8
MAX_REQUESTS = 200_000
POLICY = """
[autoscale]
enabled = true
min_workers = 1
max_workers = 2
scale_up_at = 0.6
scale_down_at = 0.2
up_after_s = 2
down_after_s = 3
cooldown_s = 4
"""


@dataclass
class Load:
    """`level` client threads calling hash_work back to back, each call on a fresh connection."""

    port: int
    deadline: float
    level: int = 0
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    stopped: bool = False

    def __post_init__(self) -> None:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "hash_work", "arguments": {"data": "ramp", "rounds": ROUNDS},
            "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                      "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
        self.request = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                        f"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: {MODERN_VERSION}\r\n"
                        f"Mcp-Method: tools/call\r\nMcp-Name: hash_work\r\nConnection: close\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def _client(self, index: int) -> None:
        while not self.stopped and time.monotonic() < self.deadline and self.answered < MAX_REQUESTS:
            if index >= self.level:
                time.sleep(0.01)
                continue
            self.call()

    def call(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(self.request)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            self.failures.append(repr(exc))
            return
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b'"isError":true' in body or b'"result"' not in body:
            self.failures.append((head + body)[:200].decode(errors="replace"))
        else:
            self.answered += 1

    def stop(self) -> None:
        self.stopped = True
        for thread in self.threads:
            thread.join(15)


@pytest.fixture
def policy_file(tmp_path: Path) -> str:
    path = tmp_path / "autoscale.toml"
    path.write_text(POLICY)
    return str(path)


@pytest.fixture
def autoscaled(clusters: Callable[..., Cluster], policy_file: str) -> Cluster:
    return clusters(1, "--config", policy_file)


def decisions(cluster: Cluster) -> list[str]:
    """The directions of the autoscaler's decisions, in order, from the master's log."""
    return re.findall(r"autoscale (up|down) to \d+ workers: ", cluster.process.output())


def port_of(cluster: Cluster) -> int:
    return int(cluster.url.split(":")[2].split("/")[0])


def target(cluster: Cluster) -> int:
    return int(cluster.status()["master"]["workers_target"])


def hold(load: Load, level: int, seconds: float) -> None:
    load.level = level
    time.sleep(seconds)


@pytest.mark.timeout(150)
def test_a_load_ramp_scales_up_then_down_with_one_reversal_and_no_failed_request(autoscaled: Cluster) -> None:
    cluster = autoscaled
    load = Load(port_of(cluster), time.monotonic() + 110)
    try:
        hold(load, 0, 3)
        assert target(cluster) == 1 and decisions(cluster) == []  # idle: nothing to do
        for level in (1, 2, 4):
            hold(load, level, 2)
        load.level = CLIENTS
        wait_until(lambda: target(cluster) == 2, 30, 0.2, "a scale-up under saturation")
        cluster.workers = 2
        cluster.wait_serving()
        hold(load, CLIENTS, 8)  # saturated at the ceiling, longer than cooldown_s + down_after_s: no change
        assert target(cluster) == 2 and decisions(cluster) == ["up"], decisions(cluster)
        for level in (4, 2, 1):
            hold(load, level, 2)
        load.level = 0
        wait_until(lambda: target(cluster) == 1, 30, 0.2, "a scale-down once idle")
        hold(load, 0, 6)  # idle at the floor: stays
    finally:
        load.stop()
    assert decisions(cluster) == ["up", "down"], cluster.process.output()
    assert load.failures == [] and load.answered > 500, (load.answered, load.failures[:5])

    document = cluster.status()
    scaler = document["master"]["autoscale"]
    assert scaler["enabled"] is True and (scaler["min"], scaler["max"]) == (1, 2)
    assert scaler["last_decision"]["direction"] == "down" and "mean busy" in scaler["last_decision"]["reason"]
    assert abs(scaler["last_decision"]["at"] - time.time()) < 60
    assert [w["slot"] for w in document["workers"] if w["state"] == "ready"] == [0]
    scrape = cluster.scrape()
    assert metric_value(scrape, 'mcpherd_scale_events_total{direction="up"}') == 1, scrape
    assert metric_value(scrape, 'mcpherd_scale_events_total{direction="down"}') == 1, scrape


@pytest.mark.timeout(90)
def test_with_autoscale_off_the_worker_count_stays_fixed_under_saturation(clusters: Callable[..., Cluster],
                                                                          policy_file: str) -> None:
    cluster = clusters(1, "--config", policy_file, "--autoscale", "off")  # the flag wins over the file
    load = Load(port_of(cluster), time.monotonic() + 30)
    busy = []
    try:
        load.level = CLIENTS
        for _ in range(16):
            time.sleep(0.5)
            busy.append(max(w["busy_ratio"] for w in cluster.status()["workers"]))
    finally:
        load.stop()
    assert max(busy) > 0.6, busy  # saturated by the autoscaler's measure: with autoscale on, it would scale
    document = cluster.status()
    assert document["master"]["workers_target"] == 1 and len(document["workers"]) == 1
    scaler = document["master"]["autoscale"]
    assert scaler["enabled"] is False and scaler["last_decision"] is None
    assert decisions(cluster) == [] and load.failures == []


@pytest.mark.timeout(90)
def test_mcpherd_scale_while_autoscaling_is_the_floor_for_one_cooldown(autoscaled: Cluster) -> None:
    cluster = autoscaled
    scaled = run_cli("scale", "2", "--admin-socket", cluster.admin_socket)
    assert scaled.code == 0 and scaled.out == "workers target: 2\n", scaled
    started = time.monotonic()
    cluster.workers = 2
    cluster.wait_serving()
    # Idle: without the floor the autoscaler would undo this after down_after_s (3 s).
    while time.monotonic() - started < 3.5:
        assert target(cluster) == 2
        time.sleep(0.2)
    wait_until(lambda: target(cluster) == 1, 20, 0.1, "the floor to lapse and the idle cluster to shrink")
    assert time.monotonic() - started >= 4.0 - 0.2  # cooldown_s
    assert decisions(cluster) == ["down"]


@pytest.mark.timeout(90)
def test_max_workers_above_the_cpu_count_is_honoured_and_every_counted_decision_changes_the_count(
        clusters: Callable[..., Cluster], tmp_path: Path) -> None:
    three = tmp_path / "three.toml"
    three.write_text(POLICY.replace("max_workers = 2", "max_workers = 3"))  # this machine has 2 CPUs
    cluster = clusters(1, "--config", str(three))
    load = Load(port_of(cluster), time.monotonic() + 45)
    try:
        load.level = CLIENTS
        wait_until(lambda: target(cluster) >= 2, 30, 0.2, "a scale-up under saturation")
        time.sleep(12)  # three cooldowns more at saturation
    finally:
        load.stop()
    document = cluster.status()
    ups = [int(n) for n in re.findall(r"autoscale up to (\d+) workers", cluster.process.output())]
    assert "down" not in decisions(cluster) and ups == list(range(2, document["master"]["workers_target"] + 1)), ups
    assert document["master"]["autoscale"]["max"] == 3
    assert document["master"]["autoscale"]["scale_events"] == {"up": len(ups), "down": 0}
    assert metric_value(cluster.scrape(), 'mcpherd_scale_events_total{direction="up"}') == len(ups)
    assert load.failures == [], load.failures[:5]
