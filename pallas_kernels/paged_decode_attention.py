"""Paged attention for decode (one query token per sequence), split-K ("flash-decoding").

Layout. q ``[S, Hq, D]``; K/V pools ``[P, page_size, Hkv, D]``; block tables ``i32[S, W]``;
``seq_lens`` i32[S] (0 for padding rows, which output zeros). GQA: query head ``h`` reads kv head
``h // G`` with ``G = Hq // Hkv``.

Kernel. Grid ``(Hkv, S, num_kv_splits)``. A program owns one (kv head, sequence) pair and one
contiguous range of that sequence's pages: the ``ceil(pages / splits)`` pages (rounded up to whole
steps) of split ``k``, computed from the *actual* length, so short sequences in a wide table still
spread over all splits. Its G query heads are the M rows of the matmuls, padded to ``Gp >= 16``
(tl.dot's minimum). Each inner step gathers ``pages_per_step`` pages of K and V through the block
table (a ``[pages_per_step * page_size, D]`` tile per operand), and runs an online softmax in f32
(base-2 exponent, finite mask value). Only the sequence's last step masks; table entries past the
end are replaced by page 0 before they are dereferenced, and their V rows by zeros. With one split
the kernel writes the normalized output; with several it writes f32 partials (acc, max, sum) that
are combined in XLA. Either way only the G real rows are stored (masked store), so padding the
group costs no memory traffic. The pool BlockSpec squeezes the kv-head dim, so each program sees
a ``[P, page_size, D]`` strided view: on the GPU a pointer, no copy (pools > 4 GiB get 64-bit
offsets from the lowering; page ids stay int32).

Tile choices (defaults in ``DecodeTuning``, to be re-chosen by measurement on the GPU with
``bench/kernels.py``; the only earlier data point, an H200, liked 4 pages x 16 tokens, 4 warps,
2 stages at large batch): ``pages_per_step`` (KV tokens per step = pages_per_step * page_size),
``num_warps``, ``num_stages``; splits are chosen from the shape so that ``Hkv * S * splits`` reaches
about ``target_programs`` (2 x 132 SMs of an H100) without splits shorter than
``min_pages_per_split``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .backend import (MASK_VALUE, block_tables_within_context, dot_precision, gather_pages,
                      initial_softmax_state, is_power_of_2, masked_store, matmul_f32,
                      online_softmax_step, require_power_of_2, resolve_impl, scaled_logits,
                      triton_call, validate_paged_kv, validate_scales)


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """Tile parameters of the decode kernel (static; hashable so it can be a jit static arg)."""

    pages_per_step: int = 4  # KV pages gathered per inner-loop step (power of 2)
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 264  # split-K aims for about this many programs (2 x 132 H100 SMs)
    min_pages_per_split: int = 8  # never split a sequence into pieces shorter than this

    def __post_init__(self):
        for name in ("pages_per_step", "num_warps"):
            if not is_power_of_2(getattr(self, name)):
                raise ValueError(f"DecodeTuning.{name} must be a power of 2, got "
                                 f"{getattr(self, name)}")
        for name in ("num_stages", "target_programs", "min_pages_per_split"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeTuning.{name} must be >= 1, got {getattr(self, name)}")


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, table_width: int,
                         tuning: DecodeTuning = DecodeTuning()) -> int:
    """KV splits per sequence so that small batches x long contexts still fill the GPU."""
    programs = max(1, num_seqs * num_kv_heads)
    wanted = pl.cdiv(tuning.target_programs, programs)
    useful = max(1, table_width // tuning.min_pages_per_split)
    return max(1, min(wanted, useful))


def _decode_kernel(length_ref,  # i32[1]: context length of this sequence
                   table_ref,  # i32[Wp]: its block table, padded to whole steps
                   q_ref,  # [Gp, D]: its query heads for this kv head (zero rows past G)
                   k_ref,  # [P, page_size, D]: the K pool of this kv head
                   v_ref,  # [P, page_size, D]
                   *out_refs,  # 1 split: o [Gp, D]; else o f32[Gp, D], m f32[Gp], l f32[Gp]
                   sm_scale: float, soft_cap: float | None, pages_per_step: int,
                   num_splits: int, group: int):
    page_size = k_ref.shape[1]
    block_k = pages_per_step * page_size
    precision = dot_precision(q_ref.dtype)
    length = length_ref[0]
    q = q_ref[...]  # [Gp, D]

    num_pages = pl.cdiv(length, page_size)
    pages_per_split = pl.cdiv(pl.cdiv(num_pages, num_splits), pages_per_step) * pages_per_step
    first = pl.program_id(2) * pages_per_split
    end = jnp.minimum(first + pages_per_split, num_pages)
    num_steps = pl.cdiv(jnp.maximum(end - first, 0), pages_per_step)
    # Steps whose pages all lie inside the context need no mask.
    num_full = jnp.clip((length // page_size - first) // pages_per_step, 0, num_steps)

    def step(i, carry, *, masked: bool):
        page0 = first + i * pages_per_step
        page_ids = table_ref[pl.ds(page0, pages_per_step)]  # i32[pages_per_step]
        if masked:
            page_idx = page0 + jnp.arange(pages_per_step, dtype=jnp.int32)
            page_ids = jnp.where(page_idx < num_pages, page_ids, 0)
        k = gather_pages(k_ref, page_ids)  # [block_k, D]
        v = gather_pages(v_ref, page_ids)
        logits = scaled_logits(matmul_f32(q, k, transpose_b=True, precision=precision),
                               sm_scale=sm_scale, soft_cap=soft_cap)  # f32[Gp, block_k]
        if masked:
            kv_pos = page0 * page_size + jnp.arange(block_k, dtype=jnp.int32)
            valid = kv_pos < length
            logits = jnp.where(valid[None, :], logits, MASK_VALUE)
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # 0 * NaN guard
        return online_softmax_step(*carry, logits, v, precision=precision)

    carry = initial_softmax_state(*q.shape)
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True), carry)

    # Only the G real query heads are stored (the padded rows of the outputs stay unwritten and
    # are sliced off in XLA): with split-K the f32 partials are a visible share of the traffic.
    real_row = jnp.arange(q.shape[0], dtype=jnp.int32) < group
    if num_splits == 1:
        (o_ref,) = out_refs
        out = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
        masked_store(o_ref, out, real_row[:, None])
    else:
        o_ref, m_ref, l_ref = out_refs
        masked_store(o_ref, acc, real_row[:, None])
        masked_store(m_ref, m, real_row)
        masked_store(l_ref, l, real_row)


def _combine_splits(acc: jax.Array,  # f32[S, Hkv, K, G, D]: unnormalized partial outputs
                    m: jax.Array,  # f32[S, Hkv, K, G]: partial maxima (base-2 logits)
                    l: jax.Array,  # f32[S, Hkv, K, G]: partial softmax sums
                    ) -> jax.Array:  # f32[S, Hkv, G, D]
    m_max = m.max(axis=2, keepdims=True)
    weight = jnp.exp2(m - m_max)  # empty splits: exp2(MASK - real max) == 0
    denom = (l * weight).sum(axis=2)
    num = (acc * weight[..., None]).sum(axis=2)
    return num / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def _decode_pallas(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale, soft_cap,
                   num_kv_splits, tuning: DecodeTuning, interpret: bool):
    num_seqs, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    table_width = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    padded_group = max(16, pl.next_power_of_2(group))
    pps = tuning.pages_per_step
    splits = num_kv_splits or choose_num_kv_splits(num_seqs, num_kv_heads, table_width, tuning)

    lengths = jnp.clip(seq_lens, 0, table_width * page_size)  # never read past the table
    tables = jnp.pad(block_tables, ((0, 0), (0, -table_width % pps)))  # last step stays in bounds
    q_groups = jnp.pad(q.reshape(num_seqs, num_kv_heads, group, head_dim),
                       ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))

    kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, soft_cap=soft_cap,
                               pages_per_step=pps, num_splits=splits, group=group)
    pool_spec = pl.BlockSpec((num_pages, page_size, None, head_dim),
                             lambda h, s, k: (0, 0, h, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda h, s, k: (s,)),
        pl.BlockSpec((None, tables.shape[1]), lambda h, s, k: (s, 0)),
        pl.BlockSpec((None, None, padded_group, head_dim), lambda h, s, k: (s, h, 0, 0)),
        pool_spec, pool_spec,
    ]
    if splits == 1:
        out_specs = pl.BlockSpec((None, None, padded_group, head_dim),
                                 lambda h, s, k: (s, h, 0, 0))
        out_shape = jax.ShapeDtypeStruct(q_groups.shape, q.dtype)
    else:
        part_shape = (num_seqs, num_kv_heads, splits, padded_group)
        out_specs = [
            pl.BlockSpec((None, None, None, padded_group, head_dim),
                         lambda h, s, k: (s, h, k, 0, 0)),
            pl.BlockSpec((None, None, None, padded_group), lambda h, s, k: (s, h, k, 0)),
            pl.BlockSpec((None, None, None, padded_group), lambda h, s, k: (s, h, k, 0)),
        ]
        out_shape = [jax.ShapeDtypeStruct(part_shape + (head_dim,), jnp.float32),
                     jax.ShapeDtypeStruct(part_shape, jnp.float32),
                     jax.ShapeDtypeStruct(part_shape, jnp.float32)]
    out = triton_call(
        kernel,
        name=f"paged_decode_attention_pps{pps}_splits{splits}",
        grid=(num_kv_heads, num_seqs, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        interpret=interpret,
    )(lengths, tables, q_groups, k_cache, v_cache)
    if splits > 1:  # slice the real heads first: the padded rows were never written
        acc, m, l = out
        out = _combine_splits(acc[..., :group, :], m[..., :group], l[..., :group])
    else:
        out = out[:, :, :group, :]
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)


def _validate(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, soft_cap,
              num_kv_splits) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [S, Hq, D], got shape {q.shape}")
    validate_paged_kv(k_cache, v_cache, block_tables, seq_lens, num_q_heads=q.shape[1],
                      head_dim=q.shape[2], q_dtype=q.dtype)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but q has "
                         f"{q.shape[0]} sequences")
    validate_scales(sm_scale, soft_cap)
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be None or >= 1, got {num_kv_splits}")


def _validate_for_kernel(k_cache, tuning: DecodeTuning) -> None:
    page_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    require_power_of_2("page_size", page_size)
    require_power_of_2("head_dim", head_dim)
    if head_dim < 16 or tuning.pages_per_step * page_size < 16:
        raise ValueError(f"head_dim ({head_dim}) and pages_per_step * page_size "
                         f"({tuning.pages_per_step * page_size}) must be >= 16 (matmul tiles)")


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "num_kv_splits", "impl",
                                             "interpret", "tuning"))
def paged_decode_attention(q: jax.Array,  # [S, Hq, D]: one new token per sequence
                           k_cache: jax.Array,  # [P, page_size, Hkv, D]
                           v_cache: jax.Array,  # [P, page_size, Hkv, D]
                           block_tables: jax.Array,  # i32[S, W]
                           seq_lens: jax.Array,  # i32[S]: context length incl. the new token
                           *, sm_scale: float, soft_cap: float | None = None,
                           num_kv_splits: int | None = None, impl: str = "auto",
                           interpret: bool = False,
                           tuning: DecodeTuning = DecodeTuning()) -> jax.Array:  # [S, Hq, D]
    """Decode attention of each sequence's single query token over its paged context.

    Attends to context positions ``0 .. seq_lens[s] - 1`` (the new token's K/V must already be in
    the pool). Rows with ``seq_lens == 0`` give zeros. ``soft_cap`` applies
    ``soft_cap * tanh(logits / soft_cap)`` to the scaled logits. ``num_kv_splits=None`` picks the
    split count from the shape (see ``choose_num_kv_splits``). ``impl``: "auto" | "pallas" |
    "reference"; ``interpret=True`` runs the Pallas kernel on the CPU.
    """
    _validate(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, soft_cap, num_kv_splits)
    if resolve_impl(impl) == "reference" or q.shape[0] == 0:
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                                sm_scale=sm_scale, soft_cap=soft_cap)
    _validate_for_kernel(k_cache, tuning)
    return _decode_pallas(q, k_cache, v_cache, block_tables, seq_lens, sm_scale=sm_scale,
                          soft_cap=soft_cap, num_kv_splits=num_kv_splits, tuning=tuning,
                          interpret=interpret)


def paged_decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                     block_tables: jax.Array, seq_lens: jax.Array, *,
                                     sm_scale: float, soft_cap: float | None = None,
                                     num_kv_splits: int | None = None, impl: str = "auto",
                                     interpret: bool = False,
                                     tuning: DecodeTuning | None = None) -> jax.Array:
    """XLA gather + einsum: gather each sequence's pages into a dense context, masked softmax.

    Scores and softmax in f32 (f32 inputs use full-precision matmuls); the split/tile arguments
    are accepted for signature parity and ignored.
    """
    del num_kv_splits, impl, interpret, tuning
    _validate(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, soft_cap, None)
    num_seqs, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    context = block_tables.shape[1] * page_size
    precision = dot_precision(q.dtype)

    tables = block_tables_within_context(block_tables, seq_lens, page_size)
    k = k_cache[tables].reshape(num_seqs, context, num_kv_heads, head_dim)
    v = v_cache[tables].reshape(num_seqs, context, num_kv_heads, head_dim)
    valid = jnp.arange(context)[None, :] < seq_lens[:, None]  # [S, L]
    v = jnp.where(valid[:, :, None, None], v, jnp.zeros_like(v))
    q_groups = q.reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    s = jnp.einsum("shgd,sthd->shgt", q_groups, k, precision=precision,
                   preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    allowed = valid[:, None, None, :]
    m = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("shgt,sthd->shgd", p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
    return o.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)
