"""Run the model alone (no engine) on one prompt: full prompt logits and a greedy continuation.

The model-level reference path for tests: one sequence gets a run of consecutive blocks; the prompt
is prefilled in one step and each new token is a one-token decode step through the same paged
attention entry point the engine uses.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.models.attention_metadata import AttentionMetadata
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.llama import LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    prompt_logits: np.ndarray  # f32[prompt_len, vocab]


def generate(model: LlamaForCausalLM, prompt_ids: list[int], *, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, block_size: int = 16,
             stop_token_ids: tuple[int, ...] = ()) -> GenerationResult:
    """Greedy (temperature 0) or sampled continuation of ``prompt_ids``."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cfg = model.config
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings ({cfg.max_position_embeddings})")
    num_blocks = -(-total // block_size)
    kv = KVCache.zeros(num_layers=cfg.num_layers, num_blocks=num_blocks + 1, block_size=block_size,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       dtype=model.embed[...].dtype)
    block_table = jnp.arange(1, num_blocks + 1, dtype=jnp.int32)[None, :]  # block 0 is null
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)

    n = len(prompt_ids)
    logits, kv = _forward(graphdef, state, kv, jnp.asarray(prompt_ids, jnp.int32),
                          jnp.arange(n, dtype=jnp.int32), block_table, n, block_size)
    prompt_logits = np.asarray(logits)
    tokens: list[int] = []
    next_logits = logits[-1:]
    for position in range(n, total):
        key, sample_key = jax.random.split(key)
        token = int(_pick(next_logits[0], sample_key, temperature))
        tokens.append(token)
        if token in stop_token_ids or position == total - 1:
            break
        next_logits, kv = _forward(graphdef, state, kv, jnp.asarray([token], jnp.int32),
                                   jnp.asarray([position], jnp.int32), block_table, position + 1,
                                   block_size)
    return GenerationResult(token_ids=tokens, prompt_logits=prompt_logits)


def _pick(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits)
    return jax.random.categorical(key, logits / temperature)


@functools.partial(jax.jit, static_argnames=("graphdef", "block_size"), donate_argnames=("kv",))
def _forward(graphdef, state, kv: KVCache, token_ids, positions, block_table, seq_len,
             block_size: int):
    """token_ids, positions: i32[T] -> logits f32[T, vocab] for one sequence of length seq_len."""
    t = token_ids.shape[0]
    blocks = block_table[0][positions // block_size]
    md = AttentionMetadata(
        slot_mapping=blocks * block_size + positions % block_size,
        block_tables=block_table,
        seq_lens=jnp.asarray([seq_len], jnp.int32),
        query_start_loc=jnp.asarray([0, t], jnp.int32),
        max_query_len=t,
    )
    model = nnx.merge(graphdef, state)
    hidden, kv = model(token_ids, positions, kv, md)
    return model.compute_logits(hidden), kv
