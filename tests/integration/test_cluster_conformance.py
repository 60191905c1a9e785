"""The official MCP conformance suites, unchanged, against a 4-worker cluster on this 2-CPU machine.

Every new TCP connection of the suite's client lands on a random worker of the SO_REUSEPORT group, so a
session, its GET stream, a sampling answer and a resumption routinely span workers: the same scenarios
that a single worker passes (test_conformance.py) must pass when the cluster serves them. Each test
also checks that the traffic really was spread over several workers, or the run would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Cluster
from test_conformance import ALL_2025_0_1_16, assert_scored_2026_pass, localhost, run_suite, summary


def assert_served_by_several_workers(cluster: Cluster, before: dict[int, int]) -> None:
    """The run was spread over workers (none of which died meanwhile), so its sessions spanned them.

    The suite's client keeps connections alive, so a run opens few of them and a worker may by chance
    receive none; the deterministic cross-worker cases are in test_cluster_routing.py.
    """
    after = {w["pid"]: w["requests_total"] for w in cluster.serving()}
    assert after.keys() == before.keys(), "a worker was replaced during the run"
    served = {pid: after[pid] - before[pid] for pid in after}
    assert sum(1 for count in served.values() if count > 0) >= 2, f"requests per worker: {served}"
    assert all(w["restarts"] == 0 for w in cluster.status()["workers"])


def requests_by_pid(cluster: Cluster) -> dict[int, int]:
    return {w["pid"]: w["requests_total"] for w in cluster.serving()}


@pytest.mark.timeout(300)
def test_suite_0_1_16_all_scenarios_pass_on_a_cluster(cluster: Cluster, tmp_path: Path) -> None:
    before = requests_by_pid(cluster)
    code, output = run_suite("0.1.16", localhost(cluster.url), ["--suite", "all"], tmp_path)
    lines, (passed, failed) = summary(output)
    assert code == 0, output
    assert [name for _, name, _, _ in lines] == ALL_2025_0_1_16, output
    assert failed == 0 and passed == sum(p for _, _, p, _ in lines) and passed >= len(lines), output
    assert all(mark == "✓" and f == 0 for mark, _, _, f in lines), output
    assert_served_by_several_workers(cluster, before)


@pytest.mark.timeout(300)
def test_suite_0_2_0_requirements_2025_11_25_pass_on_a_cluster(cluster: Cluster, tmp_path: Path) -> None:
    before = requests_by_pid(cluster)
    code, output = run_suite("0.2.0", localhost(cluster.url), ["--requirements", "2025-11-25"], tmp_path)
    lines, (passed, failed) = summary(output)
    assert code == 0, output
    assert failed == 0 and passed > 0, output
    assert len(lines) >= 30 and all(mark == "✓" and f == 0 for mark, _, _, f in lines), output
    assert_served_by_several_workers(cluster, before)


@pytest.mark.timeout(300)
def test_suite_0_2_0_requirements_2026_07_28_scored_scenarios_pass_on_a_cluster(cluster: Cluster,
                                                                                 tmp_path: Path) -> None:
    before = requests_by_pid(cluster)
    code, output = run_suite("0.2.0", localhost(cluster.url), ["--requirements", "2026-07-28"], tmp_path)
    assert_scored_2026_pass(code, output)
    assert_served_by_several_workers(cluster, before)
