"""Ragged paged attention: one call for chunked prefill, prefix-cache hits, decode, mixed batches.

Layout. q ``[T, Hq, D]`` packs the new tokens of S sequences: sequence ``s`` owns tokens
``query_start_loc[s] : query_start_loc[s + 1]`` (``q_len`` may be 0); ``seq_lens[s]`` is its context
length after the step, and its ``i``-th new token sits at position ``seq_lens[s] - q_len + i`` and
attends causally to positions ``<= that``. Tokens from ``query_start_loc[S]`` on are padding and
get zeros. K/V pools ``[P, page_size, Hkv, D]``, block tables ``i32[S, W]`` (entries past a
sequence's end may hold anything: they are never used). GQA: query head ``h`` reads kv head
``h // G``. Preconditions (not checkable under jit): ``query_start_loc`` is non-decreasing with
``query_start_loc[S] <= T``, ``q_len <= seq_lens[s] <= W * page_size``, and ``max_query_len`` (if
given) bounds every ``q_len``. Violations never make the kernel touch memory outside its arrays.

Kernel (prefill / mixed). A static grid ``(max_tiles, Hkv)`` runs over a work list built in XLA
from ``query_start_loc``: every sequence is cut into q tiles of ``block_q`` tokens
(``max_tiles = min(cdiv(T, block_q) + S, T)`` bounds their number; programs past the list exit at
once), each row ``(seq, q_start, num_rows, first_pos)``; a sequence's tiles are listed last tile
first, so the longest causal ranges start first. A program's M rows are its ``block_q`` tokens x
the ``Gp`` query heads of one kv head (GQA group flattened into M; ``Gp`` = G rounded up to a power
of 2, ``block_q * Gp >= 16``). It walks the sequence's pages ``pages_per_step`` at a time through
the block table only up to the tile's last position: blocks wholly before the tile's first
position run unmasked, the few near the diagonal apply the causal mask (rows past the tile's end
reuse its last row's position, so no row is ever fully masked). Online softmax in f32 with a
base-2 exponent, finite mask value, optional logit soft cap; bf16 operands, f32 accumulation.
Table entries past the tile's context are replaced by page 0 and their V rows by zeros before use.
q and the output are padded by ``block_q`` tokens so tile loads and (masked) stores stay in
bounds; the output buffer starts as zeros and is aliased into the kernel, which stores only real
rows, so padding tokens stay zero.

fp8 pools (``kv_quant``): pages are gathered as fp8 and converted in registers to
``kv_quant.compute_dtype`` (exact; q goes to that dtype too, f16 for a bf16 query); ``k_scale`` is folded into the logit scale, ``v_scale`` into the per-row ``1 / l`` of the
output (the decode kernel's arithmetic); the scales are one ``f32[2]`` operand.

Decode-only batches (``max_query_len == 1``) take the split-K decode kernel of
``paged_decode_attention`` instead, which fills the GPU even with few sequences: each sequence's
token is gathered, attended, and scattered back to its place, unless the caller promises
``one_token_per_sequence`` (token ``s`` is sequence ``s``'s only new token, ``T == S``, padding rows
own the padding tokens), which skips the two XLA kernels of that gather and scatter.

Tile choices (``RaggedTuning``; re-choose them by measurement on the GPU with bench/kernels.py):
``block_q`` (None: 64 rows, i.e. 16 tokens for G = 4), ``pages_per_step`` (4: 64 KV tokens per step
with 16-token pages), ``num_warps`` 4, ``num_stages`` 2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpaged.pallas_kernels.backend import (MASK_VALUE, block_tables_within_context, dot_precision,
                                             gather_pages, initial_softmax_state, is_power_of_2,
                                             masked_store, matmul_f32, normalized_output,
                                             online_softmax_step, require_power_of_2, resolve_impl,
                                             scaled_logits, triton_call, validate_paged_kv,
                                             validate_scales)
from jaxpaged.pallas_kernels.kv_quant import (compute_dtype, kv_scales, load_scales,
                                              reference_scales, scales_spec, to_compute)
from jaxpaged.pallas_kernels.paged_decode_attention import DecodeTuning, paged_decode_attention

DEFAULT_TILE_ROWS = 64  # block_q * Gp when block_q is None


@dataclasses.dataclass(frozen=True)
class RaggedTuning:
    """Tile parameters of the ragged kernel (static; hashable so it can be a jit static arg)."""

    block_q: int | None = None  # query tokens per tile (power of 2); None: DEFAULT_TILE_ROWS / Gp
    pages_per_step: int = 4  # KV pages gathered per inner-loop step (power of 2)
    num_warps: int = 4
    num_stages: int = 2
    decode: DecodeTuning | None = None  # used when max_query_len == 1; None: chosen by shape

    def __post_init__(self):
        for name in ("pages_per_step", "num_warps"):
            if not is_power_of_2(getattr(self, name)):
                raise ValueError(f"RaggedTuning.{name} must be a power of 2, got "
                                 f"{getattr(self, name)}")
        if self.block_q is not None and not is_power_of_2(self.block_q):
            raise ValueError(f"RaggedTuning.block_q must be None or a power of 2, got "
                             f"{self.block_q}")
        if self.num_stages < 1:
            raise ValueError(f"RaggedTuning.num_stages must be >= 1, got {self.num_stages}")

    def tile_tokens(self, padded_group: int) -> int:
        """block_q for a GQA group padded to ``padded_group`` heads (rows >= 16 for tl.dot)."""
        block_q = self.block_q or max(1, DEFAULT_TILE_ROWS // padded_group)
        return max(block_q, pl.cdiv(16, padded_group))


# Columns of the work list.
_SEQ, _Q_START, _NUM_ROWS, _FIRST_POS = range(4)


def build_work_list(query_start_loc: jax.Array,  # i32[S + 1]
                    seq_lens: jax.Array,  # i32[S]
                    *, num_tokens: int, block_q: int,
                    max_context: int) -> jax.Array:  # i32[max_tiles, 4]
    """One row per q tile: (sequence, first token, real rows, position of the first row).

    Rows past the real tiles have ``num_rows == 0``. Inputs that break the preconditions are
    clamped (tokens inside ``[0, T)``, positions inside the table) so no tile reads or writes out
    of bounds; such tokens may come out as zeros.
    """
    num_seqs = seq_lens.shape[0]
    max_tiles = min(pl.cdiv(num_tokens, block_q) + num_seqs, num_tokens)
    starts = query_start_loc[:-1]  # [S]
    q_lens = jnp.clip(jnp.minimum(query_start_loc[1:], num_tokens) - starts, 0, None)
    context = jnp.minimum(seq_lens, max_context)
    tiles = pl.cdiv(q_lens, block_q)  # [S]
    tiles_end = jnp.cumsum(tiles)
    tile = jnp.arange(max_tiles, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(tiles_end, tile, side="right"), 0, num_seqs - 1)
    seq = seq.astype(jnp.int32)
    index_in_seq = tiles[seq] - 1 - (tile - (tiles_end[seq] - tiles[seq]))  # last tile first
    q_offset = index_in_seq * block_q
    first_pos = context[seq] - q_lens[seq] + q_offset
    num_rows = jnp.clip(q_lens[seq] - q_offset, 0, block_q)
    num_rows = jnp.where((tile < tiles_end[-1]) & (first_pos >= 0), num_rows, 0)
    return jnp.stack([seq, starts[seq] + q_offset, num_rows, first_pos], axis=1).astype(jnp.int32)


def _ragged_kernel(work_ref,  # i32[4]: this tile's (seq, q_start, num_rows, first_pos)
                   tables_ref,  # i32[S * Wp]: block tables, flattened, rows padded to whole steps
                   q_ref,  # [Tp, Gp, D]: the query heads of this kv head, all tokens
                   k_ref,  # [P, page_size, D]: the K pool of this kv head
                   v_ref,  # [P, page_size, D]
                   o_init_ref,  # aliased with o_ref; not read
                   *refs,  # [f32[2] (k_scale, v_scale): fp8 pools only], o [Tp, Gp, D]
                   sm_scale: float, soft_cap: float | None, block_q: int,
                   pages_per_step: int, table_width: int):
    del o_init_ref
    *scale_refs, o_ref = refs
    num_rows = work_ref[_NUM_ROWS]

    @pl.when(num_rows > 0)
    def _tile():
        seq, q_start, first_pos = work_ref[_SEQ], work_ref[_Q_START], work_ref[_FIRST_POS]
        _, padded_group, head_dim = q_ref.shape
        page_size = k_ref.shape[1]
        rows = block_q * padded_group
        block_k = pages_per_step * page_size
        precision = dot_precision(q_ref.dtype)

        q = q_ref[pl.ds(q_start, block_q)].reshape(rows, head_dim)  # row = token * Gp + head
        q = to_compute(q, compute_dtype(k_ref.dtype, q.dtype))
        row_token = jnp.minimum(jnp.arange(rows, dtype=jnp.int32) // padded_group, num_rows - 1)
        row_pos = first_pos + row_token  # [rows]
        last_pos = first_pos + num_rows - 1
        num_blocks = pl.cdiv(last_pos + 1, block_k)
        num_unmasked = jnp.minimum((first_pos + 1) // block_k, num_blocks)
        table_base = seq * table_width
        k_scale, v_scale = load_scales(scale_refs)

        def step(b, carry, *, masked: bool):
            page0 = b * pages_per_step
            page_ids = tables_ref[pl.ds(table_base + page0, pages_per_step)]
            if masked:  # entries past the context may hold anything
                page_idx = page0 + jnp.arange(pages_per_step, dtype=jnp.int32)
                page_ids = jnp.where(page_idx * page_size <= last_pos, page_ids, 0)
            # fp8 -> the compute dtype is exact (kv_quant); for other pools a no-op.
            k = gather_pages(k_ref, page_ids).astype(q.dtype)  # [block_k, D]
            v = gather_pages(v_ref, page_ids).astype(q.dtype)
            logits = scaled_logits(matmul_f32(q, k, transpose_b=True, precision=precision),
                                   sm_scale=sm_scale, soft_cap=soft_cap,
                                   k_scale=k_scale)  # f32[rows, block_k]
            if masked:
                kv_pos = b * block_k + jnp.arange(block_k, dtype=jnp.int32)
                logits = jnp.where(kv_pos[None, :] <= row_pos[:, None], logits, MASK_VALUE)
                v = jnp.where((kv_pos <= last_pos)[:, None], v, jnp.zeros_like(v))
            return online_softmax_step(*carry, logits, v, precision=precision)

        carry = initial_softmax_state(rows, head_dim)
        carry = lax.fori_loop(0, num_unmasked, functools.partial(step, masked=False), carry)
        acc, _, l = lax.fori_loop(num_unmasked, num_blocks, functools.partial(step, masked=True),
                                  carry)
        out = normalized_output(acc, l, v_scale)  # rows are never fully masked: l > 0
        out = out.reshape(block_q, padded_group, head_dim).astype(o_ref.dtype)
        real_token = jnp.arange(block_q, dtype=jnp.int32) < num_rows
        masked_store(o_ref.at[pl.ds(q_start, block_q)], out, real_token[:, None, None])


def _ragged_pallas(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scales, *,
                   sm_scale, soft_cap, tuning: RaggedTuning, interpret: bool):
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    table_width = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    padded_group = pl.next_power_of_2(group)
    block_q = tuning.tile_tokens(padded_group)
    pps = tuning.pages_per_step

    work = build_work_list(query_start_loc, seq_lens, num_tokens=num_tokens, block_q=block_q,
                           max_context=table_width * page_size)
    tables = jnp.pad(block_tables, ((0, 0), (0, -table_width % pps)))
    padded_width = tables.shape[1]
    q_heads = jnp.pad(q.reshape(num_tokens, num_kv_heads, group, head_dim),
                      ((0, block_q), (0, 0), (0, padded_group - group), (0, 0)))
    q_heads = q_heads.reshape(num_tokens + block_q, num_kv_heads * padded_group, head_dim)

    kernel = functools.partial(_ragged_kernel, sm_scale=sm_scale, soft_cap=soft_cap,
                               block_q=block_q, pages_per_step=pps, table_width=padded_width)
    pool_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda i, h: (0, 0, h, 0))
    heads_spec = pl.BlockSpec((q_heads.shape[0], padded_group, head_dim), lambda i, h: (0, h, 0))
    quantized = () if scales is None else (scales,)
    out = triton_call(
        kernel,
        name=f"ragged_paged_attention_bq{block_q}_pps{pps}"
             + ("" if scales is None else f"_{k_cache.dtype.name}"),
        grid=(work.shape[0], num_kv_heads),
        in_specs=[pl.BlockSpec((None, 4), lambda i, h: (i, 0)),
                  pl.BlockSpec((tables.size,), lambda i, h: (0,)),
                  heads_spec, pool_spec, pool_spec, heads_spec]
        + [scales_spec()] * len(quantized),
        out_specs=heads_spec,
        out_shape=jax.ShapeDtypeStruct(q_heads.shape, q.dtype),
        input_output_aliases={5: 0},
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        interpret=interpret,
    )(work, tables.reshape(-1), q_heads, k_cache, v_cache, jnp.zeros_like(q_heads), *quantized)
    out = out[:num_tokens].reshape(num_tokens, num_kv_heads, padded_group, head_dim)
    return out[:, :, :group, :].reshape(num_tokens, num_q_heads, head_dim)


def _decode_batch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *, k_scale,
                  v_scale, sm_scale, soft_cap, tuning: RaggedTuning, impl: str,
                  interpret: bool):
    """``q_len <= 1`` everywhere: gather each sequence's token, run decode, scatter back."""
    num_tokens = q.shape[0]
    starts = query_start_loc[:-1]  # [S]
    has_token = (query_start_loc[1:] > starts) & (starts < num_tokens)
    q_seq = q[jnp.clip(starts, 0, num_tokens - 1)]  # [S, Hq, D]
    o_seq = paged_decode_attention(q_seq, k_cache, v_cache, block_tables,
                                   jnp.where(has_token, seq_lens, 0), k_scale=k_scale,
                                   v_scale=v_scale, sm_scale=sm_scale, soft_cap=soft_cap,
                                   impl=impl, interpret=interpret, tuning=tuning.decode)
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], token, side="right"), 0,
                   starts.shape[0] - 1)
    real = (token < query_start_loc[-1]) & (token == starts[seq])
    return jnp.where(real[:, None, None], o_seq[seq], jnp.zeros_like(q))


