"""The autoscaler's policy: a pure function (measurement, state, policy) -> (decision, next state).

Inputs, sampled by the master about once a second: each worker's busy ratio (the share of wall time
its event loop spent handling requests, measured by the worker itself), the connections waiting in
the slots' accept queues, and open streams. Rules:

- an accept-queue backlog (connections the workers are not taking fast enough) scales up at once;
- a mean busy ratio at or above `scale_up_at` for `up_after_s` scales up by one;
- a mean busy ratio at or below `scale_down_at` for `down_after_s` scales down by one;
- nothing changes within `cooldown_s` of the previous change (except a backlog, after `backlog_cooldown_s`),
  and the gap between the two thresholds is the hysteresis;
- a change is made only when the opposite rule would not undo it at the same load (the mean busy ratio
  projected onto the new count stays inside the thresholds): a connection caught waiting in an accept
  queue is common far from saturation, and without this rule it adds a worker that the idle rule then
  removes, over and over. With it, steady load never oscillates;
- the count stays within [max(min_workers, floor), max_workers]; `mcpherd scale N` sets the floor for
  the next cooldown_s so an operator's decision is not undone at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgspec


class AutoscalePolicy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    min_workers: int = 2
    max_workers: int = 0  # 0: the CPUs this process may use
    scale_up_at: float = 0.80
    scale_down_at: float = 0.30
    up_after_s: float = 5.0
    down_after_s: float = 30.0
    cooldown_s: float = 30.0
    backlog_cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale_down_at < self.scale_up_at <= 1.0:
            raise ValueError("need 0 <= scale_down_at < scale_up_at <= 1")
        if self.min_workers < 1 or (self.max_workers and self.max_workers < self.min_workers):
            raise ValueError("need 1 <= min_workers <= max_workers")
        if min(self.up_after_s, self.down_after_s, self.cooldown_s, self.backlog_cooldown_s) < 0:
            raise ValueError("durations must be >= 0")


@dataclass(frozen=True, slots=True)
class Measurement:
    at: float  # monotonic seconds
    workers: int
    busy: tuple[float, ...]  # per live worker, 0..1
    queued: int = 0  # connections waiting in accept queues, all slots


@dataclass(frozen=True, slots=True)
class ScaleState:
    above_since: float | None = None
    below_since: float | None = None
    last_change_at: float = float("-inf")
    floor: int = 0
    floor_until: float = float("-inf")


@dataclass(frozen=True, slots=True)
class Decision:
    target: int
    direction: str  # "up", "down" or "hold"
    reason: str


def decide(m: Measurement, state: ScaleState, policy: AutoscalePolicy, max_workers: int) -> tuple[Decision, ScaleState]:
    ceiling = policy.max_workers or max_workers
    floor = max(policy.min_workers, state.floor if m.at < state.floor_until else 0)
    mean = sum(m.busy) / len(m.busy) if m.busy else 0.0
    hold = Decision(m.workers, "hold", f"mean busy {mean:.2f}")
    # The mean busy ratio the same load would give one worker more / one fewer.
    with_more, with_fewer = mean * m.workers / (m.workers + 1), mean * m.workers / max(1, m.workers - 1)
    if m.workers < floor:
        return Decision(floor, "up", f"below the floor of {floor}"), replace(state, last_change_at=m.at)
    if m.workers > ceiling:
        return Decision(ceiling, "down", f"above the ceiling of {ceiling}"), replace(state, last_change_at=m.at)
    if m.queued > 0 and m.workers < ceiling and m.at - state.last_change_at >= policy.backlog_cooldown_s \
            and with_more > policy.scale_down_at:
        return (Decision(m.workers + 1, "up", f"{m.queued} connections waiting in accept queues"),
                ScaleState(None, None, m.at, state.floor, state.floor_until))
    above_since = (state.above_since if state.above_since is not None else m.at) if mean >= policy.scale_up_at else None
    below_since = (state.below_since if state.below_since is not None else m.at) if mean <= policy.scale_down_at else None
    state = replace(state, above_since=above_since, below_since=below_since)
    cooled = m.at - state.last_change_at >= policy.cooldown_s
    if above_since is not None and m.at - above_since >= policy.up_after_s and cooled and m.workers < ceiling \
            and with_more > policy.scale_down_at:
        reason = f"mean busy {mean:.2f} >= {policy.scale_up_at:g} for {m.at - above_since:.0f}s"
        return Decision(m.workers + 1, "up", reason), ScaleState(None, None, m.at, state.floor, state.floor_until)
    if below_since is not None and m.at - below_since >= policy.down_after_s and cooled and m.workers > floor \
            and with_fewer < policy.scale_up_at:
        reason = f"mean busy {mean:.2f} <= {policy.scale_down_at:g} for {m.at - below_since:.0f}s"
        return Decision(m.workers - 1, "down", reason), ScaleState(None, None, m.at, state.floor, state.floor_until)
    return hold, state


def operator_floor(state: ScaleState, workers: int, now: float, policy: AutoscalePolicy) -> ScaleState:
    """`mcpherd scale N` while autoscaling: N is the floor for the next cooldown."""
    return replace(state, floor=workers, floor_until=now + policy.cooldown_s, last_change_at=now)
