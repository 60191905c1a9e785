"""Cross-host propagation through Redis: how soon what host A raises is in force on every worker of host B.

    python bench/redis_propagation.py [--workers 2] [--rounds 200] [--max-seconds 60]

Starts a redis-server (no persistence, a free loopback port) and two clusters, A and B, of `--workers`
workers each, on different ports, sharing it. Each round measures three things:

(a) invalidation, client-observed (the issue's measure): every worker of B caches a forecast (the demo's
    `weather`, ttl 30 s) over a keep-alive connection held per worker; `refresh_weather(city)` is called
    on A; then B's workers are polled until each serves a recomputed forecast. Reported: from the
    moment refresh_weather returned on A until the first and until the last worker of B served the new
    value. Polling visits the workers in turn, so these are upper bounds by up to one request per
    worker of B; negative values are possible in principle (B applying it before A's call returns).
(b) a notification, pushed: a 2025-11-25 session's GET stream is held on B and A is asked for
    `test_trigger_resource_update`; from the call's start until the notification arrives on B (no
    polling: the A -> Redis -> B path itself, plus A's own handling of the call).
(c) worker-measured, last hop only: B's histogram mcpherd_event_propagation_seconds over the run (scrapes
    before and after). Its clock starts when the event reaches B's master (the ring entry's timestamp
    is written there), so it covers B's master -> B's workers, not A or Redis.

Clients, clusters and Redis share this machine's CPUs unpinned. Results go to
bench/results/redis-propagation-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    Cluster,
    machine_info,
    print_machine,
    results_path,
    serve_argv,
    wait_ready,
    write_results,
)
from propagation import parse_histogram, summary_ms
from worker_bench import BASE_HEADERS, HOST, PATH, free_port, stop

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
WATCHED = "test://watched-resource"
POLL_DEADLINE_S = 10.0


# -- processes -----------------------------------------------------------------------------------------
def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (tests/run.sh installs it)")
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return process, f"redis://{HOST}:{port}/0"
        except OSError:
            time.sleep(0.05)
    stop(process)
    sys.exit("redis-server did not start")


def launch_host(name: str, workers: int, redis_url: str, workdir: Path) -> Cluster:
    """common.launch with --redis: ready once every worker is and an echo is answered."""
    port, metrics_port = free_port(), free_port()
    log_path, admin_socket = workdir / f"{name}.log", workdir / f"{name}.sock"
    argv = serve_argv(port, workers, admin_socket, f"{HOST}:{metrics_port}") + ["--redis", redis_url]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    cluster = Cluster(process, port, workers, log_path, admin_socket, f"http://{HOST}:{metrics_port}/metrics")
    try:
        wait_ready(cluster)
        deadline = time.monotonic() + 20
        while "mcpherd_redis_up 1.0" not in scrape(cluster):  # subscribed: events reach it from now on
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {name} never subscribed to Redis:\n{cluster.log_text()[-2000:]}")
            time.sleep(0.05)
    except BaseException:
        stop(process)
        raise
    return cluster


# -- requests ------------------------------------------------------------------------------------------
def call(connection: http.client.HTTPConnection, tool: str, arguments: dict[str, Any],
         session: str | None = None) -> dict[str, Any]:
    if session is None:
        headers = {**BASE_HEADERS, "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool}
        params: dict[str, Any] = {"name": tool, "arguments": arguments, "_meta": META}
    else:
        headers = {**BASE_HEADERS, "MCP-Protocol-Version": HANDSHAKE, "Mcp-Session-Id": session}
        params = {"name": tool, "arguments": arguments}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})
    connection.request("POST", PATH, body, headers)
    response = connection.getresponse()
    text = response.read().decode()
    if response.status != 200:
        raise RuntimeError(f"{tool}: HTTP {response.status} {text[:200]}")
    if response.getheader("content-type", "").startswith("text/event-stream"):
        text = [line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:].strip()][-1]
    message = json.loads(text)
    if "error" in message or message["result"].get("isError"):
        raise RuntimeError(f"{tool} failed: {text[:200]}")
    return dict(message["result"])


def forecast(connection: http.client.HTTPConnection, city: str) -> float:
    return float(call(connection, "weather", {"city": city})["structuredContent"]["computed_at"])


def per_worker(port: int, workers: int) -> dict[int, http.client.HTTPConnection]:
    """One keep-alive connection per worker of the cluster (the kernel spreads new connections)."""
    held: dict[int, http.client.HTTPConnection] = {}
    deadline = time.monotonic() + 30
    while len(held) < workers and time.monotonic() < deadline:
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        pid = int(call(connection, "whoami", {})["structuredContent"]["result"])
        if pid in held:
            connection.close()
        else:
            held[pid] = connection
    if len(held) < workers:
        sys.exit(f"could not reach all {workers} workers on port {port}")
    return held


def open_session_stream(a_port: int, b_port: int) -> tuple[str, http.client.HTTPResponse]:
    """A 2025-11-25 session made on A, subscribed on A, its GET stream held on B."""
    connection = http.client.HTTPConnection(HOST, a_port, timeout=10)
    init = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
    connection.request("POST", PATH, json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}),
                       BASE_HEADERS)
    response = connection.getresponse()
    response.read()
    session = response.getheader("mcp-session-id") or ""
    headers = {**BASE_HEADERS, "MCP-Protocol-Version": HANDSHAKE, "Mcp-Session-Id": session}
    for method, params, request_id in (("notifications/initialized", None, None),
                                       ("resources/subscribe", {"uri": WATCHED}, 2)):
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message |= {"params": params, "id": request_id}
        connection.request("POST", PATH, json.dumps(message), headers)
        connection.getresponse().read()
    connection.close()
    stream = http.client.HTTPConnection(HOST, b_port, timeout=10)
    stream.request("GET", PATH, headers={"Accept": "text/event-stream", "MCP-Protocol-Version": HANDSHAKE,
                                         "Mcp-Session-Id": session})
    return session, stream.getresponse()


def next_notification(stream: http.client.HTTPResponse) -> None:
    while True:
        line = stream.readline().decode()
        if not line:
            raise RuntimeError("the GET stream on B ended")
        if line.startswith("data:") and "notifications/resources/updated" in line:
            return


# -- the measurements ----------------------------------------------------------------------------------
def invalidation_round(on_a: http.client.HTTPConnection, on_b: dict[int, http.client.HTTPConnection],
                       city: str) -> tuple[float, float]:
    """(first, last) worker of B serving a recomputed forecast, seconds after refresh_weather returned on A."""
    cached = {pid: forecast(connection, city) for pid, connection in on_b.items()}
    call(on_a, "refresh_weather", {"city": city})
    returned = time.perf_counter()
    seen: dict[int, float] = {}
    while len(seen) < len(on_b):
        if time.perf_counter() - returned > POLL_DEADLINE_S:
            raise RuntimeError(f"workers {sorted(set(on_b) - set(seen))} of B kept a stale forecast")
        for pid, connection in on_b.items():
            if pid not in seen and forecast(connection, city) != cached[pid]:
                seen[pid] = time.perf_counter() - returned
    return min(seen.values()), max(seen.values())


def notification_round(on_a: http.client.HTTPConnection, session: str, stream: http.client.HTTPResponse) -> float:
    started = time.perf_counter()
    call(on_a, "test_trigger_resource_update", {"uri": WATCHED}, session)
    next_notification(stream)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, a: Cluster, b: Cluster) -> dict[str, Any]:
    on_a = http.client.HTTPConnection(HOST, a.port, timeout=10)
    on_b = per_worker(b.port, b.workers)
    session, stream = open_session_stream(a.port, b.port)
    before = parse_histogram(scrape(b))
    first_ms: list[float] = []
    last_ms: list[float] = []
    pushed_ms: list[float] = []
    deadline = time.monotonic() + args.max_seconds
    for n in range(args.rounds):
        if time.monotonic() > deadline:
            break
        first, last = invalidation_round(on_a, on_b, f"bench-{n}")
        first_ms.append(first * 1e3)
        last_ms.append(last * 1e3)
        pushed_ms.append(notification_round(on_a, session, stream) * 1e3)
    after = parse_histogram(scrape(b))
    hop = after.since(before) if after is not None else None
    return {"rounds": len(last_ms), "invalidation_first_worker_ms": summary_ms(first_ms),
            "invalidation_every_worker_ms": summary_ms(last_ms), "notification_ms": summary_ms(pushed_ms),
            "b_last_hop": None if hop is None else {
                "observations": hop.count, "p50_ms": _ms(hop.quantile(0.5)), "p99_ms": _ms(hop.quantile(0.99))}}


def scrape(cluster: Cluster) -> str:
    import urllib.request

    assert cluster.metrics_url is not None
    with urllib.request.urlopen(cluster.metrics_url, timeout=5) as response:
        return str(response.read().decode())


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def report(result: dict[str, Any], workers: int) -> None:
    print(f"\ncross-host propagation, A -> Redis -> B, {workers} workers per host, {result['rounds']} rounds")
    rows = [("invalidation: first worker of B serves new value (after A returned)", "invalidation_first_worker_ms"),
            ("invalidation: every worker of B serves new value (after A returned)", "invalidation_every_worker_ms"),
            ("notification: A call start -> arrival on B's GET stream", "notification_ms")]
    for label, key in rows:
        figures = result[key]
        if figures:
            print(f"  {label:<72} p50 {figures['p50']:7.2f} ms   p99 {figures['p99']:7.2f} ms")
    hop = result["b_last_hop"]
    if hop and hop["observations"]:
        print(f"  {'last hop on B (master ring -> workers), worker-measured':<72} p50 {hop['p50_ms']:7.3f} ms   "
              f"p99 {hop['p99_ms']:7.3f} ms   ({hop['observations']:.0f} observations)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="workers per host (default 2)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)
    workdir = Path(tempfile.mkdtemp(prefix="mcpherd-bench-"))
    redis, url = start_redis(workdir)
    hosts: list[Cluster] = []
    try:
        hosts = [launch_host(name, args.workers, url, workdir) for name in ("a", "b")]
        result = measure(args, *hosts)
    finally:
        for cluster in hosts:
            stop(cluster.process)
        stop(redis)
        shutil.rmtree(workdir, ignore_errors=True)
    report(result, args.workers)
    path = results_path("redis-propagation")
    write_results(path, {"machine": info, "workers_per_host": args.workers, **result})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
