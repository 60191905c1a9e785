"""What the Prometheus metrics cost: tools/call echo throughput with metrics on vs off, in one run.

    python bench/metrics_overhead.py [--workers N] [--seconds 8 --repeats 5 --warmup 2]
                                     [--connections 64 --wrk-threads T --scrape-interval 5]

Two clusters of `--workers` workers (default: one per CPU) run side by side for the whole run,
identical but for `--metrics-bind`: "on" exports /metrics on a free loopback port, "off" is started
with `--metrics-bind off`. wrk alternates between them in ABBA order (on, off, off, on, ...) so that
drift in the machine's load hits both alike; the table shows medians over repeats. While "on" is
under load, /metrics is scraped every `--scrape-interval` seconds, as Prometheus would (0: never).
Target: "on" req/s >= 97% of "off" req/s.

If `mcpherd serve` does not accept `--metrics-bind` (or the value "off"), the script says so and
exits 2 instead of measuring. Which listening ports each cluster opened is recorded as a check that
"off" exports nothing. Results go to bench/results/metrics-overhead-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
from common import (
    RESULTS,
    Cluster,
    ClusterFailed,
    Metrics,
    WrkRun,
    default_wrk_threads,
    fetch,
    launch,
    machine_info,
    median_runs,
    print_machine,
    results_path,
    run_wrk,
    wait_fetch,
    wrk_placement,
    write_results,
)
from worker_bench import modern_wire, stop, write_script

from mcpherd.supervisor.topology import allowed_cpus

TARGET_RATIO = 0.97
MODES: tuple[Metrics, Metrics] = ("on", "off")
EXIT_UNSUPPORTED = 2


class FlagRejected(Exception):
    """`mcpherd serve` refused --metrics-bind (or its value): there is nothing to compare."""


class Scraper:
    """Scrapes a /metrics URL every `interval` seconds in a thread of this (benchmark) process."""

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if fetch(self.url) is None:
                self.failures += 1
            else:
                self.scrapes += 1


def listening_ports(pid: int) -> list[int]:
    """TCP ports the master and its workers listen on."""
    ports: set[int] = set()
    try:
        master = psutil.Process(pid)
        for process in (master, *master.children(recursive=True)):
            ports.update(c.laddr.port for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
    except psutil.Error:
        pass
    return sorted(ports)


def start_both(workers: int, workdir: Path) -> dict[str, Cluster]:
    clusters: dict[str, Cluster] = {}
    try:
        for mode in MODES:
            try:
                clusters[mode] = launch(workers, workdir / f"serve-{mode}.log", mode)
            except ClusterFailed as exc:
                if exc.rejected_flag("--metrics-bind"):
                    raise FlagRejected(f"`--metrics-bind {'off' if mode == 'off' else 'HOST:PORT'}` was refused: "
                                       f"{exc.last_lines(2)}") from exc
                raise
    except BaseException:
        for cluster in clusters.values():
            stop(cluster.process)
        raise
    return clusters


def check_endpoints(clusters: dict[str, Cluster]) -> dict[str, Any]:
    """Whether "on" answers /metrics, and which ports each cluster listens on."""
    url = clusters["on"].metrics_url
    answered = url is not None and wait_fetch(url) is not None
    return {"on_metrics_url": url, "on_metrics_answered": answered,
            "listening": {mode: listening_ports(c.process.pid) for mode, c in clusters.items()},
            "serving_ports": {mode: c.port for mode, c in clusters.items()}}


def measure(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, list[WrkRun]], dict[str, Any]]:
    script, out = workdir / "echo.lua", workdir / "wrk.json"
    write_script(script, modern_wire(), out)
    where = wrk_placement(args.workers)
    clusters = start_both(args.workers, workdir)
    try:
        checks = check_endpoints(clusters)
        checks.update(scrapes=0, scrape_failures=0)
        samples: dict[str, list[WrkRun]] = {mode: [] for mode in MODES}

        def one(mode: str, seconds: int) -> WrkRun:
            cluster = clusters[mode]
            with Scraper(cluster.metrics_url or "", args.scrape_interval if cluster.metrics_url else 0) as scraper:
                run = run_wrk(cluster, script, out, seconds, args.connections, args.wrk_threads, where)
            checks["scrapes"] += scraper.scrapes
            checks["scrape_failures"] += scraper.failures
            return run

        for mode in MODES:
            if args.warmup:
                one(mode, args.warmup)
        for repeat in range(args.repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                samples[mode].append(one(mode, args.seconds))
                print(f"  repeat {repeat + 1}/{args.repeats} metrics {mode}: {samples[mode][-1].rps:,.0f} req/s",
                      file=sys.stderr)
        return samples, checks
    finally:
        for cluster in clusters.values():
            stop(cluster.process)


def print_report(table: dict[str, dict[str, float]], ratio: float, checks: dict[str, Any],
                 args: argparse.Namespace, where: str) -> None:
    print(f"tools/call echo, 2026-07-28, {args.workers} workers per cluster, wrk -c{args.connections}, "
          f"medians of {args.repeats} x {args.seconds} s, ABBA order; {where}\n")
    print(f"{'metrics':<9}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}")
    for mode, row in table.items():
        print(f"{mode:<9}{row['rps']:>10,.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
              f"{row['cpu_us_per_request']:>12.1f}")
    met = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"\non/off req/s = {ratio:.1%}   target >= {TARGET_RATIO:.0%}: {met}")
    if args.scrape_interval > 0:
        print(f"/metrics scraped every {args.scrape_interval:g} s during 'on' runs: {checks['scrapes']} scrapes, "
              f"{checks['scrape_failures']} failed")
    else:
        print("/metrics not scraped during the runs (--scrape-interval 0)")
    if not checks["on_metrics_answered"]:
        print(f"WARNING: nothing answered at {checks['on_metrics_url']}: 'on' may not be exporting metrics")
    extra = [p for p in checks["listening"]["off"] if p != checks["serving_ports"]["off"]]
    if extra:
        print(f"WARNING: the 'off' cluster still listens on TCP ports {extra} besides its serving port")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=len(allowed_cpus()),
                        help="workers per cluster (default: one per CPU this process may use)")
    parser.add_argument("--seconds", type=int, default=8, help="length of one measured wrk run")
    parser.add_argument("--repeats", type=int, default=6, help="measured runs per mode (medians; even: ABBA)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured wrk run per cluster first (0: none)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk-threads", type=int, default=default_wrk_threads())
    parser.add_argument("--scrape-interval", type=float, default=5.0,
                        help="seconds between /metrics scrapes while 'on' is measured (0: never)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.workers < 1 or args.seconds < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--workers, --seconds and --repeats must be >= 1, --warmup >= 0")
    return args


def main() -> int:
    args = parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="mcpherd-metrics-") as tmp:
        try:
            samples, checks = measure(args, Path(tmp))
        except FlagRejected as exc:
            print(f"cannot compare metrics on vs off: {exc}", file=sys.stderr)
            return EXIT_UNSUPPORTED
        except ClusterFailed as exc:
            print(f"mcpherd: {exc}\n{exc.last_lines()}", file=sys.stderr)
            return 1
    table = {mode: median_runs(runs) for mode, runs in samples.items()}
    ratio = table["on"]["rps"] / table["off"]["rps"]
    where = wrk_placement(args.workers).describe(args.wrk_threads)
    print_machine(info)
    print_report(table, ratio, checks, args, where)
    for mode, runs in samples.items():
        for repeat, run in enumerate(runs):
            if run.errors:
                print(f"warning: metrics {mode} run {repeat + 1} had errors {run.errors}", file=sys.stderr)
    path = results_path("metrics-overhead", args.results)
    config = {k: v for k, v in vars(args).items() if k != "results"}
    write_results(path, {"machine": info, "config": config, "wrk": where, "medians": table, "on_over_off": ratio,
                         "target": {"ratio": TARGET_RATIO, "met": ratio >= TARGET_RATIO}, "checks": checks,
                         "samples": {mode: [asdict(run) for run in runs] for mode, runs in samples.items()}})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
