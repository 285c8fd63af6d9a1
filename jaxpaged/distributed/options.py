"""How many engine replicas and where they run (no heavy imports: the CLI reads them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas and where they run."""

    data_parallel_size: int
    """Engine replicas (vLLM's --data-parallel-size)."""
    ray_address: str | None = None
    """An existing Ray cluster to join; None: a local one (``ray.init()``)."""
    ping_interval_s: float = 2.0
    """How often the supervisor checks that each replica is alive."""

    def __post_init__(self) -> None:
        dp = self.data_parallel_size
        if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
            raise ValueError(f"data_parallel_size must be a positive integer, got {dp!r}")
