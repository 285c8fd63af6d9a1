"""How many KV blocks fit: the pool gets what the weights and the largest step leave over.

Under tensor parallelism every device holds its KV heads' part of every block id, so the budget
and the bytes of a block are per device (the first device's memory; the weights there are its
shards) and the pool's capacity in tokens is what one device's part holds."""

from __future__ import annotations

import dataclasses
import logging

import jax

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.sample.prompt_logprobs import PROMPT_LOGPROBS_CHUNK

logger = logging.getLogger(__name__)

# Without an accelerator there is no memory limit to read: the pool gets what max_num_seqs
# sequences of max_model_len need, within these bounds.
MIN_CPU_KV_CACHE_BYTES = 256 * 1024 * 1024
MAX_CPU_KV_CACHE_BYTES = 1024 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class KVPlan:
    num_blocks: int  # per layer, including null block 0
    block_size: int
    bytes_per_block: int  # K + V over all layers, on one device
    num_devices: int = 1  # tensor parallel: devices the pool is split over (by KV heads)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def total_bytes(self) -> int:
        """The whole pool, summed over devices."""
        return self.num_blocks * self.bytes_per_block * self.num_devices

    def max_concurrency(self, max_model_len: int) -> float:
        return self.capacity_tokens / max_model_len


def activation_reserve_bytes(cfg: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """Upper estimate of the largest step's live activations (f32 worst case, x2 for temporaries):
    per token the residual, q/k/v, attention output and gate/up; per sequence the logits and the
    sampler's sorted copy; plus one chunk of prompt-logprob rows (logits, log-softmax, top-k)."""
    per_token = (3 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                 + cfg.num_heads * cfg.head_dim + 3 * cfg.intermediate_size)
    per_seq = 4 * cfg.vocab_size
    prompt_logprob_rows = 3 * PROMPT_LOGPROBS_CHUNK * cfg.vocab_size
    return 2 * 4 * (max_num_batched_tokens * per_token + max_num_seqs * per_seq
                    + prompt_logprob_rows)


def plan_kv_cache(cfg: ModelConfig, *, dtype, block_size: int, max_model_len: int,
                  max_num_seqs: int, gpu_memory_utilization: float, activation_bytes: int,
                  kv_cache_memory_bytes: int | None = None,
                  num_blocks_override: int | None = None, num_devices: int = 1,
                  kv_heads_per_device: int | None = None) -> KVPlan:
    """Sizes the pool (``fit_max_model_len`` then checks that one sequence fits). Tensor
    parallel: ``num_devices`` devices, each holding ``kv_heads_per_device`` heads of every
    block; ``kv_cache_memory_bytes`` is per device then (vLLM's meaning)."""
    heads = cfg.num_kv_heads if kv_heads_per_device is None else kv_heads_per_device
    bytes_per_block = KVCache.bytes_per_block(num_layers=cfg.num_layers, block_size=block_size,
                                              num_kv_heads=heads, head_dim=cfg.head_dim,
                                              dtype=dtype)
    if num_blocks_override is not None:
        num_blocks = num_blocks_override
    else:
        cpu_bytes = max_num_seqs * (-(-max_model_len // block_size)) * bytes_per_block
        budget = kv_cache_memory_bytes or _free_bytes(gpu_memory_utilization, activation_bytes,
                                                      cpu_bytes)
        num_blocks = budget // bytes_per_block
    return KVPlan(num_blocks=int(num_blocks), block_size=block_size,
                  bytes_per_block=bytes_per_block, num_devices=num_devices)


def fit_max_model_len(plan: KVPlan, max_model_len: int, *, may_lower: bool) -> int:
    """``max_model_len`` if one sequence of it fits the pool. Otherwise, when ``may_lower`` (the
    user did not set it), the pool's capacity, with a warning, as vLLM lowers max_model_len to
    fit; else a ValueError that says what to change."""
    needed = -(-max_model_len // plan.block_size) + 1  # + the null block
    if plan.num_blocks >= needed:
        return max_model_len
    if may_lower and plan.capacity_tokens >= plan.block_size:
        logger.warning("max_model_len lowered from %d (the model's) to %d: the KV cache holds "
                       "%d tokens; set max_model_len or the KV cache size to choose",
                       max_model_len, plan.capacity_tokens, plan.capacity_tokens)
        return plan.capacity_tokens
    raise ValueError(
        f"the KV cache holds {max(plan.capacity_tokens, 0)} tokens ({plan.num_blocks} blocks of "
        f"{plan.block_size}), fewer than one sequence of max_model_len={max_model_len} needs "
        f"({needed} blocks): lower max_model_len or max_num_batched_tokens, or raise "
        "gpu_memory_utilization / kv_cache_memory_bytes")


def _free_bytes(gpu_memory_utilization: float, activation_bytes: int, cpu_bytes: int) -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return min(max(cpu_bytes, MIN_CPU_KV_CACHE_BYTES), MAX_CPU_KV_CACHE_BYTES)
    budget = stats["bytes_limit"] * gpu_memory_utilization - stats.get("bytes_in_use", 0)
    return max(int(budget - activation_bytes), 0)
