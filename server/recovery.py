"""Putting an ``LLMEngine`` back in working order after ``engine.step()`` raised.

What a failed step may have left behind:

- ``schedule()`` already ran: the step's requests hold newly allocated blocks and their
  ``num_computed_tokens`` counts tokens whose K/V were never written. Running them again would
  attend to garbage, so every *running* request is aborted (they include everything the step
  scheduled; preempted ones were reset to recompute from scratch and are safe to keep).
- ``update_from_output()`` may have finished some requests in the scheduler before the engine's
  own bookkeeping raised: the engine still tracks them but nothing will ever finish them. Every
  request the server believes live but the scheduler no longer knows is aborted too.
- The KV pool is donated to the jitted step; if the step failed after the donation, or on the
  device, the pool array is deleted or poisoned. Then every cached block is garbage: all requests
  are aborted, the prefix cache is forgotten and a zeroed pool of the same shape replaces it.

Waiting requests hold no blocks and survive (unless the pool was lost).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxpaged.engine import LLMEngine

logger = logging.getLogger(__name__)


def recover_from_failed_step(engine: LLMEngine, live_request_ids: set[str]) -> set[str]:
    """Abort what the failed step may have corrupted; returns the aborted request ids.

    ``live_request_ids``: the (parent) ids of the requests the caller is still serving."""
    scheduler = engine.scheduler
    known = {r.parent_id or r.request_id for r in scheduler.requests.values()}
    victims = {r.parent_id or r.request_id for r in scheduler.running}
    victims |= live_request_ids - known
    pool_lost = not _kv_pool_is_usable(engine)
    if pool_lost:
        victims |= known | live_request_ids
    engine.abort_request(sorted(victims))
    if pool_lost:
        _rebuild_kv_pool(engine)
    return victims


def _kv_pool_is_usable(engine: LLMEngine) -> bool:
    try:
        leaves = jax.tree.leaves(engine.runner.kv_cache)
        if any(leaf.is_deleted() for leaf in leaves):
            return False
        jax.block_until_ready(leaves)  # raises if a failed computation produced them
        return True
    except Exception:
        return False


def _rebuild_kv_pool(engine: LLMEngine) -> None:
    logger.warning("the KV pool was lost in the failed step; starting from an empty pool")
    engine.runner.kv_cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                          engine.runner.kv_cache)
    if not engine.scheduler.block_manager.pool.reset_prefix_cache():
        raise RuntimeError("KV blocks are still held after aborting every request")
