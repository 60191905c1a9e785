"""Helpers shared by the cluster benchmarks (scaling.py, propagation.py, metrics_overhead.py).

A cluster is `python -m mcpherd serve --workers N --autoscale off` in its own session
(start_new_session), output to a log file, with an admin socket and (unless told otherwise) a
/metrics port of its own, so that it never meets another master on this machine; it is ready when
the admin socket's `status` counts N ready workers and an echo is answered, and it is stopped with
killpg (TERM, then KILL) by worker_bench.stop. Ports are free loopback ports; every wait has a
deadline. The generic pieces (free ports, stopping, one POST, the wrk script writer) come from
worker_bench.py; what is specific to a multi-worker cluster lives here: readiness of every worker,
where wrk may run beside the workers (taskset), wrk with several threads, the cluster's CPU time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import psutil
from worker_bench import HOST, PATH, Wire, free_port, modern_wire, post, rpc, stop

from mcpherd.ctl import AdminClient, ServerError, Unreachable
from mcpherd.supervisor.topology import allowed_cpus, cpu_for_slot, placement, read_topology

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MODERN = "2026-07-28"
READY_TIMEOUT_S = 30.0


class ClusterFailed(RuntimeError):
    """The cluster exited or never became ready; `log` is its output, for the reader to judge."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log

    def rejected_flag(self, flag: str) -> bool:
        """True if the CLI (argparse) or the configuration refused `flag`: it does not exist yet."""
        key = flag.lstrip("-").replace("-", "_")
        return ("unrecognized arguments" in self.log and flag in self.log) or \
            ("unknown key" in self.log and key in self.log)

    def last_lines(self, count: int = 5) -> str:
        return "\n".join(self.log.strip().splitlines()[-count:])


Metrics = Literal["on", "off", "unset"]  # on: --metrics-bind on a free port; unset: no --metrics-bind at all


@dataclass(slots=True)
class Cluster:
    process: subprocess.Popen[bytes]
    port: int
    workers: int
    log_path: Path
    admin_socket: Path
    metrics_url: str | None  # where /metrics should answer; None: metrics off or not asked for

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def serve_argv(port: int, workers: int, admin_socket: Path, metrics_bind: str | None) -> list[str]:
    """A fixed worker count (no autoscaling) and an admin socket of its own, so that clusters of other
    engineers or other benchmarks (one per user by default) never collide with this one."""
    argv = [sys.executable, "-m", "mcpherd", "serve", "--bind", f"{HOST}:{port}", "--workers", str(workers),
            "--autoscale", "off", "--admin-socket", str(admin_socket), "--log-level", "warning"]
    return argv + (["--metrics-bind", metrics_bind] if metrics_bind is not None else [])


def start_cluster(workers: int, log_path: Path, metrics: Metrics = "on") -> Cluster:
    """Not pinned: the master reads its own affinity to place one worker per allowed CPU."""
    port = free_port()
    metrics_port = free_port() if metrics == "on" else 0
    bind = {"on": f"{HOST}:{metrics_port}", "off": "off", "unset": None}[metrics]
    url = f"http://{HOST}:{metrics_port}/metrics" if metrics == "on" else None
    admin_socket = log_path.with_suffix(".sock")  # AF_UNIX: keep log_path short (a tempfile.mkdtemp() dir)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(serve_argv(port, workers, admin_socket, bind), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Cluster(process, port, workers, log_path, admin_socket, url)


def ready_workers(cluster: Cluster) -> int:
    """Workers in state "ready", as the master's admin socket reports them (0 while it cannot answer)."""
    try:
        client = AdminClient(str(cluster.admin_socket), timeout=2.0)
    except Unreachable:
        return 0
    try:
        status = client.call("status")
    except (Unreachable, ServerError):
        return 0
    finally:
        client.close()
    return sum(1 for worker in status.get("workers", []) if worker.get("state") == "ready")


def wait_ready(cluster: Cluster, timeout: float = READY_TIMEOUT_S) -> None:
    """Every worker ready, then one echo answered."""
    deadline = time.monotonic() + timeout
    while ready_workers(cluster) < cluster.workers:
        if cluster.process.poll() is not None:
            raise ClusterFailed(f"mcpherd serve exited with {cluster.process.returncode} before serving",
                                cluster.log_text())
        if time.monotonic() > deadline:
            raise ClusterFailed(f"{cluster.workers} workers not ready within {timeout:g}s", cluster.log_text())
        time.sleep(0.05)
    call_tool(cluster.port, modern_wire())


def launch(workers: int, log_path: Path, metrics: Metrics = "on") -> Cluster:
    """A ready cluster; the caller stops it (worker_bench.stop). Nothing is left running on failure."""
    cluster = start_cluster(workers, log_path, metrics)
    try:
        wait_ready(cluster)
    except BaseException:
        stop(cluster.process)
        raise
    return cluster


@contextmanager
def running_cluster(workers: int, log_path: Path, metrics: Metrics = "on") -> Iterator[Cluster]:
    cluster = launch(workers, log_path, metrics)
    try:
        yield cluster
    finally:
        stop(cluster.process)


