"""Load benchmark of one mcpherd worker against the official SDK server and a bare ceiling.

    python bench/worker_bench.py [--seconds 8 --repeats 3 --max-repeats 6 --connections 64 --warmup 2]

`tools/call` on `echo` over keep-alive connections, for protocol 2026-07-28 (stateless) and for a
2025-11-25 session, against single-process servers started side by side in this run:
- `bare`: bench/bare_server.py, a JSON-RPC echo on uvloop + httptools + msgspec (the ceiling);
- `floor`: bench/floor_server.py, the least work a 2026-07-28 server does for this request on the
  same stack (every check the spec asks, nothing else): how close to the ceiling MCP can get at all;
- `mcpherd`: `python -m mcpherd serve --workers 1`, the demo app (one worker; its master idles);
- `sdk`: bench/sdk_server.py, the official `mcp` SDK's MCPServer, stateless JSON, under uvicorn.

Every server is pinned to one CPU and wrk (`-t1`) to another, so the server under load never shares
its CPU with the load generator. Runs interleave (each repeat visits every scenario and server in
turn) so that machine noise spreads evenly. A repeat during which anything else used the two CPUs
(`other_load`) does not count as quiet; repeats go on until `--repeats` quiet ones (at most
`--max-repeats`), and the table shows their medians. Results, every run included, with the machine
they came from, go to bench/results/worker-<timestamp>.json.

Each server runs in its own session and is stopped with killpg (TERM, then KILL); ports are free
loopback ports; every wait has a deadline. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PATH = "/mcp"
ECHO_TEXT = "hello, mcpherd"
MODERN, HANDSHAKE = "2026-07-28", "2025-11-25"
SERVERS = ("bare", "floor", "mcpherd", "sdk")
# The floor (floor_server.py) answers only the stateless 2026-07-28 request: it keeps no sessions.
SCENARIO_SERVERS = {MODERN: SERVERS, HANDSHAKE: ("bare", "mcpherd", "sdk")}
BASE_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
TARGET_BARE_RATIO = 0.70  # issue 2: mcpherd req/s >= 70% of the bare ceiling's
TARGET_P99_RATIO = 0.10  # issue 2: mcpherd p99 <= 1/10 of the SDK server's
BUSY_MACHINE = 0.20  # median `other_load` above this: something else ran on our CPUs


@dataclass(slots=True)
class Wire:
    """One HTTP request, exactly as wrk will repeat it."""

    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Sample:
    scenario: str
    server: str
    repeat: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    server_busy: float  # the server's CPU time / wall time: 1.0 is its CPU saturated
    other_load: float  # CPU time on the two pinned CPUs charged to neither server nor wrk, / wall time
    errors: dict[str, int] = field(default_factory=dict)
    quiet: bool = False  # every run of its repeat had other_load <= BUSY_MACHINE


# -- processes ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def server_argv(name: str, port: int, workdir: Path) -> list[str]:
    if name == "mcpherd":
        # One worker, fixed (no autoscaling); the admin socket and /metrics (left on, as deployed) are
        # its own, so that it never meets another mcpherd master running on this machine.
        return [sys.executable, "-m", "mcpherd", "serve", "--bind", f"{HOST}:{port}", "--workers", "1",
                "--autoscale", "off", "--admin-socket", str(workdir / "admin.sock"),
                "--metrics-bind", f"{HOST}:{free_port()}", "--log-level", "warning"]
    return [sys.executable, str(BENCH / f"{name}_server.py"), "--host", HOST, "--port", str(port)]


def start(argv: list[str], cpu: int, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(["taskset", "-c", str(cpu), *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(name: str, port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until the server answers an echo (a listening socket alone may not have a worker behind it yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready")
        try:
            check_echo(name, port, modern_wire())
            return
        except (OSError, http.client.HTTPException, RuntimeError, ValueError):
            time.sleep(0.1)
    raise TimeoutError(f"{name} on port {port} did not answer within {timeout}s")


# -- requests ----------------------------------------------------------------------------------------
def post(port: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("POST", PATH, body, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def rpc(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
                      separators=(",", ":")).encode()


def modern_wire() -> Wire:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    headers = {**BASE_HEADERS, "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
    return Wire(headers, rpc(1, "tools/call", {"name": "echo", "arguments": {"text": ECHO_TEXT}, "_meta": meta}))


def open_session(port: int) -> str:
    """The 2025-11-25 handshake: initialize (no version header), then notifications/initialized."""
    params = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
    status, headers, body = post(port, BASE_HEADERS, rpc(0, "initialize", params))
    session = headers.get("mcp-session-id")
    if status != 200 or not session:
        raise RuntimeError(f"initialize failed on port {port}: {status} {body[:200]!r}")
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    headers_after = {**BASE_HEADERS, "Mcp-Session-Id": session, "MCP-Protocol-Version": HANDSHAKE}
    status, _, body = post(port, headers_after, note)
    if status != 202:
        raise RuntimeError(f"notifications/initialized failed on port {port}: {status} {body[:200]!r}")
    return session


def handshake_wire(session: str | None) -> Wire:
    """A session's tools/call; the SDK's stateless mode takes it without a session (session=None)."""
    headers = {**BASE_HEADERS, "MCP-Protocol-Version": HANDSHAKE}
    if session is not None:
        headers["Mcp-Session-Id"] = session
    return Wire(headers, rpc(1, "tools/call", {"name": "echo", "arguments": {"text": ECHO_TEXT}}))


def check_echo(server: str, port: int, wire: Wire) -> None:
    status, _, body = post(port, wire.headers, wire.body)
    content = json.loads(body).get("result", {}).get("content", []) if status == 200 else []
    if not content or content[0].get("text") != ECHO_TEXT:
        raise RuntimeError(f"{server} did not echo: {status} {body[:300]!r}")


# -- wrk ---------------------------------------------------------------------------------------------
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  local f = io.open(%s, "w")
  f:write(string.format('{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, '
    .. '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
  f:close()
end
"""


