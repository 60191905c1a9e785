"""The Cluster interface of supervisor/metrics.py's ClusterMetrics, as plain data: the master without
processes, for the metrics unit tests."""

from __future__ import annotations

from mcpherd.supervisor.metrics import LiveLane


class FakeCluster:
    def __init__(self) -> None:
        self.lanes: list[LiveLane] = []
        self.restarts = 0
        self.reloads = 0

    def live_lanes(self) -> list[LiveLane]:
        return list(self.lanes)

    def worker_count(self) -> int:
        return len(self.lanes)

    def restarts_total(self) -> int:
        return self.restarts

    def reloads_total(self) -> int:
        return self.reloads

    def scale_events(self) -> dict[str, int]:
        return {"up": 1, "down": 0}

    def restart_latency_s(self) -> float:
        return 0.0

    def redis_up(self) -> bool | None:
        return None

    def redis_ping_s(self) -> float | None:
        return None

    def alerts_active(self) -> dict[str, str]:
        return {}
