"""CPU placement (supervisor/topology.py) against recorded topologies: one worker per physical core
first, then SMT siblings, inside whatever CPU set the master may use."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mcpherd.supervisor.topology import Cpu, cpu_for_slot, placement, read_topology

# AMD Ryzen 7 7800X3D: 8 cores x 2 threads, one package; the siblings of core N are cpuN and cpuN+8.
RYZEN_7800X3D = [Cpu(cpu, 0, cpu % 8) for cpu in range(16)]
# A typical Intel numbering: siblings are adjacent (cpu0/cpu1 share core 0, ...).
INTEL_ADJACENT = [Cpu(cpu, 0, cpu // 2) for cpu in range(8)]
TWO_CORES = [Cpu(0, 0, 0), Cpu(1, 0, 1)]
ONE_CORE = [Cpu(0, 0, 0)]
# Two sockets: core ids restart at 0 on the second package, so (package, core) names a core.
TWO_PACKAGES = [Cpu(0, 0, 0), Cpu(1, 0, 1), Cpu(2, 1, 0), Cpu(3, 1, 1),
                Cpu(4, 0, 0), Cpu(5, 0, 1), Cpu(6, 1, 0), Cpu(7, 1, 1)]


def test_ryzen_7800x3d_takes_every_core_before_any_sibling() -> None:
    order = placement(RYZEN_7800X3D, set(range(16)))
    assert order == list(range(16))
    assert order[:8] == [0, 1, 2, 3, 4, 5, 6, 7]  # eight workers: one per physical core, no sibling shared
    assert all(order[8 + n] == order[n] + 8 for n in range(8))  # the ninth worker onward: siblings, in core order


def test_adjacent_sibling_numbering_alternates_cores_first() -> None:
    assert placement(INTEL_ADJACENT, set(range(8))) == [0, 2, 4, 6, 1, 3, 5, 7]


def test_two_cores_and_one_core() -> None:
    assert placement(TWO_CORES, {0, 1}) == [0, 1]
    assert placement(ONE_CORE, {0}) == [0]


def test_two_packages_with_the_same_core_ids_are_different_cores() -> None:
    assert placement(TWO_PACKAGES, set(range(8))) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_a_cpuset_with_holes_uses_only_its_cpus_and_still_spreads_over_cores() -> None:
    # taskset -c 1,3,9,12 on the Ryzen: core 1 has both threads (1, 9), cores 3 and 4 one each.
    assert placement(RYZEN_7800X3D, {1, 3, 9, 12}) == [1, 3, 12, 9]
    # Only second threads allowed: each is its core's first allowed thread.
    assert placement(RYZEN_7800X3D, {10, 11, 15}) == [10, 11, 15]
    assert placement(RYZEN_7800X3D, {5}) == [5]


def test_cpus_missing_from_sysfs_count_as_one_core_each() -> None:
    assert placement([], {0, 1, 2}) == [0, 1, 2]  # a container without /sys/devices/system/cpu
    assert placement(TWO_CORES, {0, 1, 7}) == [0, 1, 7]


def test_more_slots_than_cpus_wrap_around_the_same_order() -> None:
    order = placement(RYZEN_7800X3D, {1, 3, 9, 12})
    assert [cpu_for_slot(order, slot) for slot in range(9)] == [1, 3, 12, 9, 1, 3, 12, 9, 1]


@given(st.sets(st.integers(0, 15), min_size=1))
def test_any_cpuset_gives_each_allowed_cpu_once_with_first_threads_before_second(allowed: set[int]) -> None:
    order = placement(RYZEN_7800X3D, allowed)
    assert sorted(order) == sorted(allowed)
    first_threads = [cpu for cpu in order if cpu < 8 or cpu - 8 not in allowed]  # the first allowed thread of its core
    assert order[: len(first_threads)] == first_threads


def record_sysfs(root: Path, topology: list[Cpu], offline: tuple[int, ...] = ()) -> Path:
    """A /sys/devices/system/cpu tree as the kernel lays it out (offline CPUs have no topology/)."""
    for cpu in topology:
        entry = root / f"cpu{cpu.cpu}"
        entry.mkdir(parents=True)
        if cpu.cpu not in offline:
            (entry / "topology").mkdir()
            (entry / "topology" / "physical_package_id").write_text(f"{cpu.package}\n")
            (entry / "topology" / "core_id").write_text(f"{cpu.core}\n")
    for other in ("cpufreq", "cpuidle", "online", "possible"):  # siblings of the cpuN entries
        (root / other).mkdir(exist_ok=True)
    return root


def test_read_topology_parses_a_recorded_sysfs_tree_in_cpu_order(tmp_path: Path) -> None:
    root = record_sysfs(tmp_path / "cpu", RYZEN_7800X3D)
    assert read_topology(root) == RYZEN_7800X3D  # cpu10 sorts after cpu9, not after cpu1


def test_read_topology_skips_offline_cpus_and_placement_still_uses_allowed_ones(tmp_path: Path) -> None:
    root = record_sysfs(tmp_path / "cpu", RYZEN_7800X3D, offline=(3, 11))
    topology = read_topology(root)
    assert [c.cpu for c in topology] == [c for c in range(16) if c not in (3, 11)]
    assert placement(topology, {0, 8, 2}) == [0, 2, 8]


def test_read_topology_defaults_unreadable_files(tmp_path: Path) -> None:
    root = record_sysfs(tmp_path / "cpu", TWO_CORES)
    (root / "cpu1" / "topology" / "core_id").write_text("garbage\n")
    (root / "cpu1" / "topology" / "physical_package_id").unlink()
    assert read_topology(root) == [Cpu(0, 0, 0), Cpu(1, 0, 1)]  # package 0, core id = the cpu number


def test_the_live_topology_orders_this_machines_allowed_cpus() -> None:
    import os

    allowed = os.sched_getaffinity(0)
    assert sorted(placement(read_topology(), allowed)) == sorted(allowed)