def validate_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sm_scale,
                    soft_cap, max_query_len) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {q.shape}")
    validate_paged_kv(k_cache, v_cache, block_tables, seq_lens, num_q_heads=q.shape[1],
                      head_dim=q.shape[2], q_dtype=q.dtype)
    expected = (block_tables.shape[0] + 1,)
    if query_start_loc.shape != expected or query_start_loc.dtype != jnp.int32:
        raise ValueError(f"query_start_loc must be i32{list(expected)}, got "
                         f"{query_start_loc.dtype}{list(query_start_loc.shape)}")
    validate_scales(sm_scale, soft_cap)
    if max_query_len is not None and max_query_len < 1:
        raise ValueError(f"max_query_len must be None or >= 1, got {max_query_len}")


def _validate_for_kernel(k_cache, tuning: RaggedTuning) -> None:
    page_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    require_power_of_2("page_size", page_size)
    require_power_of_2("head_dim", head_dim)
    if head_dim < 16 or tuning.pages_per_step * page_size < 16:
        raise ValueError(f"head_dim ({head_dim}) and pages_per_step * page_size "
                         f"({tuning.pages_per_step * page_size}) must be >= 16 (matmul tiles)")


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "max_query_len",
                                             "one_token_per_sequence", "impl", "interpret",
                                             "tuning"))
