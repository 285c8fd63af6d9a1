"""Ragged paged attention in plain XLA, for backends without the Pallas kernels (the CPU).

Same contract as ``ragged_paged_attention`` (that module's doc: layout, padding, fp8 pools). The
dense reference gathers every sequence's whole block table and lays the queries out as
``[S, max_query_len]``, so its cost grows with ``max_model_len`` and, in mixed steps, with
``S * T``. This path does the work the step needs:

- queries are cut into tiles of ``block_q`` tokens of one sequence (the Pallas kernel's work list,
  ``build_work_list``; ``block_q = 1`` for decode-only batches), so no row is padded to the step's
  longest query;
- a ``lax.fori_loop`` walks the context ``chunk_pages`` pages at a time, and only up to the longest
  context any tile of this step reaches (a trip count computed on the device), with an online
  softmax in f32; the block-table width (``max_model_len``) costs nothing beyond its int32s.

Each tile gathers its own sequence's pages of the chunk, so a sequence with several tiles gathers
them once per tile: fine for a CPU, where the arithmetic dominates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxpaged.pallas_kernels.backend import block_tables_within_context, dot_precision
from jaxpaged.pallas_kernels.kv_quant import compute_dtype, reference_scales, to_compute
from jaxpaged.pallas_kernels.ragged_paged_attention import build_work_list, validate_inputs

PREFILL_BLOCK_Q = 16  # query tokens per tile in steps with prefill chunks
CHUNK_PAGES = 16  # context pages per loop iteration


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "max_query_len",
                                             "chunk_pages"))
def ragged_paged_attention_xla(q: jax.Array,  # [T, Hq, D]
                               k_cache: jax.Array,  # [P, page_size, Hkv, D]
                               v_cache: jax.Array,  # [P, page_size, Hkv, D]
                               block_tables: jax.Array,  # i32[S, W]
                               seq_lens: jax.Array,  # i32[S]
                               query_start_loc: jax.Array,  # i32[S + 1]
                               *, k_scale: jax.Array | float | None = None,
                               v_scale: jax.Array | float | None = None,
                               sm_scale: float, soft_cap: float | None = None,
                               max_query_len: int | None = None,
                               chunk_pages: int = CHUNK_PAGES) -> jax.Array:  # [T, Hq, D]
    """Causal attention of every new token over its sequence's paged context (module doc)."""
    validate_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sm_scale,
                    soft_cap, max_query_len)
    if chunk_pages < 1:
        raise ValueError(f"chunk_pages must be >= 1, got {chunk_pages}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, table_width = block_tables.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_tokens == 0 or num_seqs == 0:
        return jnp.zeros_like(q)
    k_scale, v_scale = reference_scales(k_cache.dtype, k_scale, v_scale)
    compute = compute_dtype(k_cache.dtype, q.dtype)
    precision = dot_precision(q.dtype)
    group = num_q_heads // num_kv_heads
    block_q = 1 if max_query_len == 1 else min(PREFILL_BLOCK_Q, max_query_len or num_tokens)
    chunk = chunk_pages * page_size  # context tokens per iteration

    work = build_work_list(query_start_loc, seq_lens, num_tokens=num_tokens, block_q=block_q,
                           max_context=table_width * page_size)  # i32[N, 4]
    seq, q_start, num_rows, first_pos = (work[:, i] for i in range(4))  # i32[N] each
    row = jnp.arange(block_q, dtype=jnp.int32)  # [Bq]
    row_real = row[None, :] < num_rows[:, None]  # [N, Bq]
    token = jnp.where(row_real, q_start[:, None] + row[None, :], num_tokens)  # [N, Bq]; T: none
    q_pos = first_pos[:, None] + row[None, :]  # [N, Bq]
    q_tiles = to_compute(q[jnp.clip(token, 0, num_tokens - 1)], compute)  # [N, Bq, Hq, D]
    q_tiles = q_tiles.reshape(*token.shape, num_kv_heads, group, head_dim)  # [N, Bq, Hkv, G, D]

    # Pages past a sequence's end read page 0; the table is padded to whole chunks.
    num_chunks_max = -(-table_width // chunk_pages)
    tables = block_tables_within_context(block_tables, seq_lens, page_size)
    tables = jnp.pad(tables, ((0, 0), (0, num_chunks_max * chunk_pages - table_width)))
    tile_tables = tables[seq]  # [N, W']
    context = jnp.where(num_rows > 0, first_pos + num_rows, 0)  # [N]: positions a tile reads
    num_chunks = (jnp.max(context) + chunk - 1) // chunk

    def attend_chunk(c, state):
        m, l, acc = state  # f32[N, Bq, Hkv, G], same, f32[N, Bq, Hkv, G, D]
        pages = lax.dynamic_slice_in_dim(tile_tables, c * chunk_pages, chunk_pages, axis=1)
        k = k_cache[pages].reshape(-1, chunk, num_kv_heads, head_dim).astype(compute)
        v = v_cache[pages].reshape(-1, chunk, num_kv_heads, head_dim).astype(compute)
        kv_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [C]
        s = jnp.einsum("nqhgd,nchd->nqhgc", q_tiles, k, precision=precision,
                       preferred_element_type=jnp.float32) * (sm_scale * k_scale)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        allowed = ((kv_pos[None, None, :] <= q_pos[:, :, None])
                   & (kv_pos[None, None, :] < context[:, None, None])
                   & row_real[:, :, None])[:, :, None, None, :]  # [N, Bq, 1, 1, C]
        s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])  # exp(-inf) = 0 for masked entries
        correction = jnp.exp(m - m_safe)
        in_context = kv_pos[None, :] < context[:, None]  # [N, C]
        v = jnp.where(in_context[:, :, None, None], v, jnp.zeros_like(v))  # page 0 may hold junk
        pv = jnp.einsum("nqhgc,nchd->nqhgd", p.astype(v.dtype), v, precision=precision,
                        preferred_element_type=jnp.float32)
        return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

    shape = (*token.shape, num_kv_heads, group)
    state = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
             jnp.zeros((*shape, head_dim), jnp.float32))
    _, l, acc = lax.fori_loop(0, num_chunks, attend_chunk, state)
    out = acc * (v_scale / jnp.where(l == 0.0, 1.0, l))[..., None]  # [N, Bq, Hkv, G, D]
    out = out.reshape(-1, num_q_heads, head_dim).astype(q.dtype)  # [N * Bq, Hq, D]
    # Scatter the tile rows back to their tokens; rows of no token (index T) are dropped.
    return jnp.zeros_like(q).at[token.reshape(-1)].set(out, mode="drop")
