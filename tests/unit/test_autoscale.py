"""The autoscaler's policy (supervisor/autoscale.py), replayed over recorded load traces and fed by hand.

The traces were recorded from a live two-worker cluster (`mcpherd serve --workers 2`) driven by clients
calling the demo's CPU-bound `hash_work` tool on a new connection each time: once a second, the sum of
the workers' busy ratios as `mcpherd status` reported it (the demand, in workers) and the connections
waiting in the port's accept queues (/proc/net/tcp). The short non-zero queues are real: a new
connection waits a moment before a busy worker's loop accepts it, even far from saturation.

Replaying one: the simulated cluster has `workers` workers, each as busy as min(1, demand / workers),
and the policy's decision is applied at once, as the master's set_target does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from mcpherd.supervisor.autoscale import AutoscalePolicy, Decision, Measurement, ScaleState, decide, operator_floor

Trace = list[tuple[float, int]]  # (demand in workers, connections queued), once a second

# fmt: off
STEADY: Trace = [
    (0.0, 1), (0.99, 2), (1.24, 1), (1.26, 1), (1.31, 2), (1.35, 0), (1.24, 1), (1.35, 0), (1.33, 1), (1.27,
    0), (1.33, 0), (1.19, 0), (1.23, 1), (1.21, 0), (1.31, 0), (1.26, 0), (1.27, 1), (1.06, 0), (1.28, 0),
    (1.29, 0), (1.31, 0), (1.24, 0), (1.32, 0), (1.35, 0), (1.33, 1), (1.35, 0), (1.34, 1), (1.33, 0), (1.35,
    0), (1.33, 0), (1.36, 1), (1.32, 1), (1.33, 0), (1.36, 0), (1.31, 0), (1.38, 0), (1.36, 0), (1.38, 0),
    (1.29, 0), (1.28, 0), (1.41, 0), (1.37, 0), (1.34, 0), (1.34, 0), (1.35, 0), (1.27, 0), (1.28, 1), (1.31,
    1), (1.28, 0), (1.29, 0), (1.38, 0), (1.33, 0), (1.33, 0),
]
RAMP: Trace = [
    (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.4, 0), (0.85, 0), (0.79, 0), (0.81, 0),
    (0.84, 0), (1.07, 0), (1.1, 1), (1.16, 0), (1.14, 0), (1.19, 1), (1.34, 0), (1.31, 0), (1.23, 0), (1.18,
    0), (1.31, 1), (1.38, 0), (1.38, 0), (1.29, 0), (1.24, 0), (1.45, 1), (1.46, 2), (1.48, 1), (1.5, 0),
    (1.43, 2), (1.38, 1), (1.52, 0), (1.62, 4), (1.38, 2), (1.5, 0), (1.54, 0), (1.49, 3), (1.37, 1), (1.51,
    0), (1.44, 0), (1.49, 0), (1.49, 1), (1.52, 1), (1.44, 0), (1.47, 1), (1.44, 1), (1.42, 1), (1.32, 2),
    (1.23, 2), (1.15, 1), (1.22, 0), (1.2, 0), (1.14, 0), (1.13, 0), (1.01, 1), (1.07, 0), (1.07, 1), (0.82,
    0), (0.9, 0), (0.89, 0), (0.85, 0), (0.69, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0),
    (0.01, 0), (0.0, 0), (0.0, 0),
]
SPIKE: Trace = [
    (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.01, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 2),
    (0.27, 2), (0.91, 1), (0.82, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0),
    (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0,
    0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0),
]
SAWTOOTH: Trace = [
    (0.0, 0), (0.01, 0), (0.0, 1), (0.41, 0), (0.8, 1), (0.7, 2), (1.09, 2), (0.29, 2), (0.78, 0), (0.05, 0),
    (0.05, 0), (0.74, 0), (0.89, 0), (1.35, 1), (1.29, 2), (1.48, 3), (1.13, 2), (0.89, 0), (0.0, 0), (0.58,
    0), (1.17, 0), (1.22, 0), (1.29, 0), (1.34, 1), (1.49, 3), (1.53, 2), (1.43, 0), (0.11, 0), (0.07, 0),
    (1.16, 0), (1.23, 1), (1.49, 1), (1.27, 1), (1.18, 1), (1.11, 2), (0.6, 0), (0.01, 0), (0.46, 0), (1.23,
    1), (1.24, 0), (1.4, 0), (1.24, 1), (1.34, 2), (1.19, 3), (0.28, 0), (0.0, 0), (0.89, 0), (1.19, 0),
    (1.39, 2), (1.4, 0), (1.37, 2), (1.49, 2), (1.15, 0),
]
# fmt: on

DEFAULTS = AutoscalePolicy()
# The recorded traces are one to two minutes long: these windows are the defaults divided by about five.
FAST = AutoscalePolicy(min_workers=1, up_after_s=1.0, down_after_s=6.0, cooldown_s=6.0, backlog_cooldown_s=1.0)


@dataclass
class Replay:
    decisions: list[tuple[float, Decision]]
    counts: list[int]  # the worker count after each second

    @property
    def directions(self) -> list[str]:
        return [d.direction for _, d in self.decisions]

    @property
    def reversals(self) -> int:
        return sum(1 for a, b in zip(self.directions, self.directions[1:]) if a != b)


def replay(trace: Trace, policy: AutoscalePolicy, workers: int, cpus: int = 4) -> Replay:
    state, decisions, counts = ScaleState(), [], []
    for second, (demand, queued) in enumerate(trace):
        busy = tuple(min(1.0, demand / workers) for _ in range(workers))
        decision, state = decide(Measurement(float(second), workers, busy, queued), state, policy, cpus)
        if decision.direction != "hold":
            decisions.append((float(second), decision))
            workers = decision.target
        counts.append(workers)
    return Replay(decisions, counts)


def looped(trace: Trace, times: int) -> Trace:
    return trace * times


# -- the recorded traces -----------------------------------------------------------------------------
@pytest.mark.parametrize("load", [0.5, 0.75, 1.0, 1.5])
@pytest.mark.parametrize(("policy", "start"), [(DEFAULTS, 2), (DEFAULTS, 3), (DEFAULTS, 4), (FAST, 1), (FAST, 2),
                                               (FAST, 3), (FAST, 4)], ids=lambda v: str(v) if isinstance(v, int) else
                         "defaults" if v is DEFAULTS else "fast")
def test_steady_load_settles_once_and_never_oscillates(load: float, start: int, policy: AutoscalePolicy) -> None:
    """The recording, and the same recording at a fraction or a multiple of its load (its queue kept)."""
    steady = [(demand * load, queued) for demand, queued in STEADY]
    result = replay(looped(steady, 6), policy, start)  # five minutes of the same load
    assert result.reversals == 0, result.decisions
    settled = result.counts[-1]
    assert result.counts[-len(STEADY):] == [settled] * len(STEADY)  # no change in the last minute
    mean = sum(d for d, _ in steady) / len(steady) / settled
    assert policy.scale_down_at < mean < policy.scale_up_at or settled in (policy.min_workers, 4), (settled, mean)


def test_ramp_from_idle_to_saturation_and_back_scales_up_then_down_with_at_most_one_reversal() -> None:
    result = replay(RAMP, FAST, workers=1, cpus=2)
    assert result.directions[:1] == ["up"] and result.reversals <= 1, result.decisions
    assert max(result.counts) == 2 and result.counts[-1] == 1, result.counts
    peak = max(range(len(RAMP)), key=lambda i: RAMP[i][0])
    assert result.counts[peak] == 2


def test_ramp_over_four_cpus_moves_one_worker_at_a_time_and_returns_to_the_minimum() -> None:
    stretched = [sample for sample in RAMP for _ in range(3)]  # the same ramp, three times slower
    result = replay(stretched, FAST, workers=1, cpus=4)
    assert result.reversals <= 1, result.decisions
    assert all(abs(b - a) <= 1 for a, b in zip(result.counts, result.counts[1:]))
    assert result.counts[-1] == 1


def test_a_spike_shorter_than_up_after_s_without_a_backlog_does_not_scale() -> None:
    quiet_spike = [(demand, 0) for demand, _ in SPIKE]
    assert replay(quiet_spike, DEFAULTS, workers=2).decisions == []


def test_a_spike_that_backs_up_the_accept_queue_scales_up_at_once_and_back_down_once() -> None:
    backed_up = [(demand, queued + 5 if demand > 0.5 else queued) for demand, queued in SPIKE]
    first = next(i for i, (demand, _) in enumerate(backed_up) if demand > 0.5)
    result = replay(backed_up, FAST, workers=1, cpus=2)
    assert result.decisions[0][0] == first and result.directions[0] == "up"
    assert "accept queue" in result.decisions[0][1].reason
    assert result.reversals <= 1 and result.counts[-1] == 1, result.decisions


@pytest.mark.parametrize("policy", [DEFAULTS, FAST], ids=["defaults", "fast"])
def test_sawtooth_changes_are_spaced_by_the_cooldowns(policy: AutoscalePolicy) -> None:
    result = replay(looped(SAWTOOTH, 5), policy, workers=2)
    for (before, _), (at, decision) in zip(result.decisions, result.decisions[1:]):
        backlog = "accept queue" in decision.reason
        assert at - before >= (policy.backlog_cooldown_s if backlog else policy.cooldown_s), result.decisions
    assert result.reversals <= len(SAWTOOTH) * 5 / (2 * policy.cooldown_s)


def test_sawtooth_with_the_default_windows_follows_the_peaks_up_and_never_back() -> None:
    """Its troughs last seconds, far less than down_after_s: capacity for the peaks is kept."""
    result = replay(looped(SAWTOOTH, 5), DEFAULTS, workers=2)
    assert set(result.directions) == {"up"} and result.counts[-1] == 4, result.decisions
    assert result.decisions[-1][0] < len(SAWTOOTH)  # settled within the first period


# -- the rules, one at a time ------------------------------------------------------------------------
def measure(at: float, workers: int, busy: float, queued: int = 0) -> Measurement:
    return Measurement(at, workers, (busy,) * workers, queued)


def run(samples: list[Measurement], policy: AutoscalePolicy = DEFAULTS, state: ScaleState | None = None,
        cpus: int = 4) -> list[Decision]:
    state = state or ScaleState()
    decisions = []
    for sample in samples:
        decision, state = decide(sample, state, policy, cpus)
        decisions.append(decision)
    return decisions


def test_busy_at_or_above_scale_up_at_for_up_after_s_adds_one_worker() -> None:
    decisions = run([measure(t, 2, 0.85) for t in range(7)])
    assert [d.direction for d in decisions] == ["hold"] * 5 + ["up", "hold"]
    assert decisions[5].target == 3 and "0.85 >= 0.8 for 5s" in decisions[5].reason


def test_a_dip_below_scale_up_at_restarts_the_up_window() -> None:
    busy = [0.9, 0.9, 0.9, 0.9, 0.7, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    decisions = run([measure(t, 2, b) for t, b in enumerate(busy)])
    assert [i for i, d in enumerate(decisions) if d.direction == "up"] == [10]


def test_busy_at_or_below_scale_down_at_for_down_after_s_removes_one_worker() -> None:
    decisions = run([measure(t, 3, 0.1) for t in range(32)])
    assert [i for i, d in enumerate(decisions) if d.direction == "down"] == [30] and decisions[30].target == 2


def test_between_the_thresholds_nothing_ever_changes() -> None:
    assert {d.direction for d in run([measure(t, 3, b) for t in range(600) for b in (0.31, 0.79)])} == {"hold"}


def test_cooldown_blocks_the_next_change_and_a_backlog_waits_only_backlog_cooldown_s() -> None:
    decisions = run([measure(t, 2 if t <= 5 else 3, 0.95) for t in range(40)])
    ups = [i for i, d in enumerate(decisions) if d.direction == "up"]
    assert ups == [5, 35]  # the second one 30 s (cooldown_s) after the first
    backlog = run([measure(t, 2 if t == 0 else 3, 0.5, queued=4) for t in range(4)])
    assert [d.direction for d in backlog] == ["up", "hold", "up", "hold"] and "4 connections" in backlog[0].reason


def test_the_count_stays_between_min_workers_and_the_ceiling() -> None:
    assert run([measure(0, 1, 0.0)])[0] == Decision(2, "up", "below the floor of 2")
    assert run([measure(0, 6, 0.0)])[0] == Decision(4, "down", "above the ceiling of 4")
    assert [d.direction for d in run([measure(t, 4, 1.0, queued=9) for t in range(60)])] == ["hold"] * 60
    assert [d.direction for d in run([measure(t, 2, 0.0) for t in range(100)])] == ["hold"] * 100
    capped = AutoscalePolicy(max_workers=3)
    assert run([measure(0, 3, 1.0, queued=9)], capped, cpus=8)[0].direction == "hold"
    assert run([measure(0, 3, 1.0, queued=9)], cpus=8)[0].target == 4  # max_workers 0: the CPUs given


def test_an_operator_scale_is_the_floor_for_one_cooldown() -> None:
    state = operator_floor(ScaleState(), 4, 100.0, DEFAULTS)
    idle = run([measure(100.0 + t, 4, 0.0) for t in range(0, 61)], state=state)
    downs = [t for t, d in enumerate(idle) if d.direction == "down"]
    assert downs and downs[0] >= DEFAULTS.cooldown_s  # not undone before the cooldown
    busy = run([measure(100.0 + t, 4, 0.95) for t in range(0, 40)], state=state, cpus=8)
    assert [t for t, d in enumerate(busy) if d.direction == "up"] == [30]  # nor grown within it


def test_decide_is_a_pure_function() -> None:
    state = ScaleState(above_since=3.0)
    sample = measure(10.0, 2, 0.9, queued=1)
    assert decide(sample, state, DEFAULTS, 4) == decide(sample, state, DEFAULTS, 4)
    assert state == ScaleState(above_since=3.0)


@pytest.mark.parametrize("bad", [dict(scale_up_at=0.3, scale_down_at=0.3), dict(scale_up_at=1.2),
                                 dict(min_workers=0), dict(min_workers=3, max_workers=2), dict(cooldown_s=-1)])
def test_impossible_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AutoscalePolicy(**bad)  # type: ignore[arg-type]


def test_the_replay_model_is_sound() -> None:
    assert math.isclose(sum(d for d, _ in STEADY) / len(STEADY), 1.3, abs_tol=0.15)
    assert max(d for d, _ in RAMP) > 1.5 and RAMP[0][0] < 0.1 and RAMP[-1][0] < 0.1