def ragged_paged_attention(q: jax.Array,  # [T, Hq, D]: new tokens of all sequences, packed
                           k_cache: jax.Array,  # [P, page_size, Hkv, D]
                           v_cache: jax.Array,  # [P, page_size, Hkv, D]
                           block_tables: jax.Array,  # i32[S, W]
                           seq_lens: jax.Array,  # i32[S]: context length after the step
                           query_start_loc: jax.Array,  # i32[S + 1]
                           *, k_scale: jax.Array | float | None = None,  # f32: fp8 pools only
                           v_scale: jax.Array | float | None = None,
                           sm_scale: float, soft_cap: float | None = None,
                           max_query_len: int | None = None,
                           one_token_per_sequence: bool = False, impl: str = "auto",
                           interpret: bool = False,
                           tuning: RaggedTuning = RaggedTuning()) -> jax.Array:  # [T, Hq, D]
    """Causal attention of every new token over its sequence's paged context (see module doc).

    An fp8 pool (q bf16/f16/f32) is read as ``code * k_scale`` / ``code * v_scale`` (a missing
    scale is 1.0); other pools take no scales.

    The step's new K/V must already be in the pool (``rope_and_write_kv`` or ``write_kv``).
    ``max_query_len`` is a static bound on every sequence's new-token count; 1 (a decode-only
    batch) takes the split-K decode kernel; with it, ``one_token_per_sequence=True`` promises that token ``s`` is sequence ``s``'s
    new token (``T == S``; padding rows have ``seq_lens == 0``), so the decode kernel's rows are the
    output as they are. ``soft_cap`` applies ``soft_cap * tanh(logits / soft_cap)`` to the scaled
    logits. ``impl``: "auto" (Pallas on a CUDA GPU, else the reference) | "pallas" | "reference";
    ``interpret=True`` runs the Pallas kernels on the CPU.
    """
    validate_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sm_scale,
                    soft_cap, max_query_len)
    if one_token_per_sequence and (max_query_len != 1 or q.shape[0] != seq_lens.shape[0]):
        raise ValueError(f"one_token_per_sequence needs max_query_len=1 and as many tokens as "
                         f"sequences, got max_query_len={max_query_len}, {q.shape[0]} tokens, "
                         f"{seq_lens.shape[0]} sequences")
    scales = kv_scales(k_cache.dtype, k_scale, v_scale)
    if resolve_impl(impl) == "reference" or q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return ragged_paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                                query_start_loc, k_scale=k_scale,
                                                v_scale=v_scale, sm_scale=sm_scale,
                                                soft_cap=soft_cap, max_query_len=max_query_len)
    if one_token_per_sequence:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                      k_scale=k_scale, v_scale=v_scale, sm_scale=sm_scale,
                                      soft_cap=soft_cap, impl="pallas", interpret=interpret,
                                      tuning=tuning.decode)
    if max_query_len == 1:
        return _decode_batch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                             k_scale=k_scale, v_scale=v_scale, sm_scale=sm_scale,
                             soft_cap=soft_cap, tuning=tuning, impl="pallas",
                             interpret=interpret)
    _validate_for_kernel(k_cache, tuning)
    return _ragged_pallas(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scales,
                          sm_scale=sm_scale, soft_cap=soft_cap, tuning=tuning,
                          interpret=interpret)


