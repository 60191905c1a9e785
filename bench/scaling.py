"""Throughput of one mcpherd cluster with 1, 2, ... N workers (N: the CPUs this process may use).

    python bench/scaling.py [--max-workers N] [--seconds 8 --repeats 3 --warmup 2 --connections 64]
                            [--wrk-threads T] [--no-plot]

`tools/call` on the demo's `echo` (protocol 2026-07-28) over keep-alive connections, driven by wrk
(`--latency` gives p50 and p99). Each measurement starts a fresh `mcpherd serve --workers k` (no
autoscaling, /metrics on as deployed; the master pins worker i to the i-th CPU of its placement)
and stops it afterwards. Repeats interleave (every repeat visits k = 1..N in turn) so that machine
noise spreads evenly; the table shows medians.

Scaling efficiency at k workers is (k-worker req/s) / (k x 1-worker req/s); the headline is k = N.

Where wrk runs: on the CPUs no worker is pinned to, if any are left (dedicated); otherwise on every
allowed CPU, sharing them with the workers. On a machine with few CPUs the N-worker run always
shares: wrk's own CPU time is then taken from the workers, so the efficiency measured there is a
lower bound of mcpherd's, and on 2 CPUs it cannot approach 100%. The output says which case each
row was.

Results go to bench/results/scaling-<timestamp>.json and, if matplotlib is installed (the `bench`
extra: `pip install -e '.[bench]'`), a plot of req/s and p99 against workers beside it (.png).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    ClusterFailed,
    WrkRun,
    default_wrk_threads,
    machine_info,
    median_runs,
    print_machine,
    results_path,
    run_wrk,
    running_cluster,
    worker_cpus,
    wrk_placement,
    write_results,
)
from worker_bench import modern_wire, write_script

from mcpherd.supervisor.topology import allowed_cpus

Table = dict[int, dict[str, Any]]


def measure(args: argparse.Namespace, workdir: Path) -> dict[int, list[WrkRun]]:
    counts = range(1, args.max_workers + 1)
    script, out = workdir / "echo.lua", workdir / "wrk.json"
    write_script(script, modern_wire(), out)
    samples: dict[int, list[WrkRun]] = {k: [] for k in counts}
    for repeat in range(args.repeats):
        for workers in counts:
            where = wrk_placement(workers)
            with running_cluster(workers, workdir / f"serve-{workers}.log") as cluster:
                if args.warmup:
                    run_wrk(cluster, script, out, args.warmup, args.connections, args.wrk_threads, where)
                run = run_wrk(cluster, script, out, args.seconds, args.connections, args.wrk_threads, where)
            samples[workers].append(run)
            print(f"  repeat {repeat + 1}/{args.repeats}, {workers} worker(s): {run.rps:,.0f} req/s"
                  f"{f', errors {run.errors}' if run.errors else ''}", file=sys.stderr)
    return samples


def tabulate(samples: dict[int, list[WrkRun]], wrk_threads: int) -> Table:
    table: Table = {}
    for workers, runs in samples.items():
        where = wrk_placement(workers)
        table[workers] = {**median_runs(runs), "worker_cpus": worker_cpus(workers),
                          "wrk": where.describe(wrk_threads), "wrk_dedicated": where.dedicated}
    one = table[1]["rps"]
    for workers, row in table.items():
        row["efficiency"] = row["rps"] / (workers * one)
    return table


def placement_note(table: Table) -> str:
    shared = [k for k, row in table.items() if not row["wrk_dedicated"]]
    cpus = len(allowed_cpus())
    if not shared:
        return "wrk ran on CPUs of its own in every row: the efficiency is mcpherd's alone."
    return (f"with {', '.join(map(str, shared))} worker(s), wrk shared the {cpus} CPUs with the workers "
            f"(taskset above): the CPU wrk needs to generate load is taken from the workers, so the "
            f"efficiency of those rows is a lower bound of mcpherd's own scaling; on a {cpus}-CPU machine "
            f"the {max(table)}-worker efficiency is bounded well below 100% by that alone.")


def print_table(table: Table, info: dict[str, Any], args: argparse.Namespace, note: str) -> None:
    print_machine(info)
    print(f"tools/call echo, 2026-07-28, wrk -c{args.connections}, medians of {args.repeats} x "
          f"{args.seconds} s (warm-up {args.warmup} s per start)\n")
    print(f"{'workers':>7} {'on CPUs':<10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}"
          f"{'efficiency':>12}  load generator")
    for workers, row in table.items():
        cpus = ",".join(map(str, row["worker_cpus"]))
        print(f"{workers:>7} {cpus:<10}{row['rps']:>10,.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
              f"{row['cpu_us_per_request']:>12.1f}{row['efficiency']:>12.0%}  {row['wrk']}")
    top = max(table)
    print(f"\nscaling efficiency: {top}-worker req/s / ({top} x 1-worker req/s) = {table[top]['efficiency']:.0%}")
    print(f"note: {note}")


def plot(table: Table, path: Path, title: str) -> Path | None:
    """req/s (with the linear ideal) above, p50 and p99 below, against workers; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nno plot: matplotlib is not installed (it is in the `bench` extra: pip install -e '.[bench]')",
              file=sys.stderr)
        return None
    workers = list(table)
    figure, (throughput, latency) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    throughput.plot(workers, [table[k]["rps"] for k in workers], "o-", label="measured")
    throughput.plot(workers, [k * table[1]["rps"] for k in workers], ":", label="linear (k x 1 worker)")
    throughput.set_ylabel("requests/s")
    throughput.set_ylim(bottom=0)
    throughput.legend(loc="best")
    throughput.set_title(title, fontsize=9)
    latency.plot(workers, [table[k]["p99_ms"] for k in workers], "s-", color="tab:red", label="p99")
    latency.plot(workers, [table[k]["p50_ms"] for k in workers], "^--", color="tab:orange", label="p50")
    latency.set_ylabel("latency (ms)")
    latency.set_ylim(bottom=0)
    latency.legend(loc="best")
    latency.set_xlabel("workers")
    latency.set_xticks(workers)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-workers", type=int, default=len(allowed_cpus()),
                        help="measure 1..this many workers (default: the CPUs this process may use)")
    parser.add_argument("--seconds", type=int, default=8, help="length of one measured wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per worker count (medians)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured wrk run after each start (0: none)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk-threads", type=int, default=default_wrk_threads())
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.max_workers < 1 or args.seconds < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--max-workers, --seconds and --repeats must be >= 1, --warmup >= 0")
    return args


def main() -> int:
    args = parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="mcpherd-scaling-") as tmp:
        try:
            samples = measure(args, Path(tmp))
        except ClusterFailed as exc:
            print(f"mcpherd: {exc}\n{exc.last_lines()}", file=sys.stderr)
            return 1
    table = tabulate(samples, args.wrk_threads)
    note = placement_note(table)
    print_table(table, info, args, note)
    config = {k: v for k, v in vars(args).items() if k != "results"}
    document = {"machine": info, "config": config, "rows": {str(k): row for k, row in table.items()},
                "scaling_efficiency": table[max(table)]["efficiency"], "note": note,
                "samples": {str(k): [asdict(run) for run in runs] for k, runs in samples.items()}}
    path = results_path("scaling", args.results)
    title = f"mcpherd tools/call echo, {info['cpu_model']}, {args.repeats} x {args.seconds} s"
    image = None if args.no_plot else plot(table, path.with_suffix(".png"), title)
    document["plot"] = str(image) if image else None
    write_results(path, document)
    print(f"\nresults: {path}" + (f"\nplot: {image}" if image else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
