"""Which replica takes a request: the one with the fewest outstanding tokens, unless a replica
already holds the prompt's first KV blocks and is not much busier.

Outstanding tokens of a replica: for each of its live requests, the prompt tokens plus the
tokens it may still generate (``max_tokens`` per sample, or the rest of the context), less what
it generated so far. Prefix affinity: the prompt's first ``AFFINITY_BLOCKS`` full blocks are
hashed as a chain (block ``i``'s key covers blocks ``0..i``, as the engine's prefix cache keys
them, salted by ``cache_salt``); the router remembers which replica each key went to, and a new
request goes back to the replica of its longest known key while that replica's outstanding
tokens are within ``slack_tokens`` of the least loaded one. Pure Python, no Ray.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

AFFINITY_BLOCKS = 4  # leading blocks hashed for prefix affinity
AFFINITY_ENTRIES = 65536  # prefix keys remembered (least recently used forgotten first)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A routed request: where it went and what the router charged for it."""

    replica: int
    tokens: int  # outstanding tokens charged at dispatch
    prefix_keys: tuple[int, ...]


def prefix_keys(token_ids: Sequence[int], block_size: int, salt: str | None = None
                ) -> tuple[int, ...]:
    """Chained keys of the prompt's first full blocks (at most ``AFFINITY_BLOCKS``)."""
    keys, key = [], hash(("jaxpaged-prefix", salt))
    for start in range(0, min(len(token_ids) // block_size, AFFINITY_BLOCKS) * block_size,
                       block_size):
        key = hash((key, tuple(token_ids[start:start + block_size])))
        keys.append(key)
    return tuple(keys)


class Router:
    def __init__(self, num_replicas: int, block_size: int, slack_tokens: int):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.block_size = block_size
        self.slack_tokens = slack_tokens
        self.outstanding = [0] * num_replicas  # replica -> outstanding tokens
        self._affinity: collections.OrderedDict[int, int] = collections.OrderedDict()

    def place(self, token_ids: Sequence[int], tokens: int, serving: Sequence[int],
              salt: str | None = None) -> Placement | None:
        """Charge ``tokens`` to the chosen replica among ``serving`` (None: none serves)."""
        if not serving:
            return None
        keys = prefix_keys(token_ids, self.block_size, salt)
        least = min(serving, key=lambda r: (self.outstanding[r], r))
        replica = self._affine(keys, serving, self.outstanding[least])
        chosen = least if replica is None else replica
        for key in keys:
            self._affinity[key] = chosen
            self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        self.outstanding[chosen] += tokens
        return Placement(chosen, tokens, keys)

    def _affine(self, keys: tuple[int, ...], serving: Sequence[int], least_load: int
                ) -> int | None:
        for key in reversed(keys):  # the longest known prefix first
            replica = self._affinity.get(key)
            if replica is None:
                continue
            if replica in serving and self.outstanding[replica] - least_load <= self.slack_tokens:
                return replica
            return None
        return None

    def release(self, replica: int, tokens: int) -> None:
        """``tokens`` of a request's charge are done (generated, or the request ended)."""
        self.outstanding[replica] -= tokens

    def forget(self, replica: int) -> None:
        """The replica died: its prefix blocks are gone."""
        for key in [k for k, r in self._affinity.items() if r == replica]:
            del self._affinity[key]
