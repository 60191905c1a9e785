"""What open dashboards cost the master: its CPU with 0 vs N viewers of `/events`, and its responsiveness.

    python bench/dashboard_cost.py [--viewers 50] [--workers 2] [--seconds 20 --repeats 3 --warmup 600]

One cluster (`mcpherd serve --workers W`, idle) runs for the whole run. Phases alternate between no
viewer and `--viewers` server-sent event clients on the dashboard's `/events` (ABBA order, so that
drift in the machine's load hits both alike). Each phase lasts `--seconds`; during it:

- the master's own CPU time (user + system, psutil on its pid, workers not included) over wall time,
  reported as % of one core;
- its loop's responsiveness: round trips of the admin socket's `status` (the RPC `mcpherd status`
  makes; the loop answers it between ticks) every 100 ms, p50/p99/max; and a few whole `mcpherd status`
  command runs (an interpreter start included);
- with viewers: the frames and bytes each one received (one frame a second is the design).

The master computes one snapshot per tick for every viewer, so its cost should be the sends alone.
A frame carries the history the master keeps (one point a second, up to ten minutes), so frames grow
with the master's uptime until that history is full (600 s): `--warmup` seconds pass before the first
phase (by default, until frames have their steady-state size), and the frame size measured is reported.
The master's CPU time is counted in clock ticks (10 ms): longer phases resolve smaller costs. The
viewers are drained by one thread of this process, on the same machine: its CPU is not the master's
and is not counted. Results go to bench/results/dashboard-cost-<timestamp>.json. A benchmark, not a
test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil
from common import RESULTS, Cluster, ClusterFailed, fetch, launch, machine_info, print_machine, results_path, \
    write_results
from worker_bench import HOST, stop

from mcpherd.ctl import AdminClient

PROBE_INTERVAL_S = 0.1
CLI_RUNS = 3


class Viewers:
    """`count` SSE clients of /events, drained by one thread; frames and bytes counted per viewer."""

    def __init__(self, port: int, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.frames = [0] * count
        self.bytes = [0] * count
        self.tails = [b""] * count
        self.stopping = threading.Event()
        for index in range(count):
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.sendall(f"GET /events HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, index)
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(0.1):
                self._read(key.fileobj, key.data)  # type: ignore[arg-type]

    def _read(self, sock: socket.socket, index: int) -> None:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(sock)
            sock.close()
            return
        self.bytes[index] += len(data)
        joined = self.tails[index] + data  # an event ends with a blank line, maybe split across reads
        self.frames[index] += joined.count(b"\n\n")
        self.tails[index] = joined[-1:]

    def wait_all_streaming(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while min(self.frames) < 1:
            if time.monotonic() > deadline:
                streaming = sum(1 for f in self.frames if f)
                raise RuntimeError(f"only {streaming} of {len(self.frames)} viewers got a first frame")
            time.sleep(0.05)

    def counts(self) -> tuple[list[int], list[int]]:
        return list(self.frames), list(self.bytes)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def master_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def status_round_trips(admin_socket: Path, seconds: float) -> list[float]:
    """Admin `status` round trips (ms), one every PROBE_INTERVAL_S, for `seconds`."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    client = AdminClient(str(admin_socket), timeout=10.0)
    try:
        while time.monotonic() < end:
            started = time.perf_counter()
            client.call("status")
            latencies.append((time.perf_counter() - started) * 1e3)
            time.sleep(PROBE_INTERVAL_S)
    finally:
        client.close()
    return latencies


def cli_round_trips(admin_socket: Path) -> list[float]:
    """Whole `mcpherd status` runs (ms): what an operator waits for, interpreter start included."""
    timings = []
    for _ in range(CLI_RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mcpherd", "status", "--admin-socket", str(admin_socket)],
                       capture_output=True, timeout=60, check=True, stdin=subprocess.DEVNULL)
        timings.append((time.perf_counter() - started) * 1e3)
    return timings


def summary_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max": ordered[-1], "count": len(ordered)}


def phase(cluster: Cluster, viewers: int, seconds: float) -> dict[str, Any]:
    metrics_port = urllib.parse.urlsplit(cluster.metrics_url).port or 0
    crowd = Viewers(metrics_port, viewers) if viewers else None
    try:
        if crowd is not None:
            crowd.wait_all_streaming()
            frames_before, bytes_before = crowd.counts()
        cpu_before, started = master_cpu_s(cluster.process.pid), time.monotonic()
        latencies = status_round_trips(cluster.admin_socket, seconds)
        elapsed = time.monotonic() - started
        cpu = master_cpu_s(cluster.process.pid) - cpu_before
        result: dict[str, Any] = {"viewers": viewers, "seconds": elapsed, "master_cpu_percent": cpu / elapsed * 100,
                                  "status_ms": summary_ms(latencies)}
        if crowd is not None:
            frames_after, bytes_after = crowd.counts()
            frames = [a - b for a, b in zip(frames_after, frames_before, strict=True)]
            sent = sum(bytes_after) - sum(bytes_before)
            result |= {"frames_per_viewer_per_s": {"min": min(frames) / elapsed, "max": max(frames) / elapsed},
                       "bytes_per_s_all_viewers": sent / elapsed}
        return result | {"cli_status_ms": summary_ms(cli_round_trips(cluster.admin_socket))}
    finally:
        if crowd is not None:
            crowd.close()


