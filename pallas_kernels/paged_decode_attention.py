"""Paged attention for decode (one query token per sequence), split-K ("flash-decoding").

Layout. q ``[S, Hq, D]``; K/V pools ``[P, page_size, Hkv, D]``; block tables ``i32[S, W]``;
``seq_lens`` i32[S] (0 for padding rows, which output zeros). GQA: query head ``h`` reads kv head
``h // G`` with ``G = Hq // Hkv``.

Kernel. One program per (sequence, kv head, KV split); the grid is ``(S, Hkv, splits)`` (CUDA's x
axis, the fastest-launched, runs over sequences) or ``(Hkv, S, splits)`` (``launch_order``). A
program owns one contiguous range of its sequence's pages: the ``ceil(pages / splits)`` pages
(rounded up to whole steps) of its split, computed from the *actual* length, so short sequences in
a wide table still spread over all splits. Its G query heads are the M rows of the matmuls, loaded
straight from q with a row mask and padded to ``Gp >= 16`` rows (tl.dot's minimum). Each inner step
gathers ``pages_per_step`` pages of K and V through the block table as one
``[pages_per_step * page_size, D]`` tile per operand and runs an online softmax in f32 (base-2
exponent, finite mask value). With one split the kernel stores the normalized output of its G rows
straight into ``[S, Hq, D]``; with several it stores f32 partials (acc, max, sum) of its G rows,
combined in XLA. So no XLA pass pads q or slices the output.

Positions past the context. Table entries past a sequence's end may hold anything and the slots
after its last token may hold NaN, so those rows must neither be read from a bad address nor
reach the P @ V product. ``guard="masked_load"`` loads K/V rows with a row mask (on the GPU a
zero-filling predicated copy: such rows are never read); ``guard="where"`` replaces table entries
past the end by page 0 and zeroes V rows with ``jnp.where`` after the load. Logits of those rows
get ``MASK_VALUE`` either way. ``mask_steps="every"`` applies this in every step (one loop);
``"last"`` runs the steps wholly inside the context unmasked and masks only the tail.

Why these knobs exist. Decode is a stream of K/V bytes; each program keeps about one tile per
operand in flight (the Triton pipeliner waits for step i's copy before issuing step i+1's with
``num_stages=2``), so bandwidth comes from programs resident per SM, i.e. from registers and
shared memory per program. Compiled for sm_90 with Triton 3.9, a step whose V tile feeds the dot
with no mask/select is software-pipelined through *registers* (a [block_k, D] tile carried across
iterations: ~160 registers instead of ~120, 3 resident programs per SM instead of 4), which is what
made the two-loop kernel ~25% slower than the one-loop example at large batch. Which combination
wins on a given card is decided by ``bench/kernels.py --decode-variants``.

Splits. ``choose_num_kv_splits`` fills one wave of ``target_programs`` (4 resident programs x 132
SMs) when ``S * Hkv`` alone does not, without splits shorter than ``min_pages_per_split`` pages.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .backend import (MASK_VALUE, block_tables_within_context, dot_precision,
                      initial_softmax_state, is_power_of_2, masked_store, matmul_f32,
                      online_softmax_step, require_power_of_2, resolve_impl, scaled_logits,
                      triton_call, validate_paged_kv, validate_scales)

LAUNCH_ORDERS = ("seq_inner", "head_inner")
MASK_STEPS = ("every", "last")
GUARDS = ("masked_load", "where")


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """Tile and structure parameters of the decode kernel (static; hashable: a jit static arg)."""

    pages_per_step: int = 4  # KV pages gathered per inner-loop step (power of 2)
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 528  # split-K fills one wave: 4 resident programs x 132 SMs
    min_pages_per_split: int = 8  # never split a sequence into pieces shorter than this
    launch_order: str = "seq_inner"  # CUDA x axis over sequences ("seq_inner") or kv heads
    mask_steps: str = "every"  # mask every step (one loop) or only the tail ("last": two loops)
    guard: str = "masked_load"  # keep rows past the context out: masked loads or jnp.where

    def __post_init__(self):
        for name in ("pages_per_step", "num_warps"):
            if not is_power_of_2(getattr(self, name)):
                raise ValueError(f"DecodeTuning.{name} must be a power of 2, got "
                                 f"{getattr(self, name)}")
        for name in ("num_stages", "target_programs", "min_pages_per_split"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeTuning.{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("launch_order", LAUNCH_ORDERS), ("mask_steps", MASK_STEPS),
                              ("guard", GUARDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecodeTuning.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, table_width: int,
                         tuning: DecodeTuning = DecodeTuning()) -> int:
    """KV splits per sequence so that small batches x long contexts still fill the GPU.

    The most splits whose programs (``num_seqs * num_kv_heads * splits``) still fit in one wave
    of ``target_programs``, and no split shorter than ``min_pages_per_split`` pages; 1 once the
    batch alone fills half a wave.
    """
    programs = max(1, num_seqs * num_kv_heads)
    fitting = max(1, tuning.target_programs // programs)
    useful = max(1, table_width // tuning.min_pages_per_split)
    return min(fitting, useful)


@dataclasses.dataclass(frozen=True)
class _KernelShape:
    """Static facts the kernel body needs besides its refs."""

    sm_scale: float
    soft_cap: float | None
    group: int  # G: query heads per kv head
    padded_group: int  # Gp: G rounded up to a power of 2, >= 16
    table_width: int  # W before padding: lengths are clipped to W * page_size
    num_splits: int
    tuning: DecodeTuning


def _program_ids(launch_order: str) -> tuple[jax.Array, jax.Array]:
    """(sequence, kv head) of this program under the grid of ``_grid``."""
    if launch_order == "seq_inner":
        return pl.program_id(0), pl.program_id(1)
    return pl.program_id(1), pl.program_id(0)


def _grid(launch_order: str, num_seqs: int, num_kv_heads: int, splits: int):
    """Grid, and index_map adapter taking (seq, head, split) order to the grid's order."""
    if launch_order == "seq_inner":
        return (num_seqs, num_kv_heads, splits), lambda f: (lambda s, h, k: f(s, h, k))
    return (num_kv_heads, num_seqs, splits), lambda f: (lambda h, s, k: f(s, h, k))


