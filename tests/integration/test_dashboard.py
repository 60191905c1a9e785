"""The live dashboard, seen as an operator sees it: in a real browser (Debian's chromium, headless).

The page at `/` on the metrics address loads (its title), draws one row per worker, and its numbers
move when load is applied; it fetches nothing but its own origin (it works offline: no CDN) and throws
nothing. A screenshot under load is kept as a test artefact, in the test's tmp_path and in
test-artifacts/dashboard.png at the repository root. The SSE stream behind it pushes at most one
snapshot a second, the same bytes to every viewer, and the dashboard's routes are read-only.

A missing chromium fails these tests (tests/run.sh installs it); it never skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Cluster, RawHttp, modern_call
from headless_chromium import Chromium

ROOT = Path(__file__).resolve().parents[2]
ARTEFACT = ROOT / "test-artifacts" / "dashboard.png"
WORKERS = 3  # more than this machine's 2 CPUs: the rows come from the slots, not from the CPUs
LOAD_S = 8.0  # the burst of echo calls ends by then whatever happens
ROW_COUNT = "document.querySelectorAll('#workers tr').length"
TIMELINE = "[...document.querySelectorAll('#timeline li')].map((li) => li.textContent)"
WORKER_RPS = "[...document.querySelectorAll('#workers tr')].map((tr) => Number(tr.children[8].textContent))"


def dashboard_url(cluster: Cluster) -> str:
    return cluster.metrics_url.removesuffix("metrics")


@pytest.fixture
def start_browser(tmp_path: Path) -> Iterator[Callable[[], Chromium]]:
    """Starts the browser from the test's body, so that a missing chromium is a test FAILED (not an
    ERROR in set-up, and never a skip); closes it with the test."""
    started: list[Chromium] = []

    def start() -> Chromium:
        if shutil.which("chromium") is None:
            pytest.fail("chromium is not installed: tests/run.sh installs it (apt-get install chromium chromium-driver)")
        started.append(Chromium(tmp_path / "chromium-profile", tmp_path / "chromium.log"))
        return started[-1]

    yield start
    for chromium in started:
        chromium.close()


class EchoBurst:
    """Echo calls over a few keep-alive connections, from a thread, until stopped or LOAD_S has passed."""

    def __init__(self, url: str, connections: int = 4) -> None:
        self.url = url
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(connections)]

    def __enter__(self) -> EchoBurst:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(LOAD_S + 10)

    def _run(self, index: int) -> None:
        deadline = time.monotonic() + LOAD_S
        with RawHttp(self.url) as http:
            while not self._stop.is_set() and time.monotonic() < deadline:
                reply = modern_call(http, "tools/call", {"name": "echo", "arguments": {"text": f"load-{index}"}})
                if reply.status != 200 or "error" in reply.json():
                    self.failures.append(repr(reply)[:300])
                    return
                self.answered += 1
                time.sleep(0.002)  # a steady stream, not a saturating flood: the machine is shared


def test_the_page_loads_shows_every_worker_and_moves_under_load(clusters: Callable[..., Cluster],
                                                                 start_browser: Callable[[], Chromium],
                                                                 tmp_path: Path) -> None:
    browser = start_browser()
    cluster = clusters(WORKERS)
    url = dashboard_url(cluster)
    browser.open(url)
    assert browser.evaluate("document.title") == "mcpherd"

    assert browser.wait_for(f"{ROW_COUNT} === {WORKERS}", 10.0)
    assert browser.evaluate("[...document.querySelectorAll('#workers tr')].map((tr) => tr.dataset.slot)") == \
        [str(slot) for slot in range(WORKERS)]
    # The page shows the last tick's snapshot, up to a second older than the admin socket's answer.
    assert browser.wait_for(f"[...document.querySelectorAll('#workers td.ready')].length === {WORKERS}", 10.0)
    idle = browser.wait_for("document.getElementById('rps').textContent !== '-' && "
                            "document.getElementById('rps').textContent", 10.0)
    assert idle == "0", "nothing has called the cluster yet"

    with EchoBurst(cluster.url) as burst:
        moved = browser.wait_for(f"document.getElementById('rps').textContent !== '{idle}' && "
                                 "document.getElementById('rps').textContent", LOAD_S)
        assert browser.wait_for(f"{WORKER_RPS}.some((rate) => rate > 0)", LOAD_S)
        browser.screenshot(tmp_path / "dashboard.png", ARTEFACT)
    assert not burst.failures, burst.failures[:3]
    assert float(moved) > 0 and burst.answered > 0, (moved, burst.answered)
    assert browser.evaluate(ROW_COUNT) == WORKERS, "load changes the numbers, never the rows"

    assert ARTEFACT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert browser.exceptions() == []
    foreign = [u for u in browser.requested_urls() if not u.startswith((url, "data:"))]
    assert foreign == [], "the dashboard must work offline: it fetches nothing but its own origin"


def test_the_timeline_shows_restarts_and_reloads_with_their_reasons(clusters: Callable[..., Cluster],
                                                                    start_browser: Callable[[], Chromium]) -> None:
    browser = start_browser()
    cluster = clusters(2)
    browser.open(dashboard_url(cluster))
    victim = min(cluster.worker_pids())
    os.kill(victim, signal.SIGKILL)
    cluster.wait_serving(without={victim})
    cluster.process.signal(signal.SIGHUP)
    cluster.wait_serving(generation=2)
    entries = browser.wait_for(f"{TIMELINE}.some((t) => t.includes('reload')) && {TIMELINE}", 10.0)
    assert any("restart · slot" in e and f"worker {victim} died (killed by SIGKILL)" in e for e in entries), entries
    assert any("reload · generation 2 starting" in e for e in entries), entries
    assert browser.wait_for("document.getElementById('title').textContent.includes('generation 2')", 5.0)


def test_every_viewer_gets_the_same_snapshot_at_most_once_a_second(clusters: Callable[..., Cluster]) -> None:
    cluster = clusters(2)
    url = dashboard_url(cluster)
    streams = [RawHttp(url + "events", timeout=10.0) for _ in range(2)]
    try:
        for http in streams:
            http.send(http.build("GET", {"accept": "text/event-stream"}))
        heads = [http.read_head() for http in streams]
        assert all(status == 200 and head["content-type"] == "text/event-stream" for status, head in heads), heads
        started = time.monotonic()
        frames = [_frames(http, 4) for http in streams]
        elapsed = time.monotonic() - started
    finally:
        for http in streams:
            http.close()
    # 4 frames: the first one at connection, then three ticks: at least ~2 s must pass.
    assert elapsed >= 1.8, f"4 frames in {elapsed:.2f}s: more than one a second"
    shared = set(frames[0]) & set(frames[1])
    assert len(shared) >= 2, "every viewer receives the same bytes, computed once per tick"
    snapshot = json.loads(frames[0][-1])
    assert set(snapshot) == {"status", "history", "timeline", "alerts"}
    assert len(snapshot["status"]["workers"]) == 2


def _frames(http: RawHttp, count: int) -> list[bytes]:
    """The data of the next `count` events of an SSE body that is not chunked (the master's stream)."""
    out: list[bytes] = []
    while len(out) < count:
        frame = http._read_until(b"\n\n")
        assert frame.startswith(b"data: "), frame[:100]
        out.append(frame[len(b"data: "):])
    return out


def test_the_dashboard_is_read_only(clusters: Callable[..., Cluster]) -> None:
    cluster = clusters(1)
    with RawHttp(dashboard_url(cluster)) as http:
        page = http.request("GET", path="/")
        assert page.status == 200 and page.headers["content-type"].startswith("text/html")
        assert b"http://" not in page.body and b"https://" not in page.body, "no CDN, nothing fetched elsewhere"
        for path in ("/", "/feed.json", "/events"):
            assert http.request("POST", body=b"{}", path=path).status == 405, path
        feed = http.request("GET", path="/feed.json")
        assert feed.status == 200 and set(feed.json()) == {"status", "history", "timeline", "alerts"}
