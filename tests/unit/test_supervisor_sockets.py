"""supervisor/sockets.py as pure logic: the cBPF steering program, run by a small interpreter of the
classic BPF instructions it uses, and the listen-drop counters parsed from a recorded /proc file.
The same program attached to a real SO_REUSEPORT group: tests/integration/test_supervisor_steering.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mcpherd.shared.netstat import listen_drops
from mcpherd.supervisor.sockets import steering_program

# linux/filter.h: BPF_LD|BPF_W|BPF_ABS, BPF_ALU|BPF_MOD|BPF_K, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
LD_W_ABS, ALU_MOD_K, JEQ_K, RET_K = 0x20, 0x94, 0x15, 0x06
SKF_AD_RANDOM = 0xFFFFF000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: "load a random u32"
MAX_INSNS = 4096  # BPF_MAXINSNS: the kernel refuses longer classic programs


def run_cbpf(program: list[tuple[int, int, int, int]], random_u32: int) -> int:
    """Execute a classic BPF program the way the kernel would, for the instructions steering uses."""
    accumulator, pc = 0, 0
    for _ in range(len(program)):  # classic BPF only jumps forward: at most one pass
        code, jt, jf, k = program[pc]
        if code == LD_W_ABS:
            assert k == SKF_AD_RANDOM, "the only load steering may do is the random extension"
            accumulator = random_u32
        elif code == ALU_MOD_K:
            assert k != 0, "the kernel rejects a modulo by a zero constant"
            accumulator %= k
        elif code == JEQ_K:
            pc += jt if accumulator == k else jf
        elif code == RET_K:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
        pc += 1
    raise AssertionError("the program ran off its end without returning")


@pytest.mark.parametrize("live", [[0], [1, 3], [0, 1, 2, 3], [2, 0], [5, 7, 9, 11, 13, 15, 1], list(range(64))])
def test_every_random_value_selects_a_live_socket_and_each_equally_often(live: list[int]) -> None:
    program = steering_program(live)
    assert len(program) <= MAX_INSNS
    chosen = Counter(run_cbpf(program, value) for value in range(len(live) * 50))
    assert chosen == {index: 50 for index in live}


def test_the_whole_u32_range_selects_live_sockets_only() -> None:
    live = [1, 4, 6]
    program = steering_program(live)
    for value in (0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 3, 2**32 - 2, 2**32 - 1):
        assert run_cbpf(program, value) == live[value % 3]


def test_the_program_shape_is_load_modulo_then_one_compare_and_return_per_live_slot() -> None:
    program = steering_program([3, 1])
    assert program == [(LD_W_ABS, 0, 0, SKF_AD_RANDOM), (ALU_MOD_K, 0, 0, 2),
                       (JEQ_K, 0, 1, 0), (RET_K, 0, 0, 3),
                       (JEQ_K, 0, 1, 1), (RET_K, 0, 0, 1),
                       (RET_K, 0, 0, 3)]


def test_steering_needs_a_live_slot() -> None:
    with pytest.raises(ValueError, match="at least one live slot"):
        steering_program([])


def test_1024_slots_fit_the_kernels_instruction_limit() -> None:
    assert len(steering_program(list(range(1024)))) <= MAX_INSNS  # workers may be configured up to 1024


NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPBacklogDrop
TcpExt: 0 0 17 23 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


def test_listen_drops_reads_the_tcpext_counters(tmp_path: Path) -> None:
    (tmp_path / "netstat").write_text(NETSTAT)
    assert listen_drops(str(tmp_path / "netstat")) == (17, 23)


def test_listen_drops_is_zero_without_the_file_or_the_counters(tmp_path: Path) -> None:
    assert listen_drops(str(tmp_path / "absent")) == (0, 0)
    (tmp_path / "netstat").write_text("IpExt: InNoRoutes\nIpExt: 0\n")
    assert listen_drops(str(tmp_path / "netstat")) == (0, 0)
