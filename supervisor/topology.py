"""Which CPU each worker slot is pinned to: one worker per physical core first, then SMT siblings.

On a Ryzen 7 7800X3D (8 cores x 2 threads, siblings cpuN and cpuN+8) eight workers land on cpu0..7,
one per core, and only the ninth onward shares a core. `placement` is a pure function of the
topology and the CPUs this process may use (taskset, cpusets, containers), so it is tested against
recorded topologies; `read_topology` reads the live one from sysfs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True, slots=True)
class Cpu:
    cpu: int
    package: int
    core: int  # core id within its package; SMT siblings share (package, core)


def read_topology(root: Path = SYSFS_CPU) -> list[Cpu]:
    cpus = []
    for entry in sorted(root.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        topology = entry / "topology"
        if not topology.is_dir():
            continue
        cpu = int(entry.name[3:])
        cpus.append(Cpu(cpu, _read_int(topology / "physical_package_id", 0), _read_int(topology / "core_id", cpu)))
    return cpus


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def allowed_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


def placement(topology: list[Cpu], allowed: set[int]) -> list[int]:
    """The CPUs in the order slots take them: first thread of every core, then second threads, ..."""
    by_core: dict[tuple[int, int], list[int]] = {}
    known = {c.cpu for c in topology}
    for cpu in sorted(topology, key=lambda c: c.cpu):
        if cpu.cpu in allowed:
            by_core.setdefault((cpu.package, cpu.core), []).append(cpu.cpu)
    for number in sorted(allowed - known):  # no topology (containers without sysfs): one core each
        by_core[(-1, number)] = [number]
    cores = sorted(by_core.values(), key=lambda threads: threads[0])
    order: list[int] = []
    depth = max((len(threads) for threads in cores), default=0)
    for rank in range(depth):
        order.extend(threads[rank] for threads in cores if rank < len(threads))
    return order


def cpu_for_slot(order: list[int], slot: int) -> int:
    """More slots than CPUs wrap around the same order (still one core before its sibling)."""
    return order[slot % len(order)]
