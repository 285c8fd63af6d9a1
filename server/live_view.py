"""The live view of the engine behind the page's pool grid: a JSON snapshot of the KV block pool,
the running and waiting requests, and step time and batch size over the last minute.

The engine thread owns a ``LiveView``: after each step it calls ``record_step`` (O(1): one
per-second bin updated) and ``maybe_publish``, which builds a new snapshot at most every
``interval_s`` seconds (and whenever the engine goes idle, so that the view ends on the freed
pool). Building one is O(num_blocks) in numpy (``block_states``, over the pool's flat mirrors of
its ref counts) plus O(running requests) in Python; ``bench/live_view.py`` measures it. The
snapshot is a plain dict, replaced (never mutated) by the engine thread, so ``GET /engine/state``
reads the latest one from the event loop with no lock.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from jaxpaged.core.block_manager import BlockPool
from jaxpaged.core.scheduler import Scheduler

# A block's state (the page's colours), in increasing "busyness".
BLOCK_FREE = 0  # allocatable, holds nothing reusable
BLOCK_CACHED = 1  # allocatable, but its K/V stay in the prefix cache until evicted
BLOCK_IN_USE = 2  # in one sequence's block table
BLOCK_SHARED = 3  # in several block tables (prefix-cache hits, n > 1, beams)
BLOCK_STATE_NAMES = ("free", "cached", "in_use", "shared")

# The page draws at most this many cells; a bigger pool puts several blocks in one cell.
MAX_CELLS = 4096
# Running requests listed by name (the count is always exact).
MAX_LISTED_REQUESTS = 32


@dataclasses.dataclass
class _SecondBin:
    """The steps that ended within one wall-clock second."""

    second: int
    steps: int = 0
    step_s: float = 0.0  # summed
    batch: int = 0  # summed running requests


def block_states(pool: BlockPool) -> np.ndarray:
    """Every block's state (``BLOCK_FREE`` .. ``BLOCK_SHARED``), uint8 [num_blocks], from views
    (no copies) of the pool's ref-count and hash mirrors; block 0 (the null block) reads free."""
    refs = np.frombuffer(pool.ref_cnts, dtype=np.intc)  # [num_blocks]
    hashed = np.frombuffer(pool.hashed, dtype=np.uint8)  # [num_blocks]
    held = np.minimum(refs, 2).astype(np.uint8)  # [num_blocks] 0, 1 or 2 (= 2 or more)
    # NOTE: relies on the codes' order: in use = 1 + 1, shared = 2 + 1, else free 0 / cached 1
    return np.where(held > 0, held + 1, hashed)


def pool_cells(states: np.ndarray, max_cells: int = MAX_CELLS) -> tuple[str, int]:
    """The allocatable blocks' states (block 0 left out) as one digit per cell, and the blocks per
    cell. A cell of several blocks shows its busiest block (shared > in use > cached > free), so
    that a nearly empty big pool still shows its few used blocks.

    ``states``: uint8 [num_blocks], from ``block_states``.
    """
    blocks = states[1:]  # [num_blocks - 1]
    per_cell = max(1, -(-len(blocks) // max_cells))
    padded = np.zeros(-(-len(blocks) // per_cell) * per_cell, np.uint8)  # [cells * per_cell]
    padded[:len(blocks)] = blocks
    # NOTE: a strided maximum per offset in the cell (per_cell numpy calls over num_cells
    # elements) is several times faster than reshape(-1, per_cell).max(axis=1) for small cells
    cells = padded[0::per_cell].copy()  # [cells]
    for offset in range(1, per_cell):
        np.maximum(cells, padded[offset::per_cell], out=cells)
    return (cells + ord("0")).tobytes().decode("ascii"), per_cell


class LiveView:
    """Step history and the latest engine snapshot (see the module docstring)."""

    def __init__(self, interval_s: float = 0.25, history_s: int = 60,
                 max_cells: int = MAX_CELLS):
        if interval_s < 0 or history_s < 1 or max_cells < 1:
            raise ValueError(f"interval_s >= 0, history_s >= 1 and max_cells >= 1 are needed, got "
                             f"{interval_s!r}, {history_s!r}, {max_cells!r}")
        self.interval_s = interval_s
        self.max_cells = max_cells
        self._bins: collections.deque[_SecondBin] = collections.deque(maxlen=history_s)
        self._last_publish = -float("inf")
        self.latest: dict | None = None  # replaced whole by the engine thread
        self.num_published = 0

    def record_step(self, now: float, step_s: float, batch: int) -> None:
        """One engine step that ended at ``now`` (time.time()), took ``step_s`` seconds and ran
        ``batch`` requests."""
        second = int(now)
        if not self._bins or self._bins[-1].second != second:
            self._bins.append(_SecondBin(second))
        last = self._bins[-1]
        last.steps += 1
        last.step_s += step_s
        last.batch += batch

    def maybe_publish(self, scheduler: Scheduler, now: float, force: bool = False) -> bool:
        """Builds a new snapshot if ``interval_s`` passed since the last one (or ``force``)."""
        if not force and now - self._last_publish < self.interval_s:
            return False
        self._last_publish = now
        self.latest = self.snapshot(scheduler, now)
        self.num_published += 1
        return True

    def snapshot(self, scheduler: Scheduler, now: float) -> dict:
        """The JSON body of ``GET /engine/state``."""
        manager = scheduler.block_manager
        states = block_states(manager.pool)  # [num_blocks]
        counts = np.bincount(states[1:], minlength=len(BLOCK_STATE_NAMES))
        cells, per_cell = pool_cells(states, self.max_cells)
        running = [{"id": r.request_id, "tokens": r.num_tokens,
                    "blocks": len(manager.get_block_ids(r.request_id))}
                   for r in scheduler.running[:MAX_LISTED_REQUESTS]]
        return {
            "time": now,
            "block_size": manager.block_size,
            "num_blocks": manager.num_blocks - 1,
            "blocks_per_cell": per_cell,
            "cells": cells,
            "counts": {name: int(c) for name, c in zip(BLOCK_STATE_NAMES, counts)},
            "kv_cache_usage": manager.usage,
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "running": running,
            "history": self._history(now),
        }

    def _history(self, now: float) -> list[dict]:
        """Per second of the last ``history_s``: steps, mean step time (ms) and mean batch."""
        oldest = int(now) - (self._bins.maxlen or 0)
        return [{"t": b.second, "steps": b.steps, "step_ms": 1e3 * b.step_s / b.steps,
                 "batch": b.batch / b.steps} for b in self._bins if b.second > oldest]
