"""Failed requests while the cluster is reloaded, has workers killed and is scaled, under steady load.

    python bench/chaos.py [--workers 3] [--events 10] [--pace 1.0] [--keepalive 16 --fresh 4]

One cluster (`mcpherd serve --workers W`, no autoscaling) serves tools/call echo (2026-07-28) to a
load client of `--keepalive` keep-alive connections and `--fresh` loops opening a new connection per
request, for the whole run. Meanwhile, every `--pace` seconds, one event of a shuffled schedule of
`--events` x SIGHUP (reload), `--events` x kill -9 of a random worker, and `--events` x a scale-down
(SIGTTOU) later followed by a scale-up (SIGTTIN). Every request is counted exactly once: answered
correctly, or failed with a kind (reset, eof, timeout, refused, bad-response).

A kill -9 necessarily fails the requests in flight on the connections the killed worker had accepted.
To tell those apart, the worker is first stopped (SIGSTOP, so it accepts nothing more), its accepted
connections are read from /proc, then it is killed: a failure whose connection was opened before that
snapshot and is in it is "on a killed worker's connection". Every other failure is unexplained, and
is reported with the event that preceded it most closely (within 2 s). The target: none.

Results go to bench/results/chaos-<timestamp>.json. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS, Cluster, ClusterFailed, launch, machine_info, print_machine, ready_workers, \
    results_path, tool_wire, write_results
from worker_bench import HOST, PATH, stop

NEAR_S = 2.0  # an unexplained failure is reported with the event at most this long before it
SETTLE_S = 30.0


@dataclass
class Failure:
    kind: str
    port: int  # client-side port of its connection; 0 if the connect itself failed
    connected_at: float
    failed_at: float
    detail: str


@dataclass
class Load:
    """Keep-alive and new-connection echo traffic; every request counted once."""

    port: int
    timeout: float
    sent: int = 0
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)

    def request_bytes(self, close: bool) -> bytes:
        wire = tool_wire("echo", {"text": "chaos"})
        headers = {**wire.headers, "Host": f"{HOST}:{self.port}", "Content-Length": str(len(wire.body))}
        if close:
            headers["Connection"] = "close"
        return (f"POST {PATH} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + "\r\n").encode() + wire.body

    async def exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close: bool) -> bool:
        writer.write(self.request_bytes(close))
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if int(status_line.split()[1]) != 200 or json.loads(body)["result"]["content"][0]["text"] != "chaos":
            raise ValueError(f"{status_line}: {body[:200]!r}")
        return headers.get("connection", "").lower() != "close" and not close

    async def one(self, held: tuple[asyncio.StreamReader, asyncio.StreamWriter, float, int] | None,
                  close: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float, int] | None:
        self.sent += 1
        started = time.monotonic()
        conn, keep = held, False
        try:
            if conn is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), self.timeout)
                conn = (reader, writer, started, writer.get_extra_info("sockname")[1])
            keep = await asyncio.wait_for(self.exchange(conn[0], conn[1], close), self.timeout)
            self.ok += 1
        except (OSError, ValueError, KeyError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                asyncio.LimitOverrunError) as exc:
            self.failures.append(Failure(kind_of(exc), conn[3] if conn else 0, conn[2] if conn else started,
                                         time.monotonic(), repr(exc)[:200]))
        if not keep and conn is not None:
            conn[1].close()
            return None
        return conn

    async def keepalive(self, done: asyncio.Event) -> None:
        conn = None
        while not done.is_set():
            conn = await self.one(conn, close=False)
        if conn is not None:
            conn[1].close()

    async def fresh(self, done: asyncio.Event) -> None:
        while not done.is_set():
            await self.one(None, close=True)


def kind_of(exc: BaseException) -> str:
    kinds = [(ValueError, "bad-response"), (KeyError, "bad-response"), (ConnectionResetError, "reset"),
             (asyncio.IncompleteReadError, "eof"), (asyncio.TimeoutError, "timeout"),
             (ConnectionRefusedError, "refused")]
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), type(exc).__name__)


# -- a worker's accepted connections, from /proc ------------------------------------------------------
def worker_pids(cluster: Cluster) -> list[int]:
    from mcpherd.ctl import AdminClient

    client = AdminClient(str(cluster.admin_socket), timeout=5.0)
    try:
        status = client.call("status")
    finally:
        client.close()
    return sorted(w["pid"] for w in status["workers"] if w["state"] == "ready" and w["pid"])


def client_ports(pid: int, port: int) -> set[int]:
    """Client-side ports of the connections on `port` that process `pid` accepted (/proc/net/tcp)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) == port and fields[3] != "0A" and int(fields[9]) in inodes:
            ports.add(int(remote[1], 16))
    return ports


def stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("T", "t", "Z")


