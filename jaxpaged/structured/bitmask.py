"""The device side of structured outputs: a row's int32 bitmask words unpacked with shifts inside
the jitted sampler, and the logits of disallowed tokens set to -inf (before penalties,
temperature, top-k/top-p and greedy argmax, as vLLM applies its grammar bitmask)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bitmask_width(vocab_size: int) -> int:
    """Words of one bitmask row."""
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """bool[B, V]: bit ``t % 32`` of word ``t // 32`` of each row. ``bitmask`` i32[B, W] with
    ``W * 32 >= V``; ids past V (the words' padding) are dropped."""
    shifts = jnp.arange(32, dtype=jnp.int32)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]; arithmetic shift, then one bit
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size] != 0


def apply_grammar_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """f32[B, V] logits with every token the row's bitmask disallows at -inf."""
    return jnp.where(allowed_tokens(bitmask, logits.shape[-1]), logits, -jnp.inf)
