"""The Markdown of each benchmark's section in REPORT.md, from the JSON its script wrote.

One function per benchmark, `(document) -> lines`; they read the scripts' result formats as those
scripts define them (worker_bench.py, scaling.py, propagation.py, metrics_overhead.py,
redis_propagation.py, dashboard_cost.py, chaos.py) and tolerate a missing key rather than fail the
whole report: a figure that is absent prints as "n/a".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Doc = dict[str, Any]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def num(value: object, digits: int = 2, suffix: str = "") -> str:
    if value is None or not isinstance(value, int | float):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def pct(value: object, digits: int = 0) -> str:
    return "n/a" if not isinstance(value, int | float) else f"{value:.{digits}%}"


def worker(doc: Doc) -> list[str]:
    rows = []
    for scenario, servers in doc.get("medians", {}).items():
        for server, m in servers.items():
            rows.append([scenario, server, num(m.get("rps"), 0), num(m.get("p50_ms")), num(m.get("p99_ms")),
                         num(m.get("cpu_us_per_request"), 1), pct(m.get("other_load"))])
    lines = table(["protocol", "server", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "other load"], rows)
    ratios = [[scenario, pct(r.get("mcpherd_over_bare")), num(r.get("mcpherd_over_sdk"), 1, "x"),
               num(r.get("p99_mcpherd_over_sdk"), 3), pct(r.get("floor_over_bare")), pct(r.get("mcpherd_over_floor")),
               "met" if r.get("meets_target") else "NOT met"]
              for scenario, r in doc.get("ratios", {}).items()]
    config = doc.get("config", {})
    return [f"One worker, `tools/call` echo, wrk -c{config.get('connections', '?')}; medians of "
            f"{config.get('repeats', '?')} x {config.get('seconds', '?')} s, servers pinned to CPU "
            f"{config.get('server_cpu', '?')}, wrk to CPU {config.get('wrk_cpu', '?')}.", "", *lines,
            *table(["protocol", "mcpherd / bare", "mcpherd / SDK", "p99 mcpherd / SDK", "floor / bare",
                    "mcpherd / floor", "target (>= 70 % of bare, p99 <= 1/10 of SDK)"], ratios),
            "`floor` (bench/floor_server.py) makes only the checks the spec asks of this one request, then echoes: "
            "no MCP server on this stack can be faster. It keeps no sessions, so it runs the 2026-07-28 scenario "
            "only (n/a above).", ""]


def scaling(doc: Doc) -> list[str]:
    rows = [[workers, ",".join(map(str, row.get("worker_cpus", []))), num(row.get("rps"), 0),
             num(row.get("p50_ms")), num(row.get("p99_ms")), num(row.get("cpu_us_per_request"), 1),
             pct(row.get("efficiency")), row.get("wrk", "")] for workers, row in doc.get("rows", {}).items()]
    config = doc.get("config", {})
    return [f"`tools/call` echo, wrk -c{config.get('connections', '?')}, medians of {config.get('repeats', '?')} x "
            f"{config.get('seconds', '?')} s per worker count. Scaling efficiency at the top count: "
            f"**{pct(doc.get('scaling_efficiency'))}**.", "",
            *table(["workers", "CPUs", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "efficiency", "load generator"],
                   rows), f"Note: {doc.get('note', '')}", ""]


def latency(worker_doc: Doc | None, scaling_doc: Doc | None) -> list[str]:
    rows = []
    for scenario, servers in (worker_doc or {}).get("medians", {}).items():
        for server, m in servers.items():
            rows.append([f"one worker, {server}, {scenario}", num(m.get("p50_ms")), num(m.get("p99_ms"))])
    for workers, row in (scaling_doc or {}).get("rows", {}).items():
        rows.append([f"mcpherd, {workers} worker(s), 2026-07-28", num(row.get("p50_ms")), num(row.get("p99_ms"))])
    if not rows:
        return ["No latency figures: the worker and scaling benchmarks did not produce results.", ""]
    return ["wrk's percentiles under full load (keep-alive, `tools/call` echo).", "",
            *table(["where", "p50 ms", "p99 ms"], rows)]


def propagation(doc: Doc) -> list[str]:
    rows = []
    for phase in doc.get("phases", []):
        client, work = phase.get("client_ms") or {}, phase.get("worker") or {}
        rows.append([phase.get("clients"), phase.get("calls"), num(phase.get("calls_per_s"), 0),
                     num(client.get("p50"), 3), num(client.get("p99"), 3), num(work.get("p50_ms"), 3),
                     num(work.get("p99_ms"), 3), pct(work.get("share_within_1ms"), 2), phase.get("failures")])
    target = doc.get("target", {})
    unavailable = doc.get("metrics_unavailable")
    return ["`refresh_weather` invalidates a tag on every worker and returns once all applied it. Client: the "
            "whole call; worker: master publish -> applied, from `mcpherd_event_propagation_seconds`.", "",
            *table(["clients", "calls", "calls/s", "client p50 ms", "client p99 ms", "worker p50 ms",
                    "worker p99 ms", "<= 1 ms", "failed"], rows),
            f"Target (worker-measured p99 <= {target.get('p99_ms', 1)} ms): **{target.get('verdict', 'n/a')}**"
            + (f" — worker figures unavailable: {unavailable}" if unavailable else ""), ""]


def redis(doc: Doc) -> list[str]:
    rows = []
    for label, key in (("invalidation, first worker of B", "invalidation_first_worker_ms"),
                       ("invalidation, every worker of B", "invalidation_every_worker_ms"),
                       ("notification A -> B's GET stream", "notification_ms")):
        figures = doc.get(key) or {}
        rows.append([label, num(figures.get("p50")), num(figures.get("p99")), num(figures.get("max"))])
    hop = doc.get("b_last_hop") or {}
    rows.append(["last hop on B (worker-measured)", num(hop.get("p50_ms"), 3), num(hop.get("p99_ms"), 3), "n/a"])
    return [f"Two clusters on this machine sharing one redis-server, {doc.get('workers_per_host', '?')} workers "
            f"each, {doc.get('rounds', '?')} rounds.", "", *table(["A -> Redis -> B", "p50 ms", "p99 ms", "max ms"],
                                                                   rows)]


def metrics_overhead(doc: Doc) -> list[str]:
    rows = [[mode, num(m.get("rps"), 0), num(m.get("p50_ms")), num(m.get("p99_ms")),
             num(m.get("cpu_us_per_request"), 1)] for mode, m in doc.get("medians", {}).items()]
    target, checks = doc.get("target", {}), doc.get("checks", {})
    return [f"Two identical clusters, `--metrics-bind` on vs off, ABBA order; {doc.get('wrk', '')}; /metrics "
            f"scraped {checks.get('scrapes', 'n/a')} times during the 'on' runs "
            f"({checks.get('scrape_failures', 'n/a')} failed).", "",
            *table(["metrics", "req/s", "p50 ms", "p99 ms", "CPU µs/req"], rows),
            f"on / off req/s = **{pct(doc.get('on_over_off'), 1)}**, target >= {pct(target.get('ratio'))}: "
            f"{'met' if target.get('met') else 'NOT met'}", ""]


def dashboard(doc: Doc) -> list[str]:
    config, medians = doc.get("config", {}), doc.get("medians", {})
    rows = []
    for viewers, row in medians.items():
        sent = row.get("bytes_per_s_all_viewers")
        rows.append([viewers, num(row.get("master_cpu_percent"), 2, " %"), num(row.get("status_p50_ms")),
                     num(row.get("status_p99_ms")), num(row.get("status_max_ms")), num(row.get("cli_status_p50_ms"), 0),
                     num(row.get("frames_per_viewer_per_s_max")), "-" if sent is None else num(sent / 1e6, 2, " MB")])
    return [f"Idle cluster of {config.get('workers', '?')} workers; master CPU (its own pid) with no viewer and with "
            f"{config.get('viewers', '?')} SSE viewers of `/events`, medians of {config.get('repeats', '?')} x "
            f"{config.get('seconds', '?')} s (ABBA); admin `status` round trips every 100 ms meanwhile. Frames of "
            f"{num(doc.get('frame_bytes'), 0)} bytes ({doc.get('history_points', '?')} history points).", "",
            *table(["viewers", "master CPU (% of a core)", "status p50 ms", "status p99 ms", "status max ms",
                    "`mcpherd status` ms", "frames/s per viewer", "sent/s"], rows),
            f"{config.get('viewers', '?')} viewers cost the master **{num(doc.get('viewer_cost_percent'), 2)} % "
            "of a core**.", ""]


def chaos(doc: Doc) -> list[str]:
    config, events = doc.get("config", {}), doc.get("events", {})
    rows = [[num(doc.get("requests"), 0), num(doc.get("requests_per_s"), 0), num(doc.get("ok"), 0), doc.get("failed"),
             doc.get("failed_on_killed_connections"), doc.get("unexplained"),
             ", ".join(f"{k} {v}" for k, v in (doc.get("unexplained_by_event") or {}).items()) or "-"]]
    lines = [f"{config.get('workers', '?')} workers under {config.get('keepalive', '?')} keep-alive and "
             f"{config.get('fresh', '?')} new-connection clients; events every {config.get('pace', '?')} s: "
             + ", ".join(f"{count} x {name}" for name, count in events.items())
             + f" (seed {config.get('seed', '?')}). Failures on a killed worker's own connections are unavoidable; "
             "every other failure is unexplained (target: none).", "",
             *table(["requests", "req/s", "answered", "failed", "on killed workers' connections", "unexplained",
                     "unexplained, by the event just before"], rows)]
    if doc.get("first_unexplained"):
        lines += ["First unexplained failures: " + "; ".join(f"`{d}`" for d in doc["first_unexplained"][:3]), ""]
    if doc.get("settled") is False:
        lines += ["**The cluster did not get back to its worker count after the schedule.**", ""]
    return lines


SECTIONS: dict[str, Callable[[Doc], list[str]]] = {
    "worker": worker, "scaling": scaling, "propagation": propagation, "redis_propagation": redis,
    "metrics_overhead": metrics_overhead, "dashboard_cost": dashboard, "chaos": chaos,
}
