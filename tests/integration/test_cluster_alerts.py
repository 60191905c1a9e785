"""Alerts as an operator meets them: thresholds from the [alerts] table of the configuration file; an
alert that fires is logged once however long it stays active, shows in `mcpherd status --json` under
master.alerts, on the dashboard's feed and as mcpherd_alert_active{alert} 1; once its cause is gone it
is logged cleared once and the gauge drops to 0.

The cause here is a steady stream of tools/call on a tool that does not exist (each one a JSON-RPC
error, so an "error" outcome). The debounce is shortened (2 s to fire, 3 s to clear) to keep the test short. The machine's CPU and memory alerts are set out of reach (> 100 %), since
this machine is shared and busy: only the alert under test may fire.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import Cluster, RawHttp, metric_value, modern_call, run_cli, wait_until

FIRED = re.compile(r"alert error_rate fired: (.+)")
CLEARED = re.compile(r"alert error_rate cleared")
GAUGE = 'mcpherd_alert_active{alert="error_rate"}'
ACTIVE_FOR_S = 4.0  # the alert must stay active (and silent) over several ticks
ERRORS_AT_MOST_S = 30.0  # the error stream ends by then whatever happens


def alert_config(directory: Path) -> Path:
    path = directory / "alerts.toml"
    path.write_text("[alerts]\nerror_rate = 0.05\nmin_requests = 5\ncpu_percent = 101\nmemory_percent = 101\n"
                    "p99_s = 60\ncache_hit_ratio = 0\nfire_after_s = 2\nclear_after_s = 3\n")
    return path


@contextmanager
def unknown_tool_calls(url: str) -> Iterator[list[int]]:
    """Calls to a tool that does not exist, about a hundred a second, from a thread, until the block ends.
    Yields a one-element list: the count of JSON-RPC errors answered so far."""
    errors = [0]
    stop = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + ERRORS_AT_MOST_S
        with RawHttp(url) as http:
            while not stop.is_set() and time.monotonic() < deadline:
                reply = modern_call(http, "tools/call", {"name": "no_such_tool", "arguments": {}})
                if "error" not in reply.json():  # HTTP 400 with a JSON-RPC error body, in 2026-07-28
                    return  # the count stops growing: the test says so
                errors[0] += 1
                time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(ERRORS_AT_MOST_S)


def cli_alerts(cluster: Cluster) -> list[dict[str, str]]:
    done = run_cli("status", "--json", "--admin-socket", cluster.admin_socket, timeout=30)
    assert done.code == 0, done.err
    return list(json.loads(done.out)["master"]["alerts"])


def feed(cluster: Cluster) -> dict[str, object]:
    import urllib.request

    with urllib.request.urlopen(cluster.metrics_url.removesuffix("metrics") + "feed.json", timeout=10) as reply:
        return dict(json.loads(reply.read()))


def test_an_alert_is_logged_once_when_it_fires_and_once_when_it_clears(clusters: Callable[..., Cluster],
                                                                       tmp_path: Path) -> None:
    cluster = clusters(2, "--config", str(alert_config(tmp_path)))
    log = cluster.process.output
    assert metric_value(cluster.scrape(), GAUGE) == 0.0
    assert cli_alerts(cluster) == []

    with unknown_tool_calls(cluster.url) as errors:
        fired = wait_until(lambda: FIRED.search(log()), 15.0, 0.05, "alert error_rate fired")
        assert fired[1].startswith("errors 100.0% > 5%"), fired[0]
        wait_until(lambda: metric_value(cluster.scrape(), GAUGE) == 1.0, 5.0, 0.1, "the gauge at 1")
        status = cli_alerts(cluster)
        assert [a["alert"] for a in status] == ["error_rate"], status
        assert status[0]["reason"].startswith("errors "), status
        assert "error_rate" in feed(cluster)["alerts"]  # type: ignore[operator]
        time.sleep(ACTIVE_FOR_S)
        assert metric_value(cluster.scrape(), GAUGE) == 1.0
    assert errors[0] > 5 * ACTIVE_FOR_S, f"only {errors[0]} error answers: the stream was not steady"
    assert len(FIRED.findall(log())) == 1, log()
    assert not CLEARED.search(log()), "cleared while the errors went on:\n" + log()

    wait_until(lambda: CLEARED.search(log()), 15.0, 0.05, "alert error_rate cleared")
    wait_until(lambda: metric_value(cluster.scrape(), GAUGE) == 0.0, 5.0, 0.1, "the gauge at 0")
    time.sleep(2.5)  # a few more quiet ticks: nothing more is logged
    assert len(FIRED.findall(log())) == 1 and len(CLEARED.findall(log())) == 1, log()
    assert cli_alerts(cluster) == []
    timeline = [e["text"] for e in feed(cluster)["timeline"]  # type: ignore[attr-defined]
                if e["kind"] == "alert" and e["text"].startswith("error_rate")]
    assert timeline[0].startswith("error_rate fired: errors") and timeline[1:] == ["error_rate cleared"], timeline
