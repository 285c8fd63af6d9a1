"""Host-side rows that outlive a step: one slot per live request in numpy arrays that grow by
doubling, so a request's row is written once and each step gathers the rows it needs."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class RowStore:
    """Named numpy arrays of equal length (``[slots, width]`` each) with a free list of slots.

    ``take`` hands out a free slot, doubling every array when none is left (new rows are zero);
    ``release`` gives slots back. The arrays are replaced when they grow: read them through
    ``self[name]`` after ``take``, never keep one across a ``take``."""

    MIN_SLOTS = 16

    def __init__(self, columns: dict[str, tuple[int, np.dtype]]):
        self._arrays = {name: np.zeros((0, width), dtype) for name, (width, dtype) in columns.items()}
        self._free: list[int] = []
        self.capacity = 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def take(self) -> int:
        if not self._free:
            self._grow(max(self.MIN_SLOTS, 2 * self.capacity))
        return self._free.pop()

    def release(self, slots: Iterable[int]) -> None:
        self._free.extend(slots)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name, array in self._arrays.items():
            extra = np.zeros((capacity - old, array.shape[1]), array.dtype)
            self._arrays[name] = np.concatenate([array, extra])
        self._free.extend(range(capacity - 1, old - 1, -1))  # lowest slot first out
        self.capacity = capacity
