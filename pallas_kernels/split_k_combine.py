"""Merging the partial results of split-K ("flash-decoding") attention.

Each of K splits of a sequence's context leaves, per query head, an unnormalized output ``acc``
(f32[D]), its running maximum ``m`` of the base-2 logits and its softmax denominator ``l``; the
final output is ``sum_k acc_k * 2^(m_k - M) / sum_k l_k * 2^(m_k - M)`` with ``M = max_k m_k``.
Empty splits carry ``m = MASK_VALUE`` and ``l = 0``, so their weight ``2^(MASK - M)`` is 0; a row
whose splits are all empty (a padding sequence) gives zeros. Two implementations: XLA ops, and
one small Pallas kernel launch (one program per (sequence, query head)), which the decode kernel
uses by default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxpaged.pallas_kernels.backend import MASK_VALUE, triton_call


def combine_splits_xla(acc: jax.Array,  # f32[S, K, Hq, D]: unnormalized partial outputs
                       m: jax.Array,  # f32[S, K, Hq]: partial maxima (base-2 logits)
                       l: jax.Array,  # f32[S, K, Hq]: partial softmax sums
                       ) -> jax.Array:  # f32[S, Hq, D]
    m_max = m.max(axis=1, keepdims=True)
    weight = jnp.exp2(m - m_max)  # empty splits: exp2(MASK - real max) == 0
    denom = (l * weight).sum(axis=1)
    num = (acc * weight[..., None]).sum(axis=1)
    return num / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def _combine_kernel(acc_ref,  # f32[K, D]: one query head's partial outputs
                    m_ref,  # f32[K]
                    l_ref,  # f32[K]
                    o_ref,  # [D]
                    *, padded_splits: int):
    splits = acc_ref.shape[0]
    real = jnp.arange(padded_splits, dtype=jnp.int32) < splits  # K rounded up to a power of 2
    part = pl.ds(0, padded_splits)
    m = plt.load(m_ref.at[part], mask=real, other=MASK_VALUE)
    l = plt.load(l_ref.at[part], mask=real, other=0.0)
    acc = plt.load(acc_ref.at[part], mask=real[:, None], other=0.0)  # [Kp, D]
    weight = jnp.exp2(m - m.max())  # empty splits: exp2(MASK - real max) == 0
    denom = (l * weight).sum()
    out = (acc * weight[:, None]).sum(axis=0) / jnp.where(denom == 0.0, 1.0, denom)
    o_ref[...] = out.astype(o_ref.dtype)


def combine_splits_pallas(acc: jax.Array, m: jax.Array, l: jax.Array, *, dtype: jnp.dtype,
                          interpret: bool) -> jax.Array:
    """``combine_splits_xla`` as one small kernel launch (one program per query head)."""
    num_seqs, splits, num_q_heads, head_dim = acc.shape
    padded_splits = pl.next_power_of_2(splits)
    return triton_call(
        functools.partial(_combine_kernel, padded_splits=padded_splits),
        name=f"paged_decode_combine_splits{splits}",
        grid=(num_seqs, num_q_heads),
        in_specs=[pl.BlockSpec((None, splits, None, head_dim), lambda s, h: (s, 0, h, 0)),
                  pl.BlockSpec((None, splits, None), lambda s, h: (s, 0, h)),
                  pl.BlockSpec((None, splits, None), lambda s, h: (s, 0, h))],
        out_specs=pl.BlockSpec((None, None, head_dim), lambda s, h: (s, h, 0)),
        out_shape=jax.ShapeDtypeStruct((num_seqs, num_q_heads, head_dim), dtype),
        num_warps=4 if padded_splits * head_dim <= 8192 else 8,
        num_stages=1,
        interpret=interpret,
    )(acc, m, l)