def _kv_tile(pool_ref, page_ids: jax.Array, valid: jax.Array | None, *, page_size: int,
             guard: str) -> jax.Array:
    """Rows ``page_ids[j] * page_size + t`` of one kv head's pool, as a ``[n * page_size, D]`` tile.

    pool_ref: [P, page_size, D]; page_ids: i32[n]; valid: bool[n * page_size] or None (all rows
    inside the context). With ``guard="masked_load"`` invalid rows are not read and come back 0;
    with ``"where"`` the caller has made their page ids safe and their values are loaded as is.
    """
    n, head_dim = page_ids.shape[0], pool_ref.shape[2]
    block_k = n * page_size
    page_of_row = jnp.broadcast_to(page_ids[:, None], (n, page_size)).reshape(block_k, 1)
    slot_of_row = jnp.broadcast_to(jnp.arange(page_size, dtype=jnp.int32)[None, :],
                                   (n, page_size)).reshape(block_k, 1)
    col = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    rows = pool_ref.at[page_of_row, slot_of_row, col]  # one gather indexer -> [block_k, D]
    if valid is None or guard == "where":
        return plt.load(rows)
    return plt.load(rows, mask=jnp.broadcast_to(valid[:, None], (block_k, head_dim)), other=0)


def _decode_kernel(length_ref,  # i32[1]: context length of this sequence
                   table_ref,  # i32[Wp]: its block table, padded to whole steps
                   q_ref,  # [Hq, D]: all query heads of this sequence
                   k_ref,  # [P, page_size, D]: the K pool of this kv head
                   v_ref,  # [P, page_size, D]
                   *out_refs,  # 1 split: o [Hq, D]; else o f32[Hq, D], m f32[Hq], l f32[Hq]
                   shape: _KernelShape):
    tuning = shape.tuning
    pps = tuning.pages_per_step
    page_size = k_ref.shape[1]
    block_k = pps * page_size
    precision = dot_precision(q_ref.dtype)
    _, head = _program_ids(tuning.launch_order)
    length = jnp.clip(length_ref[0], 0, shape.table_width * page_size)

    rows = pl.ds(head * shape.group, shape.padded_group)  # this kv head's query heads (+ padding)
    real_row = jnp.arange(shape.padded_group, dtype=jnp.int32) < shape.group
    q = plt.load(q_ref.at[rows], mask=real_row[:, None], other=0)  # [Gp, D]

    num_pages = pl.cdiv(length, page_size)
    if shape.num_splits == 1:
        first, num_steps = 0, pl.cdiv(num_pages, pps)
    else:
        pages_per_split = pl.cdiv(pl.cdiv(num_pages, shape.num_splits), pps) * pps
        first = pl.program_id(2) * pages_per_split
        end = jnp.minimum(first + pages_per_split, num_pages)
        num_steps = pl.cdiv(jnp.maximum(end - first, 0), pps)

    def step(i, carry, *, masked: bool):
        page0 = first + i * pps
        page_ids = table_ref[pl.ds(page0, pps)]  # i32[pps]
        valid = None
        if masked:
            kv_pos = page0 * page_size + jnp.arange(block_k, dtype=jnp.int32)
            valid = kv_pos < length  # bool[block_k]
            if tuning.guard == "where":  # never dereference entries past the end
                page_idx = page0 + jnp.arange(pps, dtype=jnp.int32)
                page_ids = jnp.where(page_idx < num_pages, page_ids, 0)
        k = _kv_tile(k_ref, page_ids, valid, page_size=page_size, guard=tuning.guard)
        v = _kv_tile(v_ref, page_ids, valid, page_size=page_size, guard=tuning.guard)
        logits = scaled_logits(matmul_f32(q, k, transpose_b=True, precision=precision),
                               sm_scale=shape.sm_scale, soft_cap=shape.soft_cap)  # f32[Gp, bk]
        if masked:
            logits = jnp.where(valid[None, :], logits, MASK_VALUE)
            if tuning.guard == "where":
                v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # 0 * NaN guard
        return online_softmax_step(*carry, logits, v, precision=precision)

    carry = initial_softmax_state(*q.shape)
    if tuning.mask_steps == "every":
        acc, m, l = lax.fori_loop(0, num_steps, functools.partial(step, masked=True), carry)
    else:  # steps whose pages all lie inside the context need no mask
        num_full = jnp.clip((length // page_size - first) // pps, 0, num_steps)
        carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True),
                                  carry)

    # Only the G real query heads are stored: the padded rows belong to the next kv head.
    if shape.num_splits == 1:
        (o_ref,) = out_refs
        out = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
        masked_store(o_ref.at[rows], out, real_row[:, None])
    else:
        o_ref, m_ref, l_ref = out_refs
        masked_store(o_ref.at[rows], acc, real_row[:, None])
        masked_store(m_ref.at[rows], m, real_row)
        masked_store(l_ref.at[rows], l, real_row)