def lua_string(value: str) -> str:
    if not value.isascii() or "]==]" in value:
        raise ValueError("wrk scripts carry ASCII values only")
    return f"[==[{value}]==]"


def write_script(path: Path, wire: Wire, out: Path) -> None:
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(wire.body.decode())}"]
    lines += [f"wrk.headers[ {lua_string(k)} ] = {lua_string(v)}" for k, v in wire.headers.items()]
    path.write_text("\n".join(lines) + _DONE % lua_string(str(out)))


def cpu_seconds(pid: int) -> float:
    """CPU time of a server: the process and its children (mcpherd's master and its one worker)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def run_wrk(port: int, script: Path, out: Path, seconds: float, connections: int, cpu: int,
            server_pid: int, server_cpu: int) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "-s", str(script), f"http://{HOST}:{port}{PATH}"]
    cpus = (server_cpu, cpu)
    before = cpu_seconds(server_pid), children_cpu_seconds(), busy_seconds(cpus), time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, start_new_session=True)
    if run.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({run.returncode}): {run.stderr.strip() or run.stdout[-500:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    server, wrk, busy, wall = (a - b for a, b in zip(
        (cpu_seconds(server_pid), children_cpu_seconds(), busy_seconds(cpus), time.monotonic()), before))
    result["server_cpu_s"] = server
    result["server_busy"] = server / wall
    result["other_load"] = max(busy - server - wrk, 0.0) / wall
    return result


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children: wrk, once subprocess.run has reaped it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_seconds(cpus: tuple[int, ...]) -> float:
    """Non-idle time of these CPUs, hypervisor steal included (time we could not have)."""
    per_cpu = psutil.cpu_times(percpu=True)
    return sum(sum(per_cpu[c]) - per_cpu[c].idle - getattr(per_cpu[c], "iowait", 0.0) for c in set(cpus))


def sample(scenario: str, server: str, repeat: int, raw: dict[str, Any]) -> Sample:
    requests = max(int(raw["requests"]), 1)
    return Sample(scenario, server, repeat, rps=requests / (raw["duration_us"] / 1e6),
                  p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
                  cpu_us_per_request=raw["server_cpu_s"] * 1e6 / requests,
                  server_busy=raw["server_busy"], other_load=raw["other_load"],
                  errors={k: int(v) for k, v in raw["errors"].items() if v})


# -- reporting ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {name: metadata.version(name) for name in ("mcp", "uvicorn", "uvloop", "httptools", "msgspec")}
    banner = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    wrk = " ".join(banner[:2])  # "wrk debian/4.1.0-3+b2", without the copyright line
    commit = subprocess.run(["git", "-C", str(BENCH), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, timeout=10).stdout.strip()
    return {"cpu_model": model, "nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "packages": versions, "wrk": wrk, "commit": commit}


def medians(samples: list[Sample]) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, servers in SCENARIO_SERVERS.items():
        for server in servers:
            mine = [s for s in samples if s.scenario == scenario and s.server == server]
            table.setdefault(scenario, {})[server] = {
                key: statistics.median(getattr(s, key) for s in mine)
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request", "server_busy", "other_load")}
    return table


def ratios(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for scenario, row in table.items():
        bare, ours, sdk = row["bare"], row["mcpherd"], row["sdk"]
        of_bare = ours["rps"] / bare["rps"]
        p99 = ours["p99_ms"] / sdk["p99_ms"]
        out[scenario] = {"mcpherd_over_bare": of_bare, "mcpherd_over_sdk": ours["rps"] / sdk["rps"],
                         "p99_mcpherd_over_sdk": p99,
                         "meets_target": of_bare >= TARGET_BARE_RATIO and p99 <= TARGET_P99_RATIO}
        if "floor" in row:
            out[scenario]["floor_over_bare"] = row["floor"]["rps"] / bare["rps"]
            out[scenario]["mcpherd_over_floor"] = ours["rps"] / row["floor"]["rps"]
    return out


def print_table(table: dict[str, dict[str, dict[str, float]]], ratio: dict[str, dict[str, Any]],
                info: dict[str, Any], config: dict[str, Any]) -> None:
    print(f"\n{info['cpu_model']}, nproc {info['nproc']}, Python {info['python']}, {info['wrk']}")
    print(f"medians of {config['used_repeats']} x {config['seconds']:g} s; servers on CPU {config['server_cpu']}, "
          f"wrk -t1 -c{config['connections']} on CPU {config['wrk_cpu']}\n")
    print(f"{'protocol':<12}{'server':<9}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}"
          f"{'server CPU':>12}{'other load':>12}")
    for scenario, row in table.items():
        for server, m in row.items():
            print(f"{scenario:<12}{server:<9}{m['rps']:>10,.0f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}"
                  f"{m['cpu_us_per_request']:>12.1f}{m['server_busy']:>12.0%}{m['other_load']:>12.0%}")
    print(f"\n{'protocol':<12}{'mcpherd/bare':>14}{'mcpherd/sdk':>13}{'p99 mcpherd/sdk':>17}{'floor/bare':>12}"
          f"{'mcpherd/floor':>15}  target")
    for scenario, r in ratio.items():
        floor = (f"{r['floor_over_bare']:>12.0%}{r['mcpherd_over_floor']:>15.0%}" if "floor_over_bare" in r
                 else f"{'-':>12}{'-':>15}")
        print(f"{scenario:<12}{r['mcpherd_over_bare']:>13.0%} {r['mcpherd_over_sdk']:>11.1f}x"
              f"{r['p99_mcpherd_over_sdk']:>17.3f}{floor}  {'met' if r['meets_target'] else 'NOT met'}")
    print(f"(target: mcpherd/bare >= {TARGET_BARE_RATIO:.0%} and p99 mcpherd/sdk <= {TARGET_P99_RATIO})")


# -- the run -----------------------------------------------------------------------------------------
def prepare(ports: dict[str, int]) -> dict[str, dict[str, Wire]]:
    """Per scenario, per server: the request wrk repeats, checked once to echo correctly."""
    session = open_session(ports["mcpherd"])
    wires = {MODERN: {s: modern_wire() for s in SCENARIO_SERVERS[MODERN]},
             HANDSHAKE: {"bare": handshake_wire(session), "mcpherd": handshake_wire(session),
                         "sdk": handshake_wire(None)}}
    for scenario in wires.values():
        for server, wire in scenario.items():
            check_echo(server, ports[server], wire)
    return wires


def measure(args: argparse.Namespace, workdir: Path) -> list[Sample]:
    ports = {name: free_port() for name in SERVERS}
    processes = {name: start(server_argv(name, ports[name], workdir), args.server_cpu, workdir / f"{name}.log")
                 for name in SERVERS}
    try:
        for name, process in processes.items():
            wait_ready(name, ports[name], process)
        wires = prepare(ports)
        out = workdir / "wrk.json"
        scripts: dict[tuple[str, str], Path] = {}
        for scenario, per_server in wires.items():
            for server, wire in per_server.items():
                scripts[scenario, server] = workdir / f"{scenario}-{server}.lua"
                write_script(scripts[scenario, server], wire, out)
        def one(scenario: str, server: str, seconds: float) -> dict[str, Any]:
            return run_wrk(ports[server], scripts[scenario, server], out, seconds, args.connections,
                           args.wrk_cpu, processes[server].pid, args.server_cpu)
        for scenario, server in scripts:
            one(scenario, server, args.warmup)
        return repeats(args, lambda scenario, server: one(scenario, server, args.seconds), list(scripts))
    finally:
        for process in processes.values():
            stop(process)


def repeats(args: argparse.Namespace, one: Callable[[str, str], dict[str, Any]],
            pairs: list[tuple[str, str]]) -> list[Sample]:
    """Repeats, each visiting every pair, until `args.repeats` of them were quiet (or `--max-repeats`)."""
    samples: list[Sample] = []
    quiet = 0
    for repeat in range(max(args.max_repeats, args.repeats)):
        if quiet >= args.repeats:
            break
        this = [sample(scenario, server, repeat, one(scenario, server)) for scenario, server in pairs]
        is_quiet = all(s.other_load <= BUSY_MACHINE for s in this)
        for s in this:
            s.quiet = is_quiet
        quiet += is_quiet
        samples += this
        print(f"  repeat {repeat + 1}: {'quiet' if is_quiet else 'busy machine'}; "
              + ", ".join(f"{s.server} {s.rps:,.0f}" for s in this), file=sys.stderr)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description="mcpherd worker vs the official SDK vs a bare ceiling")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one measured run")
    parser.add_argument("--repeats", type=int, default=3, help="quiet repeats wanted (each runs every pair)")
    parser.add_argument("--max-repeats", type=int, default=6, help="give up on quiet after this many repeats")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured run first, per server and protocol")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--wrk-cpu", type=int, default=1)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that the servers are stopped
    config = {k: v for k, v in vars(args).items() if k != "results"}
    info = machine()
    with tempfile.TemporaryDirectory(prefix="mcpherd-bench-") as tmp:
        samples = measure(args, Path(tmp))
    quiet = [s for s in samples if s.quiet]
    table = medians(quiet or samples)
    per_repeat = sum(map(len, SCENARIO_SERVERS.values()))
    config["used_repeats"] = len(quiet or samples) // per_repeat
    ratio = ratios(table)
    print_table(table, ratio, info, config)
    for s in samples:
        if s.errors:
            print(f"warning: {s.server} {s.scenario} repeat {s.repeat + 1} had errors {s.errors}", file=sys.stderr)
    if len(quiet) < args.repeats * per_repeat:
        print(f"warning: only {len(quiet) // per_repeat} quiet repeats of {args.repeats}: the machine was "
              f"busy with other work; {'medians of the quiet ones' if quiet else 'these figures are not worth quoting'}",
              file=sys.stderr)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"worker-{time.strftime('%Y%m%d-%H%M%S')}.json"
    document = {"machine": info, "config": config, "medians": table, "ratios": ratio,
                "samples": [asdict(s) for s in samples]}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
