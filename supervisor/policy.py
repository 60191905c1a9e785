"""Pure supervision policies: functions of (history, clock) -> decision, tested without processes.

Restart intensity follows Erlang/OTP: more than `max_restarts` restarts within `window_s` seconds on
one slot means the code is broken, not unlucky. Then the slot backs off exponentially instead of
forking in a hot loop; when every slot is backing off the master gives up and exits non-zero, so the
supervisor above it (systemd) decides what happens next.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Intensity:
    max_restarts: int = 5
    window_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RestartDecision:
    delay_s: float  # 0: restart now
    tripped: bool  # intensity exceeded: the slot is in back-off
    reason: str


def record_restart(history: deque[float], now: float, window_s: float) -> None:
    """Remember a restart; forget the ones older than the window (bounded memory per slot)."""
    history.append(now)
    while history and now - history[0] > window_s:
        history.popleft()


def restart_decision(history: deque[float], now: float, policy: Intensity, strikes: int) -> RestartDecision:
    """`history`: restart times on this slot (already including this one); `strikes`: consecutive
    trips so far, which doubles the back-off each time."""
    recent = sum(1 for t in history if now - t <= policy.window_s)
    if recent <= policy.max_restarts:
        return RestartDecision(0.0, False, f"{recent} restarts in {policy.window_s:g}s")
    delay = min(policy.backoff_max_s, policy.backoff_initial_s * (2 ** strikes))
    return RestartDecision(delay, True, f"{recent} restarts in {policy.window_s:g}s exceeds "
                                        f"{policy.max_restarts}: backing off {delay:g}s")


def recycle_limit(max_requests: int, jitter: int, rng: random.Random) -> int:
    """Per-worker request limit; jitter spreads recycling so workers never restart all at once."""
    if max_requests <= 0:
        return 0
    return max_requests + (rng.randint(0, jitter) if jitter > 0 else 0)
