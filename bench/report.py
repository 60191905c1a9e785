"""The whole benchmark suite in one command, and a Markdown report with plots of what it measured.

    python bench/report.py            # full runs: tens of minutes; the figures worth quoting
    python bench/report.py --quick    # short runs: a smoke test of the suite, figures not worth quoting
    python bench/report.py --only worker,chaos

Runs each benchmark script as a subprocess, in order: worker_bench.py (one worker vs the official SDK
server vs a bare ceiling), scaling.py (1..N workers), metrics_overhead.py, propagation.py (cache
invalidation), redis_propagation.py (across hosts, if the script and redis-server are there),
dashboard_cost.py (0 vs 50 dashboard viewers) and chaos.py (failed requests during reloads, kills and
scaling). Each writes its JSON into the report's `raw/` directory (`--results`; a script without that
option writes where it always does, and its file is copied in), and its output goes to a log there.
Then bench/results/report-<timestamp>/REPORT.md is written: the machine it ran on (CPU model, CPUs,
kernel, Python) and the date, then one section per benchmark with its tables and a PNG plot. Plots
need matplotlib (the `bench` extra: pip install -e '.[bench]'); without it the report says so and
keeps its tables. A benchmark that fails or overruns its time is reported as such; the others still run.

Each script runs in its own session. Past its time limit it gets SIGINT first (Python unwinds and its
`finally` blocks stop the clusters it started in sessions of their own), then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report_plots
import report_sections

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
RESULT_LINE = re.compile(r"^results: (\S+\.json)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    title: str
    quick: tuple[str, ...]
    full: tuple[str, ...]
    limit_quick_s: float
    limit_full_s: float
    needs: tuple[str, ...] = ("wrk", "taskset")


STEPS = (
    Step("worker", "worker_bench.py", "Worker throughput: mcpherd vs the official SDK server vs the bare ceiling",
         ("--seconds", "1", "--repeats", "1", "--warmup", "1"), (), 180, 1200),
    Step("scaling", "scaling.py", "Scaling from 1 to N workers",
         ("--seconds", "1", "--repeats", "1", "--warmup", "0", "--no-plot"), ("--no-plot",), 180, 1200),
    Step("metrics_overhead", "metrics_overhead.py", "Metrics overhead (/metrics on vs off)",
         ("--seconds", "1", "--repeats", "2", "--warmup", "0", "--scrape-interval", "0.5"), (), 180, 1200),
    Step("propagation", "propagation.py", "Invalidation propagation to every worker",
         ("--calls", "200", "--max-seconds", "5"), (), 180, 900),
    Step("redis_propagation", "redis_propagation.py", "Invalidation propagation across hosts through Redis",
         ("--rounds", "10", "--max-seconds", "10"), (), 180, 900, ("wrk", "redis-server")),
    Step("dashboard_cost", "dashboard_cost.py", "What 50 open dashboards cost the master",
         ("--seconds", "2", "--repeats", "1", "--warmup", "2"), (), 180, 2400, ("wrk",)),
    Step("chaos", "chaos.py", "Failed requests during reloads, kills and scaling",
         ("--events", "2", "--pace", "0.5", "--keepalive", "8", "--fresh", "2"), (), 180, 900, ("wrk",)),
)


@dataclass
class Outcome:
    step: Step
    status: str  # "ok", "failed (...)", "skipped (...)"
    seconds: float = 0.0
    document: dict[str, Any] | None = None
    result_file: Path | None = None
    log_file: Path | None = None


# -- running one script -------------------------------------------------------------------------------
def missing_prerequisite(step: Step) -> str | None:
    if not (BENCH / step.script).exists():
        return f"{step.script} is not in bench/"
    absent = [tool for tool in step.needs if shutil.which(tool) is None]
    return f"not installed: {', '.join(absent)}" if absent else None


def run_step(step: Step, quick: bool, raw: Path) -> Outcome:
    why_not = missing_prerequisite(step)
    if why_not is not None:
        return Outcome(step, f"skipped ({why_not})")
    source = (BENCH / step.script).read_text()
    argv = [sys.executable, str(BENCH / step.script), *(step.quick if quick else step.full)]
    if '"--results"' in source:
        argv += ["--results", str(raw)]
    log_file = raw / f"{step.name}.log"
    limit = step.limit_quick_s if quick else step.limit_full_s
    started = time.monotonic()
    print(f"== {step.name}: {' '.join(argv[1:])} (at most {limit:g} s)", file=sys.stderr, flush=True)
    with open(log_file, "wb") as log:
        process = subprocess.Popen(argv, cwd=BENCH, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        code = wait_or_stop(process, limit)
    seconds = time.monotonic() - started
    text = log_file.read_text(errors="replace")
    if code is None:
        return Outcome(step, f"failed (over its {limit:g} s limit)", seconds, log_file=log_file)
    found = RESULT_LINE.findall(text)
    if code != 0 or not found:
        last = " / ".join(line.strip() for line in text.strip().splitlines()[-3:])
        return Outcome(step, f"failed (exit {code}: {last[:300]})", seconds, log_file=log_file)
    result = Path(found[-1])
    if result.parent.resolve() != raw.resolve():
        result = Path(shutil.copy2(result, raw / result.name))
    return Outcome(step, "ok", seconds, json.loads(result.read_text()), result, log_file)


def wait_or_stop(process: subprocess.Popen[bytes], limit: float) -> int | None:
    """The exit code, or None after stopping a script that overran: SIGINT, SIGTERM, then SIGKILL."""
    try:
        return process.wait(limit)
    except subprocess.TimeoutExpired:
        pass
    for signum, grace in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    return None


# -- the machine --------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    memory = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    commit = subprocess.run(["git", "-C", str(BENCH), "describe", "--always", "--dirty"], capture_output=True,
                            text=True, timeout=10).stdout.strip()
    return {"cpu_model": model, "nproc": os.cpu_count(), "allowed_cpus": sorted(os.sched_getaffinity(0)),
            "memory_gb": round(memory / 2**20, 1), "kernel": platform.release(), "python": platform.python_version(),
            "commit": commit or "unknown", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def label(info: dict[str, Any]) -> str:
    return (f"{info['cpu_model']}, {info['nproc']} CPUs, {info['memory_gb']} GB, Linux {info['kernel']}, "
            f"Python {info['python']}, {info['date']}")


# -- the report ---------------------------------------------------------------------------------------
def write_report(directory: Path, outcomes: list[Outcome], info: dict[str, Any], quick: bool) -> Path:
    plots = report_plots.available()
    by_name = {o.step.name: o for o in outcomes}
    lines = ["# mcpherd benchmark report", "",
             f"**Machine:** {info['cpu_model']}; {info['nproc']} CPUs (this run allowed {info['allowed_cpus']}); "
             f"{info['memory_gb']} GB; Linux {info['kernel']}; Python {info['python']}.  ",
             f"**Date:** {info['date']}; commit `{info['commit']}`; load average at start "
             f"{', '.join(map(str, info['loadavg_start']))}, at end {', '.join(map(str, info['loadavg_end']))}.  ",
             f"**Mode:** {'quick (short runs: a smoke test of the suite; do not quote these figures)' if quick else 'full'}.",
             ""]
    if not plots:
        lines += ["> No plots: matplotlib is not installed (it is in the `bench` extra: "
                  "`pip install -e '.[bench]'`). The tables below are complete.", ""]
    lines += report_sections.table(["benchmark", "status", "seconds", "raw results"], [
        [o.step.title, o.status, f"{o.seconds:.0f}", f"`raw/{o.result_file.name}`" if o.result_file else "-"]
        for o in outcomes])
    for outcome in outcomes:
        lines += section(outcome, directory, label(info), plots)
        if outcome.step.name == "scaling":
            lines += latency_section(by_name)
    path = directory / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def section(outcome: Outcome, directory: Path, caption: str, plots: bool) -> list[str]:
    lines = [f"## {outcome.step.title}", ""]
    if outcome.document is None:
        log = f" (log: `raw/{outcome.log_file.name}`)" if outcome.log_file else ""
        return lines + [f"Not measured: {outcome.status}{log}.", ""]
    lines += report_sections.SECTIONS[outcome.step.name](outcome.document)
    draw = report_plots.PLOTS.get(outcome.step.name)
    if plots and draw is not None:
        try:
            image = draw(outcome.document, directory, caption)
        except (KeyError, TypeError, ValueError) as exc:  # a format this report does not know: say so
            lines += [f"(no plot: {type(exc).__name__}: {exc})", ""]
        else:
            lines += [f"![{outcome.step.title}]({image})", ""] if image else []
    return lines


def latency_section(by_name: dict[str, Outcome]) -> list[str]:
    worker, scaling = by_name.get("worker"), by_name.get("scaling")
    return ["## Latency percentiles", "",
            *report_sections.latency(worker.document if worker else None, scaling.document if scaling else None)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the whole suite")
    parser.add_argument("--only", help="comma-separated benchmarks: " + ",".join(s.name for s in STEPS))
    parser.add_argument("--results", type=Path, default=RESULTS, help="the report directory goes in here")
    args = parser.parse_args()
    names = {s.name for s in STEPS}
    args.only = set(args.only.split(",")) if args.only else names
    if not args.only <= names:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(args.only - names))}")
    return args


def main() -> int:
    args = parse_args()
    directory = args.results / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    raw = directory / "raw"
    raw.mkdir(parents=True)
    info = machine()
    outcomes = [run_step(step, args.quick, raw) for step in STEPS if step.name in args.only]
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = write_report(directory, outcomes, info, args.quick)
    (directory / "summary.json").write_text(json.dumps(
        {"machine": info, "quick": args.quick, "results": {o.step.name: {"status": o.status, "seconds": o.seconds,
                                                                          "document": o.document}
                                                            for o in outcomes}}, indent=2) + "\n")
    for outcome in outcomes:
        print(f"{outcome.step.name:<18} {outcome.status} ({outcome.seconds:.0f} s)")
    print(f"\nreport: {report}")
    return 0 if all(o.status == "ok" or o.status.startswith("skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