async def kill_worker(cluster: Cluster, rng: random.Random) -> tuple[float, set[int]]:
    """SIGSTOP a random ready worker, snapshot its connections, SIGKILL it: (snapshot time, client ports)."""
    pid = rng.choice(worker_pids(cluster))
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    while not stopped(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    taken_at, ports = time.monotonic(), client_ports(pid, cluster.port)
    os.kill(pid, signal.SIGKILL)
    return taken_at, ports


# -- the run ------------------------------------------------------------------------------------------
def schedule(events: int, rng: random.Random) -> list[str]:
    units = [["hup"]] * events + [["kill"]] * events + [["ttou", "ttin"]] * events
    rng.shuffle(units)
    return [event for unit in units for event in unit]


async def drive(cluster: Cluster, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    load = Load(cluster.port, args.timeout)
    done = asyncio.Event()
    clients = [asyncio.create_task(load.keepalive(done)) for _ in range(args.keepalive)]
    clients += [asyncio.create_task(load.fresh(done)) for _ in range(args.fresh)]
    started = time.monotonic()
    happened: list[tuple[float, str]] = []
    snapshots: list[tuple[float, set[int]]] = []
    signals = {"hup": signal.SIGHUP, "ttin": signal.SIGTTIN, "ttou": signal.SIGTTOU}
    for event in schedule(args.events, rng):
        await asyncio.sleep(args.pace)
        happened.append((time.monotonic(), event))
        if event == "kill":
            snapshots.append(await kill_worker(cluster, rng))
        else:
            os.kill(cluster.process.pid, signals[event])
    settled = await settle(cluster)
    await asyncio.sleep(1.0)  # a quiet tail: the load keeps going on the settled cluster
    done.set()
    await asyncio.gather(*clients)
    elapsed = time.monotonic() - started
    return classify(load, happened, snapshots, elapsed) | {"settled": settled}


async def settle(cluster: Cluster) -> bool:
    """Every slot back to ready (the schedule ends at the starting count)."""
    deadline = time.monotonic() + SETTLE_S
    while await asyncio.to_thread(ready_workers, cluster) != cluster.workers:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def classify(load: Load, happened: list[tuple[float, str]], snapshots: list[tuple[float, set[int]]],
             elapsed: float) -> dict[str, Any]:
    def killed_connection(f: Failure) -> bool:
        return f.port != 0 and f.kind != "bad-response" and any(
            taken >= f.connected_at and f.port in ports for taken, ports in snapshots)

    def nearest(f: Failure) -> str:
        before = [event for at, event in happened if 0 <= f.failed_at - at <= NEAR_S]
        return before[-1] if before else "none"

    unexplained = [f for f in load.failures if not killed_connection(f)]
    return {"requests": load.sent, "ok": load.ok, "failed": len(load.failures), "seconds": elapsed,
            "requests_per_s": load.sent / elapsed, "events": dict(Counter(event for _, event in happened)),
            "failed_on_killed_connections": len(load.failures) - len(unexplained),
            "unexplained": len(unexplained), "failures_by_kind": dict(Counter(f.kind for f in load.failures)),
            "unexplained_by_event": dict(Counter(nearest(f) for f in unexplained)),
            "first_unexplained": [f.detail for f in unexplained[:5]]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="starting (and final) worker count")
    parser.add_argument("--events", type=int, default=10, help="reloads, kills and scale-down/up pairs, each")
    parser.add_argument("--pace", type=float, default=1.0, help="seconds between events")
    parser.add_argument("--keepalive", type=int, default=16)
    parser.add_argument("--fresh", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=20.0, help="a request unanswered this long failed")
    parser.add_argument("--seed", type=int, default=0, help="replay one schedule (0: a random one)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.workers < 2 or args.events < 0 or args.pace <= 0 or args.keepalive + args.fresh < 1:
        parser.error("--workers >= 2 (a scale-down must leave one), --events >= 0, --pace > 0, some clients")
    args.seed = args.seed or random.SystemRandom().randrange(1, 2**31)
    return args


def main() -> int:
    args = parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="mcpherd-chaos-") as tmp:
        try:
            cluster = launch(args.workers, Path(tmp) / "serve.log")
        except ClusterFailed as exc:
            print(f"mcpherd: {exc}\n{exc.last_lines()}", file=sys.stderr)
            return 1
        try:
            result = asyncio.run(drive(cluster, args, random.Random(args.seed)))
        finally:
            stop(cluster.process)
    print_machine(info)
    print(f"{args.workers} workers, {args.keepalive} keep-alive + {args.fresh} new-connection clients, "
          f"events every {args.pace:g} s: {result['events']} (seed {args.seed})\n")
    print(f"requests {result['requests']:,} ({result['requests_per_s']:,.0f}/s), answered {result['ok']:,}, "
          f"failed {result['failed']}: {result['failed_on_killed_connections']} on a killed worker's connections, "
          f"{result['unexplained']} unexplained {result['unexplained_by_event'] or ''}")
    if not result["settled"]:
        print(f"WARNING: the cluster did not get back to {args.workers} ready workers within {SETTLE_S:g} s")
    path = results_path("chaos", args.results)
    config = {k: v for k, v in vars(args).items() if k != "results"}
    write_results(path, {"machine": info, "config": config, **result})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
