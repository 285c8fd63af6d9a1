"""Paged attention for decode (one query token per sequence), split-K ("flash-decoding").

Layout. q ``[S, Hq, D]``; K/V pools ``[P, page_size, Hkv, D]``; block tables ``i32[S, W]``;
``seq_lens`` i32[S] (0 for padding rows, which output zeros). GQA: query head ``h`` reads kv head
``h // G`` with ``G = Hq // Hkv``.

Kernel. One program per (sequence, group of ``heads_per_program`` adjacent kv heads, KV split);
the grid is ``(S, Hkv / hpp, splits)`` (CUDA's x axis, launched fastest, runs over sequences) or
``(Hkv / hpp, S, splits)`` (``launch_order="head_inner"``). A program owns one contiguous range
of its sequence's pages: the ``ceil(pages / splits)`` pages (rounded up to whole steps) of its
split, computed from the *actual* length, so short sequences in a wide table still spread over
all splits. Each inner step gathers ``pages_per_step`` pages of K and V through the block table as
one ``[pages_per_step * page_size, hpp * D]`` tile per operand (the hpp kv heads of a token are
adjacent in the pool: one contiguous row) and runs an online softmax in f32 (base-2 exponent,
finite mask value). The program's ``hpp * G`` query heads are the M rows of the matmuls (padded to
a power of 2 >= 16, tl.dot's minimum), loaded straight from q block-diagonally: row ``r`` holds its
q in the D columns of its own kv head and zeros elsewhere, so ``q @ k.T`` scores every row against
its own head only. One split stores the normalized output rows straight into ``[S, Hq, D]``;
several store f32 partials (acc, max, sum) merged by a second small kernel (``combine="pallas"``)
or in XLA (``split_k_combine.py``). No XLA pass pads q, slices the output or clips lengths.

Positions past the context. Table entries past a sequence's end may hold anything and the slots
after its last token may hold NaN, so those rows must neither be read from a bad address nor
reach the P @ V product. ``guard="masked_load"`` loads K/V rows with a row mask (on the GPU a
zero-filling predicated copy: such rows are never read); ``guard="where"`` replaces table entries
past the end by page 0 and zeroes V rows with ``jnp.where`` after the load. Logits of those rows
get ``MASK_VALUE`` either way. ``mask_steps="last"`` runs the steps wholly inside the context
unmasked and masks only the tail; ``"every"`` masks every step (one loop).

Why the structure matters (Triton 3.9 compiled for sm_90 on a CPU box as a proxy for XLA's Triton;
measure with ``bench/kernels.py --decode-variants``). Decode streams K/V bytes, and each program
keeps about one tile per operand in flight (with ``num_stages`` 2-4 the pipeliner prefetches the
table entries, not a second tile), so bandwidth follows resident programs per SM, i.e. registers
and shared memory per program. The old kernel gathered ``[pps, page, D]`` pages and reshaped them;
in its unmasked loop the V tile went to the dot with no select and was pipelined through
*registers* (~166 registers: 3 programs/SM, vs ~121 and 4 for the one-loop example of
``shared/examples``; bandwidths in bench/RESULTS.md). Gathering rows directly as ``[pps * page, D]`` and guarding with masked loads (so V needs
no second trip through shared memory) gives ~88 registers and 39 KB of shared memory at
``pages_per_step=4``: 5 programs/SM. ``gather="pages"`` keeps the old structure for comparison.

fp8 pools (``kv_quant``). K/V tiles are loaded as fp8 (half the bytes) and converted in registers
to ``kv_quant.compute_dtype`` (f16 for a bf16 query: one instruction per two values, where bf16
takes a chain; ``DecodeTuning.fp8_compute="query"`` keeps q's dtype), which is exact; nothing
else is scaled per element. ``k_scale`` joins the one
multiply per score that is there anyway (``logits = (q . k_code) * (sm_scale * k_scale)``) and
``v_scale`` the one per output row (``out = acc * (v_scale / l)``; split-K partials store
``acc * v_scale``, which the combine, linear in ``acc``, carries through). The scales are one
``f32[2]`` operand, so every layer runs the same compiled kernel.

Splits. ``choose_num_kv_splits`` fills one wave of ``target_programs`` (4 resident programs x 132
SMs) when the batch alone does not, without splits shorter than ``min_pages_per_split`` pages.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxpaged.pallas_kernels.backend import (MASK_VALUE, block_tables_within_context, dot_precision,
                                             initial_softmax_state, is_power_of_2, masked_store,
                                             matmul_f32, normalized_output, online_softmax_step,
                                             require_power_of_2, resolve_impl, scaled_logits,
                                             triton_call, validate_paged_kv, validate_scales)
from jaxpaged.pallas_kernels.kv_quant import (compute_dtype, is_fp8, kv_scales, load_scales,
                                              masked_load_fill, reference_scales, scales_spec,
                                              to_compute)
from jaxpaged.pallas_kernels.split_k_combine import combine_splits_pallas, combine_splits_xla

LAUNCH_ORDERS = ("seq_inner", "head_inner")
MASK_STEPS = ("every", "last")
GUARDS = ("masked_load", "where")
COMBINES = ("pallas", "xla")
GATHERS = ("rows", "pages")


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """Tile and structure parameters of the decode kernel (static; hashable: a jit static arg)."""

    pages_per_step: int = 4  # KV pages gathered per inner-loop step (power of 2)
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 528  # split-K fills one wave: 4 resident programs x 132 SMs
    min_pages_per_split: int = 8  # never split a sequence into pieces shorter than this
    launch_order: str = "seq_inner"  # CUDA x axis over sequences ("seq_inner") or kv heads
    mask_steps: str = "last"  # mask only the tail steps (two loops) or every step ("every")
    guard: str = "masked_load"  # keep rows past the context out: masked loads or jnp.where
    combine: str = "pallas"  # split-K partials merged by a second Pallas kernel or in XLA
    heads_per_program: int = 1  # adjacent kv heads one program reads as one contiguous row
    gather: str = "rows"  # K/V tile as one row gather, or pages then a reshape (the old kernel's)
    # fp8 pools: "auto" computes in kv_quant.compute_dtype (f16 for a bf16 query), "query" in
    # q's dtype (the first fp8 kernel's choice; kept to measure against)
    fp8_compute: str = "auto"

    def __post_init__(self):
        for name in ("pages_per_step", "num_warps", "heads_per_program"):
            if not is_power_of_2(getattr(self, name)):
                raise ValueError(f"DecodeTuning.{name} must be a power of 2, got "
                                 f"{getattr(self, name)}")
        for name in ("num_stages", "target_programs", "min_pages_per_split"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeTuning.{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("launch_order", LAUNCH_ORDERS), ("mask_steps", MASK_STEPS),
                              ("guard", GUARDS), ("combine", COMBINES),
                              ("gather", GATHERS), ("fp8_compute", ("auto", "query"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecodeTuning.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.gather == "pages" and self.guard != "where":
            raise ValueError("DecodeTuning.gather='pages' needs guard='where' (a masked load of a "
                             "page gather does not run in interpret mode)")


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, table_width: int,
                         tuning: DecodeTuning = DecodeTuning()) -> int:
    """KV splits per sequence so that small batches x long contexts still fill the GPU.

    The most splits whose programs (``num_seqs * num_kv_heads / heads_per_program * splits``)
    still fit in one wave of ``target_programs``, and no split shorter than
    ``min_pages_per_split`` pages; 1 once the batch alone fills half a wave.
    """
    programs = max(1, num_seqs * max(1, num_kv_heads // tuning.heads_per_program))
    fitting = max(1, tuning.target_programs // programs)
    useful = max(1, table_width // tuning.min_pages_per_split)
    return min(fitting, useful)


@dataclasses.dataclass(frozen=True)
class _KernelShape:
    """Static facts the kernel body needs besides its refs."""

    sm_scale: float
    soft_cap: float | None
    group: int  # G: query heads per kv head
    head_dim: int  # D
    table_width: int  # W before padding: lengths are clipped to W * page_size
    num_splits: int
    tuning: DecodeTuning
    quantized: bool  # an fp8 pool: the kernel takes the f32[2] scale operand
    compute_dtype: jnp.dtype  # K/V tiles and q are converted to this before the matmuls

    @property
    def real_rows(self) -> int:  # query heads of one program: heads_per_program x G
        return self.tuning.heads_per_program * self.group

    @property
    def rows(self) -> int:  # M of the matmuls: real rows rounded up to a power of 2, >= 16
        return max(16, pl.next_power_of_2(self.real_rows))

    @property
    def row_width(self) -> int:  # K of q @ k.T: the D values of every kv head of the program
        return self.tuning.heads_per_program * self.head_dim


def _load_q(q_ref, shape: _KernelShape, head_group: jax.Array) -> jax.Array:
    """The program's query heads as a block-diagonal ``[M, heads_per_program * D]`` tile.

    Row ``r`` is query head ``head_group * real_rows + r``; it attends through kv head
    ``r // G`` of the program, whose D values are columns ``(r // G) * D ...`` of a K/V row, so
    its q fills only that block of columns (zeros elsewhere, and in the padding rows).
    """
    row = jnp.arange(shape.rows, dtype=jnp.int32)[:, None]
    col = jnp.arange(shape.row_width, dtype=jnp.int32)[None, :]
    on_block = (row < shape.real_rows) & (row // shape.group == col // shape.head_dim)
    return plt.load(q_ref.at[head_group * shape.real_rows + row, col % shape.head_dim],
                    mask=on_block, other=0)


def _own_block(acc: jax.Array, shape: _KernelShape) -> jax.Array:
    """``[M, hpp * D] -> [M, D]``: each row's block of its own kv head (the others are junk)."""
    hpp, head_dim = shape.tuning.heads_per_program, shape.head_dim
    if hpp == 1:
        return acc
    row = jnp.arange(shape.rows, dtype=jnp.int32)[:, None, None]
    block = jnp.arange(hpp, dtype=jnp.int32)[None, :, None]
    blocks = acc.reshape(shape.rows, hpp, head_dim)
    return jnp.where(row // shape.group == block, blocks, 0.0).sum(axis=1)


def _program_ids(launch_order: str) -> tuple[jax.Array, jax.Array]:
    """(sequence, kv head group) of this program under the grid of ``_grid``."""
    if launch_order == "seq_inner":
        return pl.program_id(0), pl.program_id(1)
    return pl.program_id(1), pl.program_id(0)


def _grid(launch_order: str, num_seqs: int, num_head_groups: int, splits: int):
    """Grid, and an adapter from index maps written as ``f(seq, head group, split)``."""
    if launch_order == "seq_inner":
        return (num_seqs, num_head_groups, splits), lambda f: (lambda s, h, k: f(s, h, k))
    return (num_head_groups, num_seqs, splits), lambda f: (lambda h, s, k: f(s, h, k))


def _kv_tile(pool_ref, page_ids: jax.Array, valid: jax.Array | None, *, page_size: int,
             tuning: DecodeTuning) -> jax.Array:
    """Rows ``page_ids[j] * page_size + t`` of a pool, as a ``[n * page_size, D']`` tile.

    pool_ref: [P, page_size, D'] (the program's kv heads, D' = hpp * D); page_ids: i32[n];
    valid: bool[n * page_size] or None (all rows inside the context). With
    ``guard="masked_load"`` invalid rows are not read and come back 0; with ``"where"`` the
    caller has made their page ids safe and their values are loaded as is.
    """
    n, head_dim = page_ids.shape[0], pool_ref.shape[2]
    block_k = n * page_size
    if tuning.gather == "pages":  # [n, page_size, D] then a reshape of the loaded value
        return pool_ref[page_ids].reshape(block_k, head_dim)
    page_of_row = jnp.broadcast_to(page_ids[:, None], (n, page_size)).reshape(block_k, 1)
    slot_of_row = jnp.broadcast_to(jnp.arange(page_size, dtype=jnp.int32)[None, :],
                                   (n, page_size)).reshape(block_k, 1)
    col = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    rows = pool_ref.at[page_of_row, slot_of_row, col]  # one gather indexer -> [block_k, D']
    if valid is None or tuning.guard == "where":
        return plt.load(rows)
    return plt.load(rows, mask=jnp.broadcast_to(valid[:, None], (block_k, head_dim)),
                    other=masked_load_fill(pool_ref.dtype))


def _decode_kernel(length_ref,  # i32[1]: context length of this sequence
                   table_ref,  # i32[Wp]: its block table, padded to whole steps
                   q_ref,  # [Hq, D]: all query heads of this sequence
                   k_ref,  # [P, page_size, hpp * D]: the K pool of this program's kv heads
                   v_ref,  # [P, page_size, hpp * D]
                   *refs,  # [f32[2] (k_scale, v_scale): fp8 pools only], then the outputs:
                   # 1 split: o [Hq, D]; else o f32[Hq, D], m f32[Hq], l f32[Hq]
                   shape: _KernelShape):
    k_scale, v_scale = load_scales(refs[:1] if shape.quantized else ())
    out_refs = refs[1:] if shape.quantized else refs
    tuning = shape.tuning
    pps = tuning.pages_per_step
    page_size = k_ref.shape[1]
    block_k = pps * page_size
    precision = dot_precision(q_ref.dtype)
    _, head_group = _program_ids(tuning.launch_order)
    length = jnp.clip(length_ref[0], 0, shape.table_width * page_size)

    q = to_compute(_load_q(q_ref, shape, head_group), shape.compute_dtype)  # [M, hpp * D]

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
        # fp8 -> the compute dtype is exact (kv_quant); for other pools the cast is a no-op.
        k = _kv_tile(k_ref, page_ids, valid, page_size=page_size, tuning=tuning).astype(q.dtype)
        v = _kv_tile(v_ref, page_ids, valid, page_size=page_size, tuning=tuning).astype(q.dtype)
        logits = scaled_logits(matmul_f32(q, k, transpose_b=True, precision=precision),
                               sm_scale=shape.sm_scale, soft_cap=shape.soft_cap,
                               k_scale=k_scale)  # f32[M, bk]
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

    # Only the real query heads are stored (the padding rows would overwrite the next program's).
    acc = _own_block(acc, shape)  # [M, D]
    rows = pl.ds(head_group * shape.real_rows, shape.rows)
    real_row = jnp.arange(shape.rows, dtype=jnp.int32) < shape.real_rows
    if shape.num_splits == 1:
        (o_ref,) = out_refs
        out = normalized_output(acc, l, v_scale).astype(o_ref.dtype)
        masked_store(o_ref.at[rows], out, real_row[:, None])
    else:
        o_ref, m_ref, l_ref = out_refs
        if v_scale is not None:  # the combine is linear in acc: scale the partials
            acc = acc * v_scale
        masked_store(o_ref.at[rows], acc, real_row[:, None])
        masked_store(m_ref.at[rows], m, real_row)
        masked_store(l_ref.at[rows], l, real_row)


def _output_specs(in_order, num_seqs: int, splits: int, num_q_heads: int, head_dim: int,
                  dtype: jnp.dtype):
    """(out_specs, out_shape): the output ``[S, Hq, D]``, or the f32 partials of every split."""
    if splits == 1:
        return (pl.BlockSpec((None, num_q_heads, head_dim), in_order(lambda s, h, k: (s, 0, 0))),
                jax.ShapeDtypeStruct((num_seqs, num_q_heads, head_dim), dtype))
    part_shape = (num_seqs, splits, num_q_heads)
    row_spec = pl.BlockSpec((None, None, num_q_heads), in_order(lambda s, h, k: (s, k, 0)))
    return ([pl.BlockSpec((None, None, num_q_heads, head_dim),
                          in_order(lambda s, h, k: (s, k, 0, 0))), row_spec, row_spec],
            [jax.ShapeDtypeStruct(part_shape + (head_dim,), jnp.float32),
             jax.ShapeDtypeStruct(part_shape, jnp.float32),
             jax.ShapeDtypeStruct(part_shape, jnp.float32)])


def _decode_pallas(q, k_cache, v_cache, block_tables, seq_lens, scales, *, sm_scale, soft_cap,
                   num_kv_splits, tuning: DecodeTuning, interpret: bool):
    num_seqs, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    table_width = block_tables.shape[1]
    pps, hpp = tuning.pages_per_step, tuning.heads_per_program
    splits = num_kv_splits or choose_num_kv_splits(num_seqs, num_kv_heads, table_width, tuning)
    shape = _KernelShape(sm_scale=sm_scale, soft_cap=soft_cap,
                         group=num_q_heads // num_kv_heads, head_dim=head_dim,
                         table_width=table_width, num_splits=splits, tuning=tuning,
                         quantized=scales is not None,
                         compute_dtype=(compute_dtype(k_cache.dtype, q.dtype)
                                        if tuning.fp8_compute == "auto" else jnp.dtype(q.dtype)))
    # hpp adjacent kv heads of a token are one contiguous row of hpp * D values (a free reshape).
    pools = [c.reshape(num_pages, page_size, num_kv_heads // hpp, hpp * head_dim)
             for c in (k_cache, v_cache)]
    tables = block_tables
    if table_width % pps:  # the last step reads a whole step of the table
        tables = jnp.pad(block_tables, ((0, 0), (0, -table_width % pps)))

    grid, in_order = _grid(tuning.launch_order, num_seqs, num_kv_heads // hpp, splits)
    pool_spec = pl.BlockSpec((num_pages, page_size, None, hpp * head_dim),
                             in_order(lambda s, h, k: (0, 0, h, 0)))
    in_specs = [
        pl.BlockSpec((1,), in_order(lambda s, h, k: (s,))),
        pl.BlockSpec((None, tables.shape[1]), in_order(lambda s, h, k: (s, 0))),
        pl.BlockSpec((None, num_q_heads, head_dim), in_order(lambda s, h, k: (s, 0, 0))),
        pool_spec, pool_spec,
    ]
    quantized = () if scales is None else (scales,)
    in_specs += [scales_spec()] * len(quantized)
    out_specs, out_shape = _output_specs(in_order, num_seqs, splits, num_q_heads, head_dim,
                                         q.dtype)
    out = triton_call(
        functools.partial(_decode_kernel, shape=shape),
        name=f"paged_decode_attention_pps{pps}_splits{splits}"
             + ("" if scales is None else f"_{k_cache.dtype.name}"),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        interpret=interpret,
    )(seq_lens, tables, q, *pools, *quantized)
    if splits == 1:
        return out
    if tuning.combine == "pallas":
        return combine_splits_pallas(*out, dtype=q.dtype, interpret=interpret)
    return combine_splits_xla(*out).astype(q.dtype)


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
    page_size, num_kv_heads, head_dim = k_cache.shape[1:]
    require_power_of_2("page_size", page_size)
    require_power_of_2("head_dim", head_dim)
    if num_kv_heads % tuning.heads_per_program:
        raise ValueError(f"DecodeTuning.heads_per_program ({tuning.heads_per_program}) must "
                         f"divide the number of kv heads ({num_kv_heads})")
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
                           *, k_scale: jax.Array | float | None = None,  # f32: fp8 pools only
                           v_scale: jax.Array | float | None = None,
                           sm_scale: float, soft_cap: float | None = None,
                           num_kv_splits: int | None = None, impl: str = "auto",
                           interpret: bool = False,
                           tuning: DecodeTuning | None = None) -> jax.Array:  # [S, Hq, D]
    """Decode attention of each sequence's single query token over its paged context.

    Attends to context positions ``0 .. seq_lens[s] - 1`` (the new token's K/V must already be in
    the pool). Rows with ``seq_lens == 0`` give zeros. An fp8 pool (q bf16/f16/f32) is read as
    ``code * k_scale`` / ``code * v_scale`` (a missing scale is 1.0); other pools take no
    scales. ``soft_cap`` applies ``soft_cap * tanh(logits / soft_cap)`` to the scaled logits.
    ``num_kv_splits=None`` picks the split count from the shape (see ``choose_num_kv_splits``);
    ``tuning=None`` picks the kernel structure from the shape (``default_decode_tuning``).
    ``impl``: "auto" | "pallas" | "reference"; ``interpret=True`` runs the Pallas kernel on the
    CPU.
    """
    _validate(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, soft_cap, num_kv_splits)
    scales = kv_scales(k_cache.dtype, k_scale, v_scale)
    if resolve_impl(impl) == "reference" or q.shape[0] == 0:
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                                k_scale=k_scale, v_scale=v_scale,
                                                sm_scale=sm_scale, soft_cap=soft_cap)
    tuning = tuning or default_decode_tuning(q.shape[0], k_cache.shape[2], k_cache.dtype)
    _validate_for_kernel(k_cache, tuning)
    return _decode_pallas(q, k_cache, v_cache, block_tables, seq_lens, scales, sm_scale=sm_scale,
                          soft_cap=soft_cap, num_kv_splits=num_kv_splits, tuning=tuning,
                          interpret=interpret)


# With fewer than 16 (sequence, kv head) pairs, reading two adjacent kv heads per program
# (512-byte rows) two pages at a time, in splits of 4 pages, measured fastest at 1x4096 on the
# H100 and the H200; from 4x16384 on the default won (bench/RESULTS.md, kernel variants).
_FEW_PAIRS = 16
_FEW_PAIRS_TUNING = DecodeTuning(heads_per_program=2, pages_per_step=2, min_pages_per_split=4)
# fp8 pages are half as wide: eight pages a step keep a step's bytes (and a thread's load width)
# those of four bf16 pages; measured faster on every shape but the few-pairs one (bench/RESULTS.md,
# fp8 KV cache).
_FP8_TUNING = DecodeTuning(pages_per_step=8)
# Few pairs on fp8 pools: four pipeline stages measured faster than two (bench/RESULTS.md,
# 2026-12-08, kernel variants).
_FP8_FEW_PAIRS_TUNING = dataclasses.replace(_FEW_PAIRS_TUNING, num_stages=4)


def default_decode_tuning(num_seqs: int, num_kv_heads: int,
                          kv_dtype: jnp.dtype | None = None) -> DecodeTuning:
    """The kernel structure measured fastest for this decode shape (and pool dtype)."""
    fp8 = kv_dtype is not None and is_fp8(kv_dtype)
    if num_seqs * num_kv_heads < _FEW_PAIRS and num_kv_heads % 2 == 0:
        return _FP8_FEW_PAIRS_TUNING if fp8 else _FEW_PAIRS_TUNING
    if fp8:
        return _FP8_TUNING
    return DecodeTuning()


def paged_decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                     block_tables: jax.Array, seq_lens: jax.Array, *,
                                     k_scale: jax.Array | float | None = None,
                                     v_scale: jax.Array | float | None = None,
                                     sm_scale: float, soft_cap: float | None = None,
                                     num_kv_splits: int | None = None, impl: str = "auto",
                                     interpret: bool = False,
                                     tuning: DecodeTuning | None = None) -> jax.Array:
    """XLA gather + einsum: gather each sequence's pages into a dense context, masked softmax.

    Scores and softmax in f32 (f32 inputs use full-precision matmuls); an fp8 context is
    converted to ``kv_quant.compute_dtype`` (exact; f16 for a bf16 query) and the scales folded
    as in the kernel. The split/tile arguments are accepted for signature parity and ignored.
    """
    del num_kv_splits, impl, interpret, tuning
    _validate(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, soft_cap, None)
    k_scale, v_scale = reference_scales(k_cache.dtype, k_scale, v_scale)
    num_seqs, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    context = block_tables.shape[1] * page_size
    precision = dot_precision(q.dtype)
    compute = compute_dtype(k_cache.dtype, q.dtype)
    out_dtype = q.dtype
    q = to_compute(q, compute)

    tables = block_tables_within_context(block_tables, seq_lens, page_size)
    k = k_cache[tables].reshape(num_seqs, context, num_kv_heads, head_dim).astype(compute)
    v = v_cache[tables].reshape(num_seqs, context, num_kv_heads, head_dim).astype(compute)
    valid = jnp.arange(context)[None, :] < seq_lens[:, None]  # [S, L]
    v = jnp.where(valid[:, :, None, None], v, jnp.zeros_like(v))
    q_groups = q.reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    s = jnp.einsum("shgd,sthd->shgt", q_groups, k, precision=precision,
                   preferred_element_type=jnp.float32) * (sm_scale * k_scale)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    allowed = valid[:, None, None, :]
    m = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("shgt,sthd->shgd", p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32) * v_scale
    return o.reshape(num_seqs, num_q_heads, head_dim).astype(out_dtype)