def _combine_splits(acc: jax.Array,  # f32[S, K, Hq, D]: unnormalized partial outputs
                    m: jax.Array,  # f32[S, K, Hq]: partial maxima (base-2 logits)
                    l: jax.Array,  # f32[S, K, Hq]: partial softmax sums
                    ) -> jax.Array:  # f32[S, Hq, D]
    m_max = m.max(axis=1, keepdims=True)
    weight = jnp.exp2(m - m_max)  # empty splits: exp2(MASK - real max) == 0
    denom = (l * weight).sum(axis=1)
    num = (acc * weight[..., None]).sum(axis=1)
    return num / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def _decode_pallas(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale, soft_cap,
                   num_kv_splits, tuning: DecodeTuning, interpret: bool):
    num_seqs, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    table_width = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    pps = tuning.pages_per_step
    splits = num_kv_splits or choose_num_kv_splits(num_seqs, num_kv_heads, table_width, tuning)
    shape = _KernelShape(sm_scale=sm_scale, soft_cap=soft_cap, group=group,
                         padded_group=max(16, pl.next_power_of_2(group)),
                         table_width=table_width, num_splits=splits, tuning=tuning)
    # The last step reads whole steps of the table (a no-op pad when W is a multiple of pps).
    tables = jnp.pad(block_tables, ((0, 0), (0, -table_width % pps)))

    grid, in_order = _grid(tuning.launch_order, num_seqs, num_kv_heads, splits)
    pool_spec = pl.BlockSpec((num_pages, page_size, None, head_dim),
                             in_order(lambda s, h, k: (0, 0, h, 0)))
    in_specs = [
        pl.BlockSpec((1,), in_order(lambda s, h, k: (s,))),
        pl.BlockSpec((None, tables.shape[1]), in_order(lambda s, h, k: (s, 0))),
        pl.BlockSpec((None, num_q_heads, head_dim), in_order(lambda s, h, k: (s, 0, 0))),
        pool_spec, pool_spec,
    ]
    if splits == 1:
        out_specs = pl.BlockSpec((None, num_q_heads, head_dim),
                                 in_order(lambda s, h, k: (s, 0, 0)))
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        part_shape = (num_seqs, splits, num_q_heads)
        out_specs = [
            pl.BlockSpec((None, None, num_q_heads, head_dim),
                         in_order(lambda s, h, k: (s, k, 0, 0))),
            pl.BlockSpec((None, None, num_q_heads), in_order(lambda s, h, k: (s, k, 0))),
            pl.BlockSpec((None, None, num_q_heads), in_order(lambda s, h, k: (s, k, 0))),
        ]
        out_shape = [jax.ShapeDtypeStruct(part_shape + (head_dim,), jnp.float32),
                     jax.ShapeDtypeStruct(part_shape, jnp.float32),
                     jax.ShapeDtypeStruct(part_shape, jnp.float32)]
    out = triton_call(
        functools.partial(_decode_kernel, shape=shape),
        name=f"paged_decode_attention_pps{pps}_splits{splits}",
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        interpret=interpret,
    )(seq_lens, tables, q, k_cache, v_cache)
    if splits > 1:
        out = _combine_splits(*out)
    return out.astype(q.dtype)


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
