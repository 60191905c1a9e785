"""The PNG plots of REPORT.md, drawn with matplotlib (the optional `bench` extra).

`available()` says whether matplotlib can be imported (headless: the Agg backend); every plot function
takes the benchmark's JSON document, the report directory and a caption naming the machine, writes
one PNG there and returns its file name, or None when the document holds nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Doc = dict[str, Any]


def available() -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        return False
    return True


def _save(figure: Any, directory: Path, name: str, caption: str) -> str:
    import matplotlib.pyplot as plt

    figure.suptitle(caption, fontsize=8)
    figure.tight_layout()
    figure.savefig(directory / name, dpi=110)
    plt.close(figure)
    return name


def worker(doc: Doc, directory: Path, caption: str) -> str | None:
    import matplotlib.pyplot as plt

    medians = doc.get("medians") or {}
    if not medians:
        return None
    scenarios = list(medians)
    servers = list(dict.fromkeys(server for row in medians.values() for server in row))
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        xs = [s + i * width for s in range(len(scenarios))]
        # A server absent from a scenario (the floor keeps no sessions) leaves its bar out.
        throughput.bar(xs, [medians[sc].get(server, {}).get("rps", 0) for sc in scenarios], width, label=server)
        latency.bar(xs, [medians[sc].get(server, {}).get("p99_ms", 0) or float("nan") for sc in scenarios], width,
                    label=server)
    for axis, label in ((throughput, "requests/s"), (latency, "p99 latency (ms, log)")):
        axis.set_xticks([s + 0.4 - width / 2 for s in range(len(scenarios))], scenarios)
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    latency.set_yscale("log")
    throughput.set_title("one worker: throughput", fontsize=9)
    latency.set_title("one worker: p99 under full load", fontsize=9)
    return _save(figure, directory, "worker.png", caption)


def scaling(doc: Doc, directory: Path, caption: str) -> str | None:
    import matplotlib.pyplot as plt

    rows = doc.get("rows") or {}
    if not rows:
        return None
    workers = sorted(int(k) for k in rows)
    rps = [rows[str(k)]["rps"] for k in workers]
    figure, (throughput, latency) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    throughput.plot(workers, rps, "o-", label="measured")
    throughput.plot(workers, [k * rps[0] for k in workers], ":", label="linear (k x 1 worker)")
    throughput.set_ylabel("requests/s")
    throughput.set_ylim(bottom=0)
    throughput.legend(fontsize=8)
    latency.plot(workers, [rows[str(k)]["p99_ms"] for k in workers], "s-", color="tab:red", label="p99")
    latency.plot(workers, [rows[str(k)]["p50_ms"] for k in workers], "^--", color="tab:orange", label="p50")
    latency.set_ylabel("latency (ms)")
    latency.set_ylim(bottom=0)
    latency.set_xlabel("workers")
    latency.set_xticks(workers)
    latency.legend(fontsize=8)
    return _save(figure, directory, "scaling.png", caption)


def propagation(doc: Doc, directory: Path, caption: str) -> str | None:
    import matplotlib.pyplot as plt

    phases = [p for p in doc.get("phases", []) if p.get("client_ms")]
    if not phases:
        return None
    labels = [f"{p['clients']} client(s)" for p in phases]
    series = {"client p50": [p["client_ms"]["p50"] for p in phases],
              "client p99": [p["client_ms"]["p99"] for p in phases],
              "worker p99": [(p.get("worker") or {}).get("p99_ms") or 0.0 for p in phases]}
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        axis.bar([x + i * width for x in range(len(phases))], values, width, label=name)
    axis.axhline(1.0, color="grey", linestyle=":", label="target: worker p99 1 ms")
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(phases))], labels)
    axis.set_ylabel("ms")
    axis.set_title("cache invalidation reaching every worker", fontsize=9)
    axis.legend(fontsize=8)
    return _save(figure, directory, "propagation.png", caption)


def metrics_overhead(doc: Doc, directory: Path, caption: str) -> str | None:
    import matplotlib.pyplot as plt

    medians = doc.get("medians") or {}
    if not medians:
        return None
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.bar(list(medians), [m["rps"] for m in medians.values()], color=["tab:blue", "tab:grey"][:len(medians)])
    axis.set_ylabel("requests/s")
    axis.set_title(f"/metrics on vs off: {doc.get('on_over_off', 0):.1%}", fontsize=9)
    return _save(figure, directory, "metrics_overhead.png", caption)


def dashboard_cost(doc: Doc, directory: Path, caption: str) -> str | None:
    import matplotlib.pyplot as plt

    medians = doc.get("medians") or {}
    if not medians:
        return None
    labels = [f"{v} viewers" for v in medians]
    figure, (cpu, status) = plt.subplots(1, 2, figsize=(9, 3.5))
    cpu.bar(labels, [m["master_cpu_percent"] for m in medians.values()], color="tab:blue")
    cpu.set_ylabel("master CPU (% of one core)")
    cpu.set_title("what open dashboards cost the master", fontsize=9)
    for i, key in enumerate(("status_p50_ms", "status_p99_ms", "status_max_ms")):
        status.bar([x + i * 0.27 for x in range(len(labels))], [m[key] for m in medians.values()], 0.27,
                   label=key.removeprefix("status_").removesuffix("_ms"))
    status.set_xticks([x + 0.27 for x in range(len(labels))], labels)
    status.set_ylabel("admin `status` round trip (ms)")
    status.set_title("the master loop's responsiveness", fontsize=9)
    status.legend(fontsize=8)
    return _save(figure, directory, "dashboard_cost.png", caption)


def chaos(doc: Doc, directory: Path, caption: str) -> str | None:
    import matplotlib.pyplot as plt

    if not doc.get("requests"):
        return None
    parts = {"answered": doc.get("ok", 0), "failed on killed workers' connections":
             doc.get("failed_on_killed_connections", 0), "failed, unexplained": doc.get("unexplained", 0)}
    figure, axis = plt.subplots(figsize=(8, 3))
    axis.barh(list(parts), list(parts.values()), color=["tab:green", "tab:orange", "tab:red"])
    axis.set_xscale("symlog")
    for y, value in enumerate(parts.values()):
        axis.text(value, y, f" {value:,}", va="center", fontsize=8)
    events = ", ".join(f"{count} x {name}" for name, count in (doc.get("events") or {}).items())
    axis.set_title(f"every request during {events or 'no event'}", fontsize=9)
    return _save(figure, directory, "chaos.png", caption)


PLOTS = {"worker": worker, "scaling": scaling, "propagation": propagation, "metrics_overhead": metrics_overhead,
         "dashboard_cost": dashboard_cost, "chaos": chaos}
