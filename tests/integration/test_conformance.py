"""The official MCP conformance suites, run unchanged against one live worker serving the demo app.

The suites only accept a loopback URL spelled `localhost`, `127.0.0.1` or `[::1]`; `localhost` also
exercises the Host check with a name rather than an address. Each run's whole output is kept in the
test's tmp dir and shown when an assertion fails.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import CONFORMANCE, NODE

SUITE_TIMEOUT = 240.0
SUMMARY_LINE = re.compile(r"^([✓✗]) (\S+): (\d+) passed, (\d+) failed$", re.MULTILINE)
TOTAL_LINE = re.compile(r"^Total: (\d+) passed, (\d+) failed$", re.MULTILINE)

# The 37 scenarios `--requirements 2026-07-28` scores, in the order it runs them (its requirements file,
# `server:` list). The tasks-* extension and pending scenarios after them are reported but not scored.
SCORED_2026 = [
    "server-stateless", "completion-complete", "tools-list", "tools-call-simple-text", "tools-call-image",
    "tools-call-audio", "tools-call-embedded-resource", "tools-call-mixed-content", "tools-call-error",
    "tools-call-with-progress", "server-sse-multiple-streams", "resources-list", "resources-read-text",
    "resources-read-binary", "resources-templates-read", "sep-2164-resource-not-found", "prompts-list",
    "prompts-get-simple", "prompts-get-with-args", "prompts-get-embedded-resource", "prompts-get-with-image",
    "dns-rebinding-protection", "caching", "input-required-result-basic-elicitation",
    "input-required-result-basic-sampling", "input-required-result-basic-list-roots",
    "input-required-result-request-state", "input-required-result-multiple-input-requests",
    "input-required-result-multi-round", "input-required-result-missing-input-response",
    "input-required-result-non-tool-request", "input-required-result-result-type",
    "input-required-result-unsupported-methods", "input-required-result-tampered-state",
    "input-required-result-capability-check", "input-required-result-ignore-extra-params",
    "input-required-result-validate-input",
]

# Every scenario of 0.1.16 `--suite all`, pending ones included (server-sse-polling needs resumption).
ALL_2025_0_1_16 = [
    "server-initialize", "logging-set-level", "ping", "completion-complete", "tools-list",
    "tools-call-simple-text", "tools-call-image", "tools-call-audio", "tools-call-embedded-resource",
    "tools-call-mixed-content", "tools-call-with-logging", "tools-call-error", "tools-call-with-progress",
    "tools-call-sampling", "tools-call-elicitation", "json-schema-2020-12", "elicitation-sep1034-defaults",
    "server-sse-polling", "server-sse-multiple-streams", "elicitation-sep1330-enums", "resources-list",
    "resources-read-text", "resources-read-binary", "resources-templates-read", "resources-subscribe",
    "resources-unsubscribe", "prompts-list", "prompts-get-simple", "prompts-get-with-args",
    "prompts-get-embedded-resource", "prompts-get-with-image", "dns-rebinding-protection",
]


def localhost(url: str) -> str:
    return url.replace("://127.0.0.1:", "://localhost:")


def run_suite(version: str, url: str, args: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run one suite invocation to completion; its output is saved next to the test's other files."""
    assert NODE.exists() and CONFORMANCE[version].exists(), "run tests/run.sh once to install the suites"
    command = [str(NODE), str(CONFORMANCE[version]), "server", "--url", url, *args]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=SUITE_TIMEOUT,
                               start_new_session=True, stdin=subprocess.DEVNULL)
    output = completed.stdout + completed.stderr
    (tmp_path / f"conformance-{version}-{'-'.join(a.strip('-') for a in args)}.txt").write_text(output)
    return completed.returncode, output


def summary(output: str) -> tuple[list[tuple[str, str, int, int]], tuple[int, int]]:
    """(mark, scenario, passed, failed) per scenario line, and the Total line, of the SUMMARY block."""
    block = output.split("=== SUMMARY ===", 1)
    assert len(block) == 2, "the suite printed no summary"
    lines = [(m, name, int(p), int(f)) for m, name, p, f in SUMMARY_LINE.findall(block[1])]
    total = TOTAL_LINE.search(block[1])
    assert total is not None, "the suite printed no Total line"
    return lines, (int(total.group(1)), int(total.group(2)))


@pytest.mark.timeout(300)
def test_suite_0_1_16_all_scenarios_pass(worker: str, tmp_path: Path) -> None:
    code, output = run_suite("0.1.16", localhost(worker), ["--suite", "all"], tmp_path)
    lines, (passed, failed) = summary(output)
    assert code == 0, output
    assert [name for _, name, _, _ in lines] == ALL_2025_0_1_16, output
    assert failed == 0 and passed == sum(p for _, _, p, _ in lines) and passed >= len(lines), output
    assert all(mark == "✓" and f == 0 for mark, _, _, f in lines), output


@pytest.mark.timeout(300)
def test_suite_0_2_0_requirements_2025_11_25_pass(worker: str, tmp_path: Path) -> None:
    code, output = run_suite("0.2.0", localhost(worker), ["--requirements", "2025-11-25"], tmp_path)
    lines, (passed, failed) = summary(output)
    assert code == 0, output
    assert failed == 0 and passed > 0, output
    assert len(lines) >= 30 and all(mark == "✓" and f == 0 for mark, _, _, f in lines), output


@pytest.mark.timeout(300)
def test_suite_0_2_0_requirements_2026_07_28_scored_scenarios_pass(worker: str, tmp_path: Path) -> None:
    code, output = run_suite("0.2.0", localhost(worker), ["--requirements", "2026-07-28"], tmp_path)
    assert_scored_2026_pass(code, output)


def assert_scored_2026_pass(code: int, output: str) -> None:
    """Exit 0 and every scored 2026-07-28 scenario (those listed before the unscored tasks-*) passed."""
    lines, _ = summary(output)
    assert code == 0, output
    first_task = next(i for i, (_, name, _, _) in enumerate(lines) if name.startswith("tasks-"))
    scored = lines[:first_task]
    assert [name for _, name, _, _ in scored] == SCORED_2026, output
    failing = [name for mark, name, _, f in scored if mark != "✓" or f != 0]
    assert failing == [], output
    assert all(p > 0 for _, _, p, _ in scored), output