# -- requests ----------------------------------------------------------------------------------------
def tool_wire(tool: str, arguments: dict[str, Any], request_id: int = 1) -> Wire:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool}
    return Wire(headers, rpc(request_id, "tools/call", {"name": tool, "arguments": arguments, "_meta": meta}))


def tool_failure(status: int, body: bytes) -> str | None:
    """Why a tools/call answer is not a successful result; None if it is one."""
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        document = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    result = document.get("result") if isinstance(document, dict) else None
    if not isinstance(result, dict) or result.get("isError"):
        return f"not a successful result: {body[:200]!r}"
    return None


def call_tool(port: int, wire: Wire) -> bytes:
    status, _, body = post(port, wire.headers, wire.body)
    failure = tool_failure(status, body)
    if failure is not None:
        raise RuntimeError(f"tools/call on port {port} failed: {failure}")
    return body


def fetch(url: str, timeout: float = 2.0) -> str | None:
    """GET url; None if nothing answered 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback only)
            return response.read().decode() if response.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


def wait_fetch(url: str, timeout: float = 10.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = fetch(url)
        if text is not None:
            return text
        time.sleep(0.1)
    return None


# -- placement and wrk -------------------------------------------------------------------------------
def worker_cpus(count: int) -> list[int]:
    """The CPUs the master pins `count` workers to: the same pure placement it computes."""
    order = placement(read_topology(), allowed_cpus())
    return [cpu_for_slot(order, slot) for slot in range(count)]


@dataclass(frozen=True, slots=True)
class Placement:
    cpus: tuple[int, ...]  # wrk runs under taskset -c on these
    dedicated: bool  # no worker is pinned to any of them

    def describe(self, threads: int) -> str:
        cpus = ",".join(map(str, self.cpus))
        share = "dedicated" if self.dedicated else "SHARED with the workers"
        return f"wrk -t{threads} taskset -c {cpus} ({share})"


def wrk_placement(workers: int) -> Placement:
    """The CPUs no worker uses if there are any; else all of them, shared (wrk competes)."""
    allowed = allowed_cpus()
    spare = sorted(allowed - set(worker_cpus(workers)))
    return Placement(tuple(spare), True) if spare else Placement(tuple(sorted(allowed)), False)


def default_wrk_threads() -> int:
    return max(1, len(allowed_cpus()) // 4)


@dataclass(slots=True)
class WrkRun:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu_us_per_request: float  # master + workers, user + system
    errors: dict[str, int] = field(default_factory=dict)


def cluster_cpu_seconds(pid: int) -> float:
    """User + system CPU of the master and its live children."""
    total = 0.0
    try:
        master = psutil.Process(pid)
        for process in (master, *master.children(recursive=True)):
            times = process.cpu_times()
            total += times.user + times.system
    except psutil.Error:
        pass
    return total


def run_wrk(cluster: Cluster, script: Path, out: Path, seconds: int, connections: int, threads: int,
            where: Placement) -> WrkRun:
    """`script` was written by write_script to report into `out`."""
    out.unlink(missing_ok=True)
    argv = ["taskset", "-c", ",".join(map(str, where.cpus)), "wrk", f"-t{threads}", f"-c{connections}",
            f"-d{seconds}s", "--latency", "-s", str(script), f"http://{HOST}:{cluster.port}{PATH}"]
    cpu_before = cluster_cpu_seconds(cluster.process.pid)
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, start_new_session=True)
    cpu = cluster_cpu_seconds(cluster.process.pid) - cpu_before
    if run.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({run.returncode}): {run.stderr.strip() or run.stdout[-500:]}")
    raw: dict[str, Any] = json.loads(out.read_text())
    requests = max(int(raw["requests"]), 1)
    return WrkRun(rps=requests / (raw["duration_us"] / 1e6), p50_ms=raw["p50_us"] / 1000,
                  p99_ms=raw["p99_us"] / 1000, requests=requests, cpu_us_per_request=cpu * 1e6 / requests,
                  errors={k: int(v) for k, v in raw["errors"].items() if v})


def median_runs(runs: Sequence[WrkRun]) -> dict[str, float]:
    keys = ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")
    return {key: statistics.median(getattr(run, key) for run in runs) for key in keys}


# -- reporting ---------------------------------------------------------------------------------------
def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    banner = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    commit = subprocess.run(["git", "-C", str(BENCH), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, timeout=10).stdout.strip()
    packages = {name: _version(name) for name in ("uvloop", "httptools", "msgspec", "prometheus-client")}
    return {"cpu_model": model, "nproc": os.cpu_count(), "allowed_cpus": sorted(allowed_cpus()),
            "kernel": platform.release(), "python": platform.python_version(), "packages": packages,
            "wrk": " ".join(banner[:2]), "commit": commit, "loadavg_at_start": list(os.getloadavg())}


def print_machine(info: dict[str, Any]) -> None:
    load = ", ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    print(f"\n{info['cpu_model']}, CPUs allowed {info['allowed_cpus']}, Python {info['python']}, "
          f"{info['wrk']}, commit {info['commit']}, load average at start {load}")


def results_path(prefix: str, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_results(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