def measure(args: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cluster = launch(args.workers, workdir / "serve.log")
    try:
        time.sleep(args.warmup)
        phases = []
        for repeat in range(args.repeats):
            for viewers in (0, args.viewers) if repeat % 2 == 0 else (args.viewers, 0):
                phases.append(phase(cluster, viewers, args.seconds))
                print(f"  repeat {repeat + 1}/{args.repeats}, {viewers} viewers: master "
                      f"{phases[-1]['master_cpu_percent']:.2f}% of a core", file=sys.stderr)
        dashboard = cluster.metrics_url.removesuffix("metrics") if cluster.metrics_url else ""
        feed = fetch(dashboard + "feed.json") or ""
        history = len(json.loads(feed)["history"]) if feed else 0
        return phases, {"frame_bytes": len(feed), "history_points": history,
                        "master_rss_mb": psutil.Process(cluster.process.pid).memory_info().rss / 2**20}
    finally:
        stop(cluster.process)


def medians(phases: list[dict[str, Any]], viewers: int) -> dict[str, float]:
    mine = [p for p in phases if p["viewers"] == viewers]
    out = {"master_cpu_percent": statistics.median(p["master_cpu_percent"] for p in mine),
           "status_p50_ms": statistics.median(p["status_ms"]["p50"] for p in mine),
           "status_p99_ms": statistics.median(p["status_ms"]["p99"] for p in mine),
           "status_max_ms": max(p["status_ms"]["max"] for p in mine),
           "cli_status_p50_ms": statistics.median(p["cli_status_ms"]["p50"] for p in mine)}
    if viewers:
        out["frames_per_viewer_per_s_max"] = max(p["frames_per_viewer_per_s"]["max"] for p in mine)
        out["bytes_per_s_all_viewers"] = statistics.median(p["bytes_per_s_all_viewers"] for p in mine)
    return out


def print_report(table: dict[str, dict[str, float]], extra: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"idle cluster of {args.workers} workers, medians of {args.repeats} x {args.seconds:g} s per mode "
          f"(ABBA), after {args.warmup:g} s; frames of {extra['frame_bytes']:,} bytes "
          f"({extra['history_points']} history points)\n")
    print(f"{'viewers':>7}{'master CPU':>12}{'status p50':>12}{'status p99':>12}{'status max':>12}"
          f"{'CLI p50':>10}{'frames/s':>10}{'sent/s':>12}")
    for viewers, row in table.items():
        frames = f"{row['frames_per_viewer_per_s_max']:.2f}" if "frames_per_viewer_per_s_max" in row else "-"
        sent = f"{row['bytes_per_s_all_viewers'] / 1e6:.2f} MB" if "bytes_per_s_all_viewers" in row else "-"
        print(f"{viewers:>7}{row['master_cpu_percent']:>11.2f}%{row['status_p50_ms']:>10.2f}ms"
              f"{row['status_p99_ms']:>10.2f}ms{row['status_max_ms']:>10.2f}ms{row['cli_status_p50_ms']:>8.0f}ms"
              f"{frames:>10}{sent:>12}")
    print(f"\n{args.viewers} viewers cost the master {extra['viewer_cost_percent']:+.2f}% of a core "
          "(median CPU with viewers minus without)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one measured phase")
    parser.add_argument("--repeats", type=int, default=3, help="phases per mode (medians)")
    parser.add_argument("--warmup", type=float, default=600.0,
                        help="seconds the master runs before measuring (600: its history, so its frames, are full)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.viewers < 1 or args.workers < 1 or args.seconds <= 0 or args.repeats < 1 or args.warmup < 0:
        parser.error("--viewers, --workers, --seconds and --repeats must be positive, --warmup >= 0")
    return args


def main() -> int:
    args = parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="mcpherd-dash-") as tmp:
        try:
            phases, extra = measure(args, Path(tmp))
        except ClusterFailed as exc:
            print(f"mcpherd: {exc}\n{exc.last_lines()}", file=sys.stderr)
            return 1
    table = {str(v): medians(phases, v) for v in (0, args.viewers)}
    cost = table[str(args.viewers)]["master_cpu_percent"] - table["0"]["master_cpu_percent"]
    extra["viewer_cost_percent"] = round(cost, 3) + 0.0  # + 0.0: never print "-0.00"
    print_machine(info)
    print_report(table, extra, args)
    path = results_path("dashboard-cost", args.results)
    config = {k: v for k, v in vars(args).items() if k != "results"}
    write_results(path, {"machine": info, "config": config, "medians": table, **extra, "phases": phases})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