def ragged_paged_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                     block_tables: jax.Array, seq_lens: jax.Array,
                                     query_start_loc: jax.Array, *,
                                     k_scale: jax.Array | float | None = None,
                                     v_scale: jax.Array | float | None = None,
                                     sm_scale: float, soft_cap: float | None = None,
                                     max_query_len: int | None = None,
                                     one_token_per_sequence: bool = False, impl: str = "auto",
                                     interpret: bool = False,
                                     tuning: RaggedTuning | None = None) -> jax.Array:
    """jnp: lay the queries out per sequence ``[S, Qmax]``, gather each context densely, mask.

    ``Qmax = max_query_len`` (else T), so memory is ``S * Hq * Qmax * W * page_size`` f32 scores:
    meant for tests and CPU runs. Scores and softmax in f32 (f32 inputs use full-precision
    matmuls); an fp8 context is converted to ``kv_quant.compute_dtype`` (exact; f16 for a bf16
    query, q clipped and rounded to f16) and the scales folded as in the
    kernel. Tile/backend arguments are accepted for signature parity and ignored.
    """
    del one_token_per_sequence, impl, interpret, tuning
    validate_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sm_scale,
                    soft_cap, max_query_len)
    k_scale, v_scale = reference_scales(k_cache.dtype, k_scale, v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, table_width = block_tables.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    if num_tokens == 0 or num_seqs == 0:
        return jnp.zeros_like(q)
    context = table_width * page_size
    q_max = num_tokens if max_query_len is None else min(max_query_len, num_tokens)
    precision = dot_precision(q.dtype)

    starts, q_lens = query_start_loc[:-1], query_start_loc[1:] - query_start_loc[:-1]
    local = jnp.arange(q_max, dtype=jnp.int32)  # [Qmax]
    token = starts[:, None] + local[None, :]  # [S, Qmax]
    row_real = (local[None, :] < q_lens[:, None]) & (token < num_tokens)
    compute = compute_dtype(k_cache.dtype, q.dtype)
    q_dense = to_compute(q[jnp.clip(token, 0, num_tokens - 1)], compute)  # [S, Qmax, Hq, D]
    q_pos = (seq_lens - q_lens)[:, None] + local[None, :]  # [S, Qmax]

    tables = block_tables_within_context(block_tables, seq_lens, page_size)
    k = k_cache[tables].reshape(num_seqs, context, num_kv_heads, head_dim).astype(compute)
    v = v_cache[tables].reshape(num_seqs, context, num_kv_heads, head_dim).astype(compute)
    kv_pos = jnp.arange(context, dtype=jnp.int32)
    in_context = kv_pos[None, :] < seq_lens[:, None]  # [S, L]
    v = jnp.where(in_context[:, :, None, None], v, jnp.zeros_like(v))

    q_groups = q_dense.reshape(num_seqs, q_max, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    s = jnp.einsum("sqhgd,sthd->shgqt", q_groups, k, precision=precision,
                   preferred_element_type=jnp.float32) * (sm_scale * k_scale)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    allowed = ((kv_pos[None, None, :] <= q_pos[:, :, None]) & in_context[:, None, :]
               & row_real[:, :, None])[:, None, None]  # [S, 1, 1, Qmax, L]
    m = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("shgqt,sthd->sqhgd", p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32) * v_scale
    o = o.reshape(num_seqs, q_max, num_q_heads, head_dim)

    token_axis = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], token_axis, side="right"), 0,
                   num_seqs - 1)
    index = token_axis - starts[seq]
    real = (token_axis < query_start_loc[-1]) & (index < q_max)
    out = o[seq, jnp.clip(index, 0, q_max - 1)]  # [T, Hq, D]
    return jnp.where(real[:, None, None], out, 0.0).astype(q.dtype)
