"""Paged-attention kernel benchmark (the "kernels" workload of BENCHMARKS.md). Runs on a GPU.

    python bench/kernels.py --check --out bench/out/kernels-$(date +%F)   # checks, then timing
    python bench/kernels.py --check-only                                  # numerics only
    python bench/kernels.py --smoke                                       # CPU, interpret mode
    python bench/kernels.py --variants-only --decode-variants all       # decode structures
    python bench/kernels.py --variants-only --decode-variants last,hpp2_pps2 \
        --decode-shapes 1x4096,4x16384,8x4096 --decode-splits 8,16,32,64      # split counts
    python bench/kernels.py --check --kv-dtype fp8 --no-sweep                 # fp8 pages too

Decode, Llama-3-8B attention (Hq=32, Hkv=8, D=128, 16-token pages, bf16), B x L in {1x4096,
4x16384, 8x4096, 64x2048, 256x1024}, all in one run: our split-K decode kernel, JAX's built-in
``pallas.ops.gpu.paged_attention`` (q pre-scaled by 1/sqrt(D); its ``[Hkv, P, page, D]`` pool is a
transposed copy made before timing; best of a few ``k_splits``) and the XLA gather + einsum
reference. Also measured in the run: device-to-device copy bandwidth (a 4 GiB elementwise copy,
bytes read + written), and per decode shape a *plain read* of the same K/V bytes laid out
contiguously (an XLA reduction, and a minimal Pallas kernel), i.e. what those bytes cost at that
size with no gather and no attention. Reported: ms per call, TB/s of K+V bytes, % of copy
bandwidth, speedup vs the built-in. Then prefill / mixed batches through the ragged kernel (TFLOP/s of causal attention),
and a small sweep of decode tile parameters (pages per step, splits, warps, stages).

Decode variants (``--decode-variants``): named ``DecodeTuning`` structures of the decode kernel
(``DECODE_VARIANTS``; ``name+field=value+...`` overrides fields, ``+splits=N`` fixes the split
count), each first checked on the GPU against the f32 reference on a batch whose unowned pool
slots hold NaN, then timed on every decode shape next to the built-in and XLA; ``--decode-splits``
adds fixed split counts on the shapes whose ``B * Hkv`` is below the SM count.

fp8 pages (``--kv-dtype fp8``, vLLM's name for e4m3, or ``fp8_e5m2``): the run also holds fp8
pools of the same bytes (twice the pages) with per-tensor scales, and next to each of our
decode and ragged rows on bf16 pages times the same kernel, tiles and shape on fp8 pages
(``ours-fp8`` rows): TB/s counts fp8 bytes, and ``x bf16`` is the bf16 row's time over the fp8
row's (per token, the same work). ``--check`` then also checks the fp8 kernels against the
reference reading the same fp8 pool and against exact attention over the unquantized values.

Method: the pools are one layer-flattened pool per K and V larger than 4 GiB, as in serving (so
the kernels use 64-bit offsets; one extra row shows a small pool), with randomly permuted pages.
Each timed function is one jit that calls the kernel back to back ``calls`` times on rotating
block tables over disjoint pages (so a call never finds its K/V in the 50 MB L2); the time per
call is the best and the median over ``repeats`` runs after two warm-up runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from roofline import measure_bandwidth  # noqa: E402

from jaxpaged.pallas_kernels.backend import triton_call  # noqa: E402
from jaxpaged.pallas_kernels.kv_quant import attention_error_bound, is_fp8, quantize  # noqa: E402
from jaxpaged.pallas_kernels.kv_write import write_kv, write_kv_reference  # noqa: E402
from jaxpaged.pallas_kernels.paged_decode_attention import (DecodeTuning, choose_num_kv_splits,
                                                            default_decode_tuning,
                                                            paged_decode_attention,
                                                            paged_decode_attention_reference)
from jaxpaged.pallas_kernels.ragged_paged_attention import (RaggedTuning, ragged_paged_attention,
                                                            ragged_paged_attention_reference)

warnings.filterwarnings("ignore", message="jax.experimental.pallas.ops.gpu.paged_attention is "
                        "deprecated", category=DeprecationWarning)
from jax.experimental.pallas.ops.gpu import paged_attention as builtin  # noqa: E402

L2_BYTES = 50 * 2**20  # H100 L2
SM_COUNT = 132  # H100 / H200
KV_DTYPES = {"bf16": None, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
             "fp8_e5m2": jnp.float8_e5m2}  # --kv-dtype, vLLM's kv_cache_dtype names
FP8_SCALE = 1.0 / 64  # K and V scales of the fp8 pools: N(0, 1) values stay far from clipping


@dataclasses.dataclass(frozen=True)
class Setup:
    """Model shape and run sizes (the GPU defaults, or tiny ones for a CPU smoke run)."""

    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    pool_pages: int = 160_000  # 160k x 16 x 8 x 128 bf16 = 5 GiB per pool: > 4 GiB like serving
    decode_shapes: tuple[tuple[int, int], ...] = ((1, 4096), (4, 16384), (8, 4096), (64, 2048),
                                                  (256, 1024))
    copy_bytes: int = 4 * 2**30
    repeats: int = 7  # timed repeats (best and median reported)
    runs_per_repeat: int = 20  # jit executions dispatched back to back per repeat, one sync
    target_run_us: float = 100.0  # decode jits unroll enough calls to keep the GPU this busy
    min_calls: int = 1
    interpret: bool = False
    dtype: jnp.dtype = jnp.bfloat16  # q, and the pools unless kv_dtype is set
    kv_dtype: jnp.dtype | None = None  # fp8 pages

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def pool_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.kv_dtype or self.dtype)

    def kv_bytes(self, batch: int, context: int) -> int:
        itemsize = self.pool_dtype.itemsize
        return 2 * batch * context * self.num_kv_heads * self.head_dim * itemsize

    def fp8(self, kv_dtype: jnp.dtype) -> "Setup":
        """The same run on fp8 pages: pools of the same bytes hold twice the pages."""
        factor = jnp.dtype(self.dtype).itemsize // jnp.dtype(kv_dtype).itemsize
        return dataclasses.replace(self, kv_dtype=kv_dtype, pool_pages=self.pool_pages * factor)


SMOKE = Setup(num_q_heads=8, num_kv_heads=2, head_dim=64, pool_pages=96,
              decode_shapes=((1, 256), (4, 128)), copy_bytes=2**24, repeats=2, runs_per_repeat=2,
              min_calls=2, target_run_us=1e-3, interpret=True)


# ---------------------------------------------------------------------------------- timing

@dataclasses.dataclass(frozen=True)
class Timing:
    best_ms: float
    median_ms: float


def time_per_call(setup: Setup, fn: Callable, args: tuple, calls: int) -> Timing:
    """``fn(*args)`` runs ``calls`` kernel calls in one jit; returns the time per kernel call.

    Each repeat dispatches ``runs_per_repeat`` executions back to back and syncs once, so host
    dispatch overlaps the GPU work instead of being timed.
    """
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(setup.repeats):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(setup.runs_per_repeat)]
        jax.block_until_ready(outs)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        per_call.append(elapsed_ms / (setup.runs_per_repeat * calls))
    return Timing(min(per_call), statistics.median(per_call))


def try_time(setup: Setup, log: Callable, what: str, fn: Callable, args: tuple,
             calls: int) -> Timing | None:
    """``time_per_call``, but a config that fails to compile (e.g. out of shared memory) is logged
    and skipped instead of ending the run."""
    try:
        return time_per_call(setup, fn, args, calls)
    except Exception as error:  # noqa: BLE001 - any compile/runtime failure of one config
        log(f"FAILED {what}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return None


def decode_calls(setup: Setup, batch: int, context: int, table_sets: int) -> int:
    """Kernel calls per timed jit: every rotation set once, and about ``target_run_us`` of work
    (at ~3 TB/s) so that small shapes are not dominated by launch gaps; at most 64."""
    estimate_us = setup.kv_bytes(batch, context) / 3e12 * 1e6
    wanted = math.ceil(setup.target_run_us / estimate_us)
    return max(setup.min_calls, table_sets, min(64, wanted))


def repeated(kernel: Callable, calls: int) -> Callable:
    """jit(k, v, tables_list, *rest) -> outputs of ``calls`` back-to-back kernel calls."""
    def run(k, v, tables, *rest):
        return [kernel(k, v, tables[i % len(tables)], *rest) for i in range(calls)]
    return jax.jit(run)


def measure_copy_bandwidth(setup: Setup) -> float:
    """Bytes read + written per second of a large device-to-device copy (bench/roofline.py)."""
    return measure_bandwidth(setup.copy_bytes)


# ---------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Pools:
    k: jax.Array  # [P, page, Hkv, D]
    v: jax.Array
    next_page: int = 0  # pages are handed out once: rotation sets never share a page
    scales: dict = dataclasses.field(default_factory=dict)  # fp8: k_scale, v_scale

    @property
    def name(self) -> str:  # what the rows call our kernel on these pools (vLLM's dtype names)
        if not self.scales:
            return "ours"
        return "ours-fp8" if self.k.dtype == jnp.float8_e4m3fn else "ours-fp8_e5m2"

    def take(self, count: int, rng: np.random.Generator) -> np.ndarray:
        if self.next_page + count > self.k.shape[0]:
            self.next_page = 0  # pool exhausted: reuse pages (only in tiny smoke runs)
        pages = np.arange(self.next_page, self.next_page + count)
        self.next_page += count
        return rng.permutation(pages).astype(np.int32)


def make_pools(setup: Setup, pages: int, seed: int = 0) -> Pools:
    """Random pools made on the device; pages repeat every 8192 (timing does not see values).

    fp8 pages (``setup.kv_dtype``) hold the same N(0, 1) values as the bf16 pools of the same
    seed, quantized under ``FP8_SCALE``.
    """
    distinct = min(pages, 8192)
    shape = (distinct, setup.page_size, setup.num_kv_heads, setup.head_dim)
    fp8 = is_fp8(setup.pool_dtype)

    @jax.jit
    def make(key):
        block = jax.random.normal(key, shape, setup.dtype)
        if fp8:
            block = quantize(block, jnp.float32(FP8_SCALE), setup.pool_dtype)
        return jnp.tile(block, (-(-pages // distinct), 1, 1, 1))[:pages]

    k_key, v_key = jax.random.split(jax.random.PRNGKey(seed))
    scales = dict(k_scale=FP8_SCALE, v_scale=FP8_SCALE) if fp8 else {}
    return Pools(make(k_key), make(v_key), scales=scales)


def rotation_tables(setup: Setup, pools: Pools, batch: int, width: int,
                    rng: np.random.Generator) -> list[jax.Array]:
    """Block tables over disjoint pages, enough sets that their K/V together exceed L2 x 3."""
    per_call = setup.kv_bytes(batch, width * setup.page_size)
    sets = max(1, min(math.ceil(3 * L2_BYTES / per_call), pools.k.shape[0] // (batch * width)))
    return [jnp.asarray(pools.take(batch * width, rng).reshape(batch, width))
            for _ in range(sets)]


def random_q(setup: Setup, tokens: int, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed),
                             (tokens, setup.num_q_heads, setup.head_dim), setup.dtype)


# ---------------------------------------------------------------------------------- decode

@dataclasses.dataclass
class Row:
    section: str
    shape: str
    impl: str
    config: str
    best_ms: float
    median_ms: float
    tbps: float | None = None
    pct_copy: float | None = None
    tflops: float | None = None
    speedup_vs_builtin: float | None = None
    speedup_vs_bf16: float | None = None  # fp8 rows: the bf16 row's time over this one's


def _decode_row(setup, section, shape, impl, config, timing, kv_bytes, copy_bw) -> Row:
    tbps = kv_bytes / (timing.best_ms * 1e-3) / 1e12
    return Row(section, shape, impl, config, timing.best_ms, timing.median_ms, tbps,
               100 * tbps * 1e12 / copy_bw)


def ours_decode(setup: Setup, splits=None, tuning: DecodeTuning | None = None,
                scales: dict | None = None) -> Callable:
    """Our decode kernel; ``scales``: an fp8 pool's ``k_scale``/``v_scale`` (``Pools.scales``)."""
    def kernel(k, v, tables, q, lens):
        return paged_decode_attention(q, k, v, tables, lens, **(scales or {}),
                                      sm_scale=setup.sm_scale, num_kv_splits=splits,
                                      impl="pallas", interpret=setup.interpret, tuning=tuning)
    return kernel


def builtin_decode(setup: Setup, k_splits: int, pages_per_block: int) -> Callable:
    """JAX's built-in kernel: pool ``[Hkv, P, page, D]``, q already scaled by ``sm_scale``."""
    def kernel(k_t, v_t, tables, q_scaled, lens):
        return builtin.paged_attention(q_scaled, k_t, v_t, tables, lens, k_splits=k_splits,
                                       pages_per_compute_block=pages_per_block,
                                       interpret=setup.interpret)
    return kernel


def xla_decode(setup: Setup) -> Callable:
    def kernel(k, v, tables, q, lens):
        return paged_decode_attention_reference(q, k, v, tables, lens, sm_scale=setup.sm_scale)
    return kernel


@dataclasses.dataclass
class DecodeCase:
    """One decode shape's timed inputs: rotating tables over disjoint pages, q, full lengths."""

    batch: int
    context: int
    width: int  # pages per sequence
    tables: list[jax.Array]  # i32[B, width] each
    calls: int  # kernel calls per timed jit
    q: jax.Array  # [B, Hq, D]
    lens: jax.Array  # i32[B]
    kv_bytes: int

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.context}"


def decode_case(setup: Setup, pools: Pools, batch: int, context: int,
                rng: np.random.Generator) -> DecodeCase:
    width = context // setup.page_size
    tables = rotation_tables(setup, pools, batch, width, rng)
    calls = decode_calls(setup, batch, context, len(tables))
    # One table argument per call: identical calls on one argument would be merged by XLA's CSE,
    # and the time per call would look shorter than it is.
    tables = [jnp.array(tables[i % len(tables)], copy=True) for i in range(calls)]
    return DecodeCase(batch, context, width, tables, calls,
                      random_q(setup, batch, seed=batch), jnp.full((batch,), context, jnp.int32),
                      setup.kv_bytes(batch, context))


def time_ours(setup: Setup, log: Callable, pools: Pools, case: DecodeCase, copy_bw: float, *,
              section: str, config: str, tuning: DecodeTuning,
              splits: int | None = None) -> Row | None:
    timing = try_time(setup, log, f"{section} {case.shape} {pools.name} {config}",
                      repeated(ours_decode(setup, splits, tuning, pools.scales), case.calls),
                      (pools.k, pools.v, case.tables, case.q, case.lens), case.calls)
    if timing is None:
        return None
    return _decode_row(setup, section, case.shape, pools.name, config, timing, case.kv_bytes,
                       copy_bw)


def time_baselines(setup: Setup, log: Callable, pools: Pools,
                   pools_t: tuple[jax.Array, jax.Array], case: DecodeCase,
                   copy_bw: float) -> tuple[Row | None, Row | None]:
    """(best built-in over k_splits in {1, 4, 16}, XLA gather + einsum) on ``case``."""
    q_scaled = case.q * jnp.asarray(setup.sm_scale, case.q.dtype)  # the built-in does not scale q
    builtins = []
    for k_splits in sorted({s for s in (1, 4, 16) if case.width % s == 0}):
        pages_per_block = min(8, case.width // k_splits)
        config = f"k_splits={k_splits},ppcb={pages_per_block}"
        timing = try_time(setup, log, f"decode {case.shape} builtin {config}",
                          repeated(builtin_decode(setup, k_splits, pages_per_block), case.calls),
                          (*pools_t, case.tables, q_scaled, case.lens), case.calls)
        if timing is not None:
            builtins.append(_decode_row(setup, "decode", case.shape, "builtin", config, timing,
                                        case.kv_bytes, copy_bw))
    timing = try_time(setup, log, f"decode {case.shape} xla", repeated(xla_decode(setup),
                                                                        case.calls),
                      (pools.k, pools.v, case.tables, case.q, case.lens), case.calls)
    xla = None if timing is None else _decode_row(setup, "decode", case.shape, "xla",
                                                  "gather+einsum", timing, case.kv_bytes, copy_bw)
    return (min(builtins, key=lambda r: r.best_ms) if builtins else None), xla


def stream_read(pages: int, calls: int) -> Callable:
    """jit(k, v, starts) -> per start, f32 sums of each of ``pages`` contiguous pool pages of K
    and V: one XLA reduction kernel that streams the same bytes as a decode call, no gather."""
    def run(k, v, starts):
        def page_sums(pool, start):  # f32[pages]
            return jnp.sum(lax.dynamic_slice_in_dim(pool, start, pages), axis=(1, 2, 3),
                           dtype=jnp.float32)
        return [page_sums(k, s) + page_sums(v, s) for s in starts[:calls]]
    return jax.jit(run)


READ_ROWS_PER_PROGRAM = 64  # pool rows (one token's D values of one kv head) per program


def pallas_stream_read(pages: int, calls: int, interpret: bool) -> Callable:
    """Like ``stream_read`` with a minimal Pallas kernel: every program loads 64 contiguous pool
    rows of K and of V (32 KB at Llama-3-8B's shape) and stores their column sums, one launch."""
    def kernel(start_ref, k_ref, v_ref, o_ref):
        row0 = start_ref[0] + pl.program_id(0) * READ_ROWS_PER_PROGRAM
        rows = pl.ds(row0, READ_ROWS_PER_PROGRAM)
        o_ref[...] = (jnp.sum(k_ref[rows, :].astype(jnp.float32), axis=0)
                      + jnp.sum(v_ref[rows, :].astype(jnp.float32), axis=0))

    def run(k, v, starts):
        rows_per_page = k.shape[1] * k.shape[2]
        k_rows, v_rows = (pool.reshape(-1, pool.shape[3]) for pool in (k, v))  # [P * page * Hkv, D]
        programs = pages * rows_per_page // READ_ROWS_PER_PROGRAM
        full = pl.BlockSpec(k_rows.shape, lambda i: (0, 0))
        read = triton_call(kernel, name="stream_read", grid=(programs,),
                           in_specs=[pl.BlockSpec((1,), lambda i: (0,)), full, full],
                           out_specs=pl.BlockSpec((None, k_rows.shape[1]), lambda i: (i, 0)),
                           out_shape=jax.ShapeDtypeStruct((programs, k_rows.shape[1]),
                                                          jnp.float32),
                           num_warps=4, num_stages=1, interpret=interpret)
        return [read((s * rows_per_page)[None], k_rows, v_rows) for s in starts[:calls]]
    return jax.jit(run)


def time_stream_read(setup: Setup, log: Callable, pools: Pools, case: DecodeCase,
                     copy_bw: float) -> list[Row]:
    """What a plain read of the case's K/V bytes costs at this size (launch and ramp included):
    the bandwidth a decode call could reach if gathering pages and attending were free. Regions
    stay in the first 2**30 elements of the pool (32-bit offsets in the Pallas reader)."""
    pages = case.batch * case.width
    page_elements = setup.page_size * setup.num_kv_heads * setup.head_dim
    span = min(pools.k.shape[0], 2**30 // page_elements) - pages
    starts = [jnp.asarray((i * pages) % max(1, span), jnp.int32) for i in range(case.calls)]
    rows = []
    for config, reader in (("XLA page sums, contiguous", stream_read(pages, case.calls)),
                           ("Pallas, 64 rows/program", pallas_stream_read(pages, case.calls,
                                                                          setup.interpret))):
        timing = try_time(setup, log, f"decode {case.shape} read {config}", reader,
                          (pools.k, pools.v, starts), case.calls)
        if timing is not None:
            rows.append(_decode_row(setup, "decode", case.shape, "read", config, timing,
                                    case.kv_bytes, copy_bw))
    return rows


def _set_speedup(row: Row, builtin: Row | None) -> Row:
    if builtin is not None:
        row.speedup_vs_builtin = builtin.best_ms / row.best_ms
    return row


def with_bf16_speedup(row: Row | None, bf16: Row | None) -> Row | None:
    """An fp8 row with the time of the same kernel on bf16 pages over its own."""
    if row is not None and bf16 is not None:
        row.speedup_vs_bf16 = bf16.best_ms / row.best_ms
    return row


def bench_decode(setup: Setup, pools: Pools, pools_t: tuple[jax.Array, jax.Array],
                 copy_bw: float, log: Callable,
                 fp8: tuple[Setup, Pools] | None = None,
                 fp8_overrides: tuple[str, ...] = ()) -> list[Row]:
    """Per decode shape: our kernel (and with ``fp8`` the same kernel on fp8 pages, plus one row
    per ``fp8_overrides`` entry: ``field=value[+field=value]`` laid over the model's tuning), the
    best built-in, XLA, and the plain reads of the same bytes."""
    rows = []
    rng = np.random.default_rng(0)
    for batch, context in setup.decode_shapes:
        case = decode_case(setup, pools, batch, context, rng)
        tuning = default_decode_tuning(batch, setup.num_kv_heads)  # what the model uses
        splits = choose_num_kv_splits(batch, setup.num_kv_heads, case.width, tuning)
        config = f"splits={splits},hpp={tuning.heads_per_program}"
        ours = time_ours(setup, log, pools, case, copy_bw, section="decode", config=config,
                         tuning=tuning)
        ours_fp8, fp8_variants = None, []
        if fp8 is not None:
            fp8_setup, fp8_pools = fp8
            fp8_case = decode_case(fp8_setup, fp8_pools, batch, context, rng)
            # the model's fp8 tuning; the overrides below are laid over the bf16 one
            fp8_tuning = default_decode_tuning(batch, setup.num_kv_heads, fp8_setup.kv_dtype)
            fp8_splits = choose_num_kv_splits(batch, setup.num_kv_heads, case.width, fp8_tuning)
            fp8_config = (f"splits={fp8_splits},hpp={fp8_tuning.heads_per_program},"
                          f"pps={fp8_tuning.pages_per_step}")
            ours_fp8 = with_bf16_speedup(time_ours(fp8_setup, log, fp8_pools, fp8_case, copy_bw,
                                                   section="decode", config=fp8_config,
                                                   tuning=fp8_tuning), ours)
            for spec in fp8_overrides:
                variant = parse_variant("default+" + spec).tuning
                fields = {f: getattr(variant, f) for f in spec_fields(spec)}
                fp8_variants.append(with_bf16_speedup(time_ours(
                    fp8_setup, log, fp8_pools, fp8_case, copy_bw, section="decode",
                    config=f"{config},{spec}", tuning=dataclasses.replace(tuning, **fields)),
                    ours))
        builtin, xla = time_baselines(setup, log, pools, pools_t, case, copy_bw)
        reads = time_stream_read(setup, log, pools, case, copy_bw)
        for row in (ours, ours_fp8, *fp8_variants, builtin, xla):
            if row is not None:
                rows.append(_set_speedup(row, builtin))
                log(_format_row(row))
        for row in reads:  # no speedup: not an attention kernel
            rows.append(row)
            log(_format_row(row))
    return rows


def bench_small_pool(setup: Setup, copy_bw: float, log: Callable) -> list[Row]:
    """One shape on a pool under 4 GiB (32-bit offsets) to show what 64-bit addressing costs."""
    batch, context = setup.decode_shapes[min(3, len(setup.decode_shapes) - 1)]
    width = context // setup.page_size
    pools = make_pools(setup, batch * width, seed=1)
    tables = [jnp.asarray(pools.take(batch * width, np.random.default_rng(1)).reshape(batch,
                                                                                       width))]
    calls = decode_calls(setup, batch, context, 1)
    tables = [jnp.array(tables[0], copy=True) for _ in range(calls)]  # no CSE (see decode_case)
    q, lens = random_q(setup, batch, seed=3), jnp.full((batch,), context, jnp.int32)
    timing = try_time(setup, log, "small pool", repeated(ours_decode(setup), calls),
                      (pools.k, pools.v, tables, q, lens), calls)
    if timing is None:
        return []
    row = _decode_row(setup, "decode", f"{batch}x{context}", "ours", "small pool (<4 GiB)",
                      timing, setup.kv_bytes(batch, context), copy_bw)
    log(_format_row(row))
    return [row]


def bench_decode_sweep(setup: Setup, pools: Pools, copy_bw: float, log: Callable) -> list[Row]:
    """Tile parameters of the default decode structure on a small- and a large-batch shape."""
    rng = np.random.default_rng(2)
    shapes = [setup.decode_shapes[0], setup.decode_shapes[-2]]
    rows = []
    for index, (batch, context) in enumerate(shapes):
        case = decode_case(setup, pools, batch, context, rng)
        auto = choose_num_kv_splits(batch, setup.num_kv_heads, case.width)
        if index == 0:  # split-K bound: splits x pages per step
            configs = [(s, DecodeTuning(pages_per_step=p)) for s in sorted({auto // 2, auto,
                                                                            2 * auto} - {0})
                       for p in (2, 4, 8)]
        else:  # one split: pages per step x warps x stages
            configs = [(None, DecodeTuning(pages_per_step=p, num_warps=w, num_stages=st))
                       for p in (2, 4, 8) for w in (4, 8) for st in (2, 3)]
        if setup.interpret:
            configs = configs[:2]
        for splits, tuning in configs:
            config = (f"splits={splits or auto},pps={tuning.pages_per_step},"
                      f"warps={tuning.num_warps},stages={tuning.num_stages}")
            row = time_ours(setup, log, pools, case, copy_bw, section="sweep", config=config,
                            tuning=tuning, splits=splits)
            if row is not None:
                rows.append(row)
                log(_format_row(row))
    return rows


# ---------------------------------------------------------------------------------- variants

def _structure(launch_order: str, mask_steps: str, guard: str, **fields) -> DecodeTuning:
    """A decode structure with every field spelled out, so that a change of DecodeTuning's
    defaults changes no variant."""
    spelled = dict(pages_per_step=4, num_warps=4, num_stages=2, target_programs=528,
                   min_pages_per_split=8, combine="pallas", heads_per_program=1, gather="rows")
    return DecodeTuning(launch_order=launch_order, mask_steps=mask_steps, guard=guard,
                        **(spelled | fields))


# Decode kernel structures compared by --decode-variants ("default" = DecodeTuning()). Registers
# and resident programs per SM below are from compiling each for sm_90 with Triton 3.9 (pip) on
# a CPU box: a proxy for XLA's own Triton, not a measurement.
DECODE_VARIANTS: dict[str, DecodeTuning] = {
    # The kernel before this change (kv heads on CUDA's x axis, unmasked loop + masked tail,
    # jnp.where guards, page gather + reshape, split combine in XLA): V pipelined through
    # registers, ~166 regs, 3 programs/SM.
    "legacy": _structure("head_inner", "last", "where", gather="pages", combine="xla"),
    # shared/examples/pallas_paged_example.py: sequences on x, every step masked with jnp.where.
    "example_like": _structure("seq_inner", "every", "where", gather="pages"),
    # Row gather + masked loads (~88-144 regs, 39 KB smem); one loop or unmasked loop + tail.
    "every": _structure("seq_inner", "every", "masked_load"),
    "last": _structure("seq_inner", "last", "masked_load"),  # ~88 regs, 5 programs/SM
    "last_head_inner": _structure("head_inner", "last", "masked_load"),
    "last_xla_combine": _structure("seq_inner", "last", "masked_load", combine="xla"),
    "last_pps2": _structure("seq_inner", "last", "masked_load", pages_per_step=2),
    "last_pps8": _structure("seq_inner", "last", "masked_load", pages_per_step=8),
    "last_w8": _structure("seq_inner", "last", "masked_load", num_warps=8),
    "last_s3": _structure("seq_inner", "last", "masked_load", num_stages=3),
    # Several kv heads per program: 512 B / 1 KB contiguous K/V rows instead of 256 B.
    "hpp2_pps2": _structure("seq_inner", "last", "masked_load", heads_per_program=2,
                            pages_per_step=2),
    "hpp4_pps1": _structure("seq_inner", "last", "masked_load", heads_per_program=4,
                            pages_per_step=1),
}


@dataclasses.dataclass(frozen=True)
class DecodeVariant:
    name: str  # the spec it was parsed from
    tuning: DecodeTuning
    splits: int | None = None  # None: choose_num_kv_splits


def parse_variant(spec: str) -> DecodeVariant:
    """``name[+field=value...]``: a DECODE_VARIANTS entry or "default", with DecodeTuning fields
    overridden and ``splits=N`` fixing the split count, e.g. ``last+pages_per_step=8+splits=16``."""
    base, *overrides = spec.split("+")
    if base == "default":
        tuning = DecodeTuning()
    elif base in DECODE_VARIANTS:
        tuning = DECODE_VARIANTS[base]
    else:
        raise ValueError(f"unknown decode variant {base!r}; known: default, "
                         f"{', '.join(DECODE_VARIANTS)}")
    names = {f.name for f in dataclasses.fields(DecodeTuning)}
    fields, splits = {}, None
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "splits":
            splits = int(value)
        elif key in names:
            fields[key] = int(value) if value.isdigit() else value
        else:
            raise ValueError(f"decode variant {spec!r}: {key!r} is not splits or a DecodeTuning "
                             f"field ({', '.join(sorted(names))})")
    return DecodeVariant(spec, dataclasses.replace(tuning, **fields), splits)


def spec_fields(spec: str) -> list[str]:
    """The DecodeTuning fields a ``field=value[+field=value]`` spec sets."""
    return [item.partition("=")[0] for item in spec.split("+") if item]


def parse_variants(text: str) -> list[DecodeVariant]:
    """Comma-separated specs; "all" stands for every DECODE_VARIANTS entry."""
    specs = [s for t in text.split(",") if t for s in (DECODE_VARIANTS if t == "all" else [t])]
    return [parse_variant(spec) for spec in dict.fromkeys(specs)]


def poisoned_decode_batch(setup: Setup, seed: int = 13):
    """A small decode batch whose pool slots that no sequence owns hold NaN (page 0, the tail of
    each last page, whatever table entries past the end point at): (q, k, v, tables, lens)."""
    rng = np.random.default_rng(seed)
    lens = [200, 17, 0, 1, 33] if setup.interpret else [4000, 17, 0, 1, 256, 999, 16, 33]
    page = setup.page_size
    pages = [-(-n // page) for n in lens]
    width = max(pages) + 3
    num_pages = 2 + sum(pages)  # page 0 and one spare page are never owned
    shape = (num_pages, page, setup.num_kv_heads, setup.head_dim)
    k, v = (rng.standard_normal(shape, np.float32) for _ in range(2))
    owned = np.zeros((num_pages, page), bool)
    tables = rng.integers(0, num_pages, size=(len(lens), width)).astype(np.int32)
    order, next_page = rng.permutation(np.arange(1, num_pages)), 0
    for seq, (n, count) in enumerate(zip(lens, pages)):
        tables[seq, :count] = order[next_page:next_page + count]
        next_page += count
        for j in range(n):
            owned[tables[seq, j // page], j % page] = True
    k[~owned], v[~owned] = np.nan, np.nan
    q = random_q(setup, len(lens), seed=seed)
    return (q, jnp.asarray(k, setup.dtype), jnp.asarray(v, setup.dtype), jnp.asarray(tables),
            jnp.asarray(lens, jnp.int32))


def check_decode_variants(setup: Setup, variants: list[DecodeVariant],
                          log: Callable) -> dict[str, bool]:
    """Each variant (its split count, and 1 split) vs the f32 reference on the poisoned batch."""
    q, k, v, tables, lens = poisoned_decode_batch(setup)
    f32 = jnp.float32
    ref = paged_decode_attention_reference(q.astype(f32), k.astype(f32), v.astype(f32), tables,
                                           lens, sm_scale=setup.sm_scale)
    ok = {}
    for variant in variants:
        errors = []
        for splits in dict.fromkeys((variant.splits, 1)):
            try:
                out = paged_decode_attention(q, k, v, tables, lens, sm_scale=setup.sm_scale,
                                             num_kv_splits=splits, impl="pallas",
                                             interpret=setup.interpret, tuning=variant.tuning)
                out = np.asarray(out.astype(f32))
                errors.append(_rel_err(out, ref) if np.isfinite(out).all() else float("nan"))
            except Exception as error:  # noqa: BLE001 - a variant that fails to compile
                log(f"check variant {variant.name}: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}")
                errors.append(float("nan"))
        ok[variant.name] = all(err < 1e-2 for err in errors)  # NaN compares False
        log(f"check variant {variant.name:40s} rel-norm err "
            f"{' / '.join(f'{e:.2e}' for e in errors)} {'ok' if ok[variant.name] else 'FAIL'}")
    return ok


def bench_decode_variants(setup: Setup, pools: Pools, pools_t: tuple[jax.Array, jax.Array],
                          copy_bw: float, log: Callable, variants: list[DecodeVariant],
                          extra_splits: list[int], check: bool) -> list[Row]:
    """Every variant on every decode shape (auto splits, plus ``extra_splits`` where B * Hkv is
    below the SM count), next to the best built-in and XLA measured on the same inputs."""
    started = time.perf_counter()
    passed = check_decode_variants(setup, variants, log) if check else {}
    rng = np.random.default_rng(4)
    rows = []
    for batch, context in setup.decode_shapes:
        log(f"variants: {batch}x{context} at {time.perf_counter() - started:.0f} s")
        case = decode_case(setup, pools, batch, context, rng)
        builtin, xla = time_baselines(setup, log, pools, pools_t, case, copy_bw)
        reads = time_stream_read(setup, log, pools, case, copy_bw)
        for row in (builtin, xla, *reads):
            if row is not None:
                row.section = "variant"
                rows.append(row if row.impl == "read" else _set_speedup(row, builtin))
                log(_format_row(row))
        small = batch * setup.num_kv_heads < SM_COUNT
        for variant in variants:
            auto = variant.splits or choose_num_kv_splits(batch, setup.num_kv_heads, case.width,
                                                          variant.tuning)
            fixed = [s for s in extra_splits if small and variant.splits is None
                     and s != auto and s <= case.width]
            for splits in [auto, *fixed]:
                flag = "" if passed.get(variant.name, True) else " CHECK-FAILED"
                row = time_ours(setup, log, pools, case, copy_bw, section="variant",
                                config=f"{variant.name} splits={splits}{flag}",
                                tuning=variant.tuning, splits=splits)
                if row is not None:
                    rows.append(_set_speedup(row, builtin))
                    log(_format_row(row))
    return rows


# ---------------------------------------------------------------------------------- prefill

@dataclasses.dataclass(frozen=True)
class RaggedCase:
    name: str
    q_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]

    def flops(self, setup: Setup) -> float:
        """Causal attention matmul FLOPs: 2 matmuls x 2 FLOP x Hq x D per (query, key) pair."""
        pairs = sum(n * (total - n) + n * (n + 1) // 2
                    for n, total in zip(self.q_lens, self.seq_lens))
        return 4.0 * setup.num_q_heads * setup.head_dim * pairs


def ragged_cases(setup: Setup) -> list[RaggedCase]:
    if setup.interpret:
        return [RaggedCase("prefill 1x64", (64,), (64,)),
                RaggedCase("mixed 4 dec + 32 chunk", (1, 1, 1, 1, 32), (40, 60, 9, 100, 64))]
    return [RaggedCase("prefill 1x2048", (2048,), (2048,)),
            RaggedCase("prefill 16x512", (512,) * 16, (512,) * 16),
            RaggedCase("mixed 64 dec@1024 + 512 chunk@2048", (1,) * 64 + (512,),
                       (1024,) * 64 + (2048,))]


def _ragged_inputs(setup: Setup, pools: Pools, case: RaggedCase, rng: np.random.Generator):
    width = max(-(-n // setup.page_size) for n in case.seq_lens)
    tables = jnp.asarray(pools.take(len(case.q_lens) * width, rng).reshape(-1, width))
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(case.q_lens)]), jnp.int32)
    return (random_q(setup, sum(case.q_lens), seed=11), pools.k, pools.v, tables,
            jnp.asarray(case.seq_lens, jnp.int32), qsl)


def time_ragged(setup: Setup, log: Callable, pools: Pools, case: RaggedCase, args: tuple,
                tuning: RaggedTuning) -> Row | None:
    """Our ragged kernel on ``args`` (``_ragged_inputs`` over ``pools``), ``min_calls`` calls."""
    max_q, calls = max(case.q_lens), setup.min_calls

    def kernel(q, k, v, tables, lens, qsl):
        return ragged_paged_attention(q, k, v, tables, lens, qsl, **pools.scales,
                                      sm_scale=setup.sm_scale, max_query_len=max_q,
                                      impl="pallas", interpret=setup.interpret, tuning=tuning)

    fn = jax.jit(lambda *a: [kernel(*a) for _ in range(calls)])
    config = (f"block_q={tuning.block_q or 'auto'},pps={tuning.pages_per_step},"
              f"warps={tuning.num_warps}")
    timing = try_time(setup, log, f"ragged {case.name} {pools.name} {config}", fn, args, calls)
    if timing is None:
        return None
    return Row("ragged", case.name, pools.name, config, timing.best_ms, timing.median_ms,
               tflops=case.flops(setup) / (timing.best_ms * 1e-3) / 1e12)


def bench_ragged(setup: Setup, pools: Pools, log: Callable,
                 fp8: tuple[Setup, Pools] | None = None) -> list[Row]:
    """Tile configs of the ragged kernel per case, the XLA reference; with ``fp8``, the default
    tiles on fp8 pages as well."""
    rng = np.random.default_rng(3)
    tile_configs = [RaggedTuning(), RaggedTuning(block_q=32), RaggedTuning(pages_per_step=8),
                    RaggedTuning(block_q=32, pages_per_step=8, num_warps=8)]
    rows = []
    for case in ragged_cases(setup):
        args = _ragged_inputs(setup, pools, case, rng)
        max_q = max(case.q_lens)
        configs = tile_configs[:1] if (setup.interpret or "mixed" in case.name) else tile_configs
        ours = [time_ragged(setup, log, pools, case, args, tuning) for tuning in configs]
        if fp8 is not None:
            fp8_setup, fp8_pools = fp8
            fp8_args = _ragged_inputs(fp8_setup, fp8_pools, case, rng)
            ours.append(with_bf16_speedup(
                time_ragged(fp8_setup, log, fp8_pools, case, fp8_args, configs[0]), ours[0]))
        for row in ours:
            if row is not None:
                rows.append(row)
                log(_format_row(row))
        if "mixed" not in case.name:  # the dense-per-sequence reference needs S*Hq*Q*L scores
            fn = jax.jit(lambda q, k, v, t, lens, qsl: ragged_paged_attention_reference(
                q, k, v, t, lens, qsl, sm_scale=setup.sm_scale, max_query_len=max_q))
            timing = try_time(setup, log, f"ragged {case.name} xla", fn, args, 1)
            if timing is None:
                continue
            rows.append(Row("ragged", case.name, "xla", "reference", timing.best_ms,
                            timing.median_ms,
                            tflops=case.flops(setup) / (timing.best_ms * 1e-3) / 1e12))
            log(_format_row(rows[-1]))
    return rows


# ---------------------------------------------------------------------------------- checks

def _rel_err(actual, expected) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


CHECK_BOUND = 1e-2  # kernels vs the f32-query reference over the same pool


def _reference_pools(pools: Pools) -> tuple[jax.Array, jax.Array]:
    """K/V the f32-query references read: bf16 pools as f32; fp8 pools as they are (the
    reference converts fp8 to f32 exactly and applies ``pools.scales``)."""
    if pools.scales:
        return pools.k, pools.v
    return pools.k.astype(jnp.float32), pools.v.astype(jnp.float32)


def _attention_checks(setup: Setup, pools: Pools, rng: np.random.Generator):
    """{name: (kernel output, reference arguments as a function of the pools)} on small decode,
    ragged and decode-only ragged batches over ``pools``."""
    f32, scales = jnp.float32, pools.scales
    kernel = dict(impl="pallas", interpret=setup.interpret, sm_scale=setup.sm_scale, **scales)
    lens_host = [4000, 17, 0, 1, 256, 999] if not setup.interpret else [200, 17, 0, 1]
    width = -(-max(lens_host) // setup.page_size)
    tables = jnp.asarray(pools.take(len(lens_host) * width, rng).reshape(-1, width))
    lens = jnp.asarray(lens_host, jnp.int32)
    q = random_q(setup, len(lens_host), seed=5)
    checks = {}
    for splits in (None, 1, 3):
        out = paged_decode_attention(q, pools.k, pools.v, tables, lens, num_kv_splits=splits,
                                     **kernel)
        checks[f"decode splits={splits}"] = (out, lambda k, v, sc: (
            paged_decode_attention_reference(q.astype(f32), k, v, tables, lens, **sc,
                                             sm_scale=setup.sm_scale)))

    case = ragged_cases(setup)[-1] if setup.interpret else RaggedCase(
        "mixed: decodes, chunks, prefix hits", (1,) * 6 + (200, 100, 0, 37),
        (1000, 17, 1, 16, 33, 500, 2000, 100, 50, 64))
    rq, _, _, rtables, seq_lens, qsl = _ragged_inputs(setup, pools, case, rng)
    for max_q in (max(case.q_lens), None):
        out = ragged_paged_attention(rq, pools.k, pools.v, rtables, seq_lens, qsl,
                                     max_query_len=max_q, **kernel)
        checks[f"ragged {case.name} max_query_len={max_q}"] = (
            out, lambda k, v, sc, max_q=max_q: ragged_paged_attention_reference(
                rq.astype(f32), k, v, rtables, seq_lens, qsl, **sc, sm_scale=setup.sm_scale,
                max_query_len=max_q))
    dec_qsl = jnp.arange(len(lens_host) + 1, dtype=jnp.int32)
    dec_q = random_q(setup, len(lens_host), seed=6)
    dec_tables = jnp.asarray(pools.take(len(lens_host) * width, rng).reshape(-1, width))
    out = ragged_paged_attention(dec_q, pools.k, pools.v, dec_tables, lens, dec_qsl,
                                 max_query_len=1, **kernel)
    checks["ragged decode-only (max_query_len=1)"] = (out, lambda k, v, sc: (
        ragged_paged_attention_reference(dec_q.astype(f32), k, v, dec_tables, lens, dec_qsl,
                                         **sc, sm_scale=setup.sm_scale)))
    return checks


def _write_kv_mismatch(setup: Setup, pools: Pools, rng: np.random.Generator) -> float:
    """Fraction of pool values where the write_kv kernel and its reference differ (NaN = NaN)."""
    slots = jnp.asarray(np.where(rng.random(256) < 0.2, -1,
                                 rng.choice(pools.k.shape[0] * setup.page_size, 256,
                                            replace=False)), jnp.int32)
    new = jax.random.normal(jax.random.PRNGKey(9), (256, setup.num_kv_heads, setup.head_dim),
                            setup.dtype)
    expected = write_kv_reference(pools.k, pools.v, new, -new, slots, **pools.scales)
    got = write_kv(jnp.array(pools.k, copy=True), jnp.array(pools.v, copy=True), new, -new, slots,
                   **pools.scales, impl="pallas", interpret=setup.interpret)
    differ = [jnp.mean(~((a == b) | (jnp.isnan(a) & jnp.isnan(b)))) for a, b in
              zip((x.astype(jnp.float32) for x in got), (x.astype(jnp.float32) for x in expected))]
    return float(max(differ))


def run_checks(setup: Setup, log: Callable) -> bool:
    """Kernels vs the f32-query references over the same pools on small ragged/decode batches;
    write_kv against its reference on the whole pools. On fp8 pages (``setup.kv_dtype``) also
    against exact attention over the unquantized values (``attention_error_bound``), and
    write_kv may differ from its reference by a few codes (the GPU's f32 division and f32 -> fp8
    conversion need not round exactly as XLA's on the CPU do)."""
    pages = 64 if setup.interpret else 4096
    pools = make_pools(setup, pages, seed=5)
    checks = _attention_checks(setup, pools, np.random.default_rng(5))
    results = {}  # name -> (error, bound)
    for name, (out, reference) in checks.items():
        ref = reference(*_reference_pools(pools), pools.scales)
        results[name] = (_rel_err(out.astype(jnp.float32), ref), CHECK_BOUND)
    if pools.scales:  # the same values unquantized: make_pools draws them from the same seed
        exact = make_pools(dataclasses.replace(setup, kv_dtype=None), pages, seed=5)
        for name, (out, reference) in checks.items():
            ref = reference(*_reference_pools(exact), {})
            results[f"{name} vs exact"] = (_rel_err(out.astype(jnp.float32), ref),
                                           attention_error_bound(setup.pool_dtype))
    ok = all(err < bound for err, bound in results.values())
    if not pools.scales:  # the poisoned batch is made in bf16
        ok &= all(check_decode_variants(setup, [parse_variant("default")], log).values())
    mismatch = _write_kv_mismatch(setup, pools, np.random.default_rng(6))
    allowed = 1e-3 if pools.scales else 0.0
    ok &= mismatch <= allowed
    for name, (err, bound) in results.items():
        log(f"check {pools.name} {name:55s} rel-norm err {err:.2e} "
            f"{'ok' if err < bound else 'FAIL'} (bound {bound:.2e})")
    log(f"check {pools.name} {'write_kv (whole pools)':55s} {mismatch:.2e} of values differ "
        f"{'ok' if mismatch <= allowed else 'FAIL'} (allowed {allowed:.0e})")
    return ok


# ---------------------------------------------------------------------------------- report

def _format_row(row: Row) -> str:
    parts = [f"{row.section:6s} {row.shape:34s} {row.impl:13s} {row.config:38s}",
             f"best {row.best_ms:8.4f} ms  median {row.median_ms:8.4f} ms"]
    if row.tbps is not None:
        parts.append(f"{row.tbps:5.2f} TB/s {row.pct_copy:5.1f}% of copy")
    if row.tflops is not None:
        parts.append(f"{row.tflops:6.1f} TFLOP/s")
    if row.speedup_vs_builtin is not None:
        parts.append(f"{row.speedup_vs_builtin:4.2f}x builtin")
    if row.speedup_vs_bf16 is not None:
        parts.append(f"{row.speedup_vs_bf16:4.2f}x bf16")
    return "  ".join(parts)


def _fp8_impls(rows: list[Row]) -> list[str]:
    """The impl names of rows timed on fp8 pages (``ours-fp8``, ``ours-fp8_e5m2``)."""
    return list(dict.fromkeys(r.impl for r in rows if r.speedup_vs_bf16 is not None))


def summary_table(rows: list[Row]) -> str:
    decode = [r for r in rows if r.section == "decode" and r.config != "small pool (<4 GiB)"]
    impls = ["ours", *_fp8_impls(decode), "builtin", "xla", "read"]
    names = {"read": "plain read"}
    lines = ["", "SUMMARY decode (best ms / TB/s / % copy BW)",
             f"{'B x L':>10s} | " + " | ".join(f"{names.get(i, i):>22s}" for i in impls)
             + " | ours/builtin" + "".join(f" | {i} x bf16" for i in _fp8_impls(decode))]
    for shape in dict.fromkeys(r.shape for r in decode):
        by_impl = {r.impl: r for r in sorted((r for r in decode if r.shape == shape),
                                             key=lambda r: -r.best_ms)}  # the fastest per impl
        cells = [f"{by_impl[i].best_ms:7.4f} {by_impl[i].tbps:4.2f} {by_impl[i].pct_copy:4.0f}%"
                 if i in by_impl else "failed" for i in impls]
        ours = by_impl.get("ours")
        speedup = (f"{ours.speedup_vs_builtin:.2f}x"
                   if ours is not None and ours.speedup_vs_builtin is not None else "-")
        fp8 = [f"{by_impl[i].speedup_vs_bf16:.2f}x"
               if i in by_impl and by_impl[i].speedup_vs_bf16 else "-"
               for i in _fp8_impls(decode)]
        lines.append(f"{shape:>10s} | " + " | ".join(f"{c:>22s}" for c in cells)
                     + f" | {speedup}" + "".join(f" | {x}" for x in fp8))
    ragged = [r for r in rows if r.section == "ragged"]
    if ragged:
        lines.append("SUMMARY ragged (best config per case, TFLOP/s)")
        for case in dict.fromkeys(r.shape for r in ragged):
            ours_rows = [r for r in ragged if r.shape == case and r.impl == "ours"]
            if not ours_rows:
                continue
            ours = max(ours_rows, key=lambda r: r.tflops)
            xla = [r for r in ragged if r.shape == case and r.impl == "xla"]
            xla_text = f"  xla {xla[0].tflops:.1f}" if xla else ""
            fp8_text = "".join(f"  {r.impl} {r.tflops:.1f} ({r.speedup_vs_bf16:.2f}x bf16)"
                               for r in ragged if r.shape == case and r.speedup_vs_bf16)
            lines.append(f"{case:>36s}: ours {ours.tflops:6.1f} ({ours.config}) "
                         f"{ours.best_ms:.3f} ms{xla_text}{fp8_text}")
    sweep = [r for r in rows if r.section == "sweep"]
    for shape in dict.fromkeys(r.shape for r in sweep):
        best = min((r for r in sweep if r.shape == shape), key=lambda r: r.best_ms)
        lines.append(f"SWEEP best {shape}: {best.config} {best.tbps:.2f} TB/s")
    return "\n".join(lines)


def variant_summary(rows: list[Row], top: int = 8) -> str:
    """Per shape the fastest ``top`` variant rows; then variants ranked by the geometric mean,
    over shapes, of their best TB/s over split counts."""
    variant_rows = [r for r in rows if r.section == "variant"]
    if not variant_rows:
        return ""
    lines = ["", "SUMMARY decode variants (best ms / TB/s / % copy BW / x builtin)"]
    best_per_variant: dict[str, dict[str, float]] = {}
    for shape in dict.fromkeys(r.shape for r in variant_rows):
        here = [r for r in variant_rows if r.shape == shape]
        base = {r.impl: r for r in here if r.impl != "ours"}
        lines.append(f"{shape}: " + "  ".join(
            f"{impl} {r.best_ms:.4f} ms {r.tbps:.2f} TB/s" for impl, r in base.items()))
        ours = sorted((r for r in here if r.impl == "ours"), key=lambda r: r.best_ms)
        for rank, r in enumerate(ours[:top], 1):
            speedup = f"{r.speedup_vs_builtin:.2f}x" if r.speedup_vs_builtin else "-"
            lines.append(f"  {rank:2d}. {r.config:48s} {r.best_ms:8.4f} ms {r.tbps:5.2f} TB/s "
                         f"{r.pct_copy:5.1f}% {speedup}")
        for r in ours:
            name = r.config.split(" splits=")[0]
            best = best_per_variant.setdefault(name, {})
            best[shape] = max(best.get(shape, 0.0), r.tbps)
    shapes = list(dict.fromkeys(r.shape for r in variant_rows))
    complete = {n: b for n, b in best_per_variant.items() if len(b) == len(shapes)}
    ranked = sorted(complete, key=lambda n: -statistics.geometric_mean(complete[n].values()))
    lines.append("RANK (geomean over shapes of best TB/s over splits): " + ", ".join(
        f"{n} {statistics.geometric_mean(complete[n].values()):.2f}" for n in ranked))
    return "\n".join(lines)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit,
                device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                jax=jax.__version__, command=" ".join(sys.argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="numerics checks before timing")
    parser.add_argument("--check-only", action="store_true", help="numerics checks, no timing")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the decode tile sweep")
    parser.add_argument("--out", type=pathlib.Path, help="write kernels.json + kernels.log here")
    parser.add_argument("--decode-variants", default="",
                        help="comma-separated decode variants to compare, or 'all' (names: "
                             "default, " + ", ".join(DECODE_VARIANTS) + "; name+field=value+"
                             "...+splits=N overrides)")
    parser.add_argument("--decode-splits", default="",
                        help="extra fixed split counts for every variant on shapes with "
                             "B * Hkv < SMs, e.g. 8,16,32,64")
    parser.add_argument("--decode-shapes", default="",
                        help="restrict the decode shapes, e.g. 1x4096,64x2048")
    parser.add_argument("--variants-only", action="store_true",
                        help="with --decode-variants: skip the standard decode, small-pool, "
                             "ragged and sweep sections")
    parser.add_argument("--no-variant-checks", action="store_true",
                        help="skip the per-variant numerics check on the GPU")
    parser.add_argument("--fp8-decode-variants", default="",
                        help="with --kv-dtype fp8*: extra decode rows on fp8 pages, each "
                             "'field=value[+field=value]' over the model's tuning, "
                             "comma-separated (e.g. fp8_compute=query,pages_per_step=8)")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bf16",
                        help="fp8 / fp8_e4m3 / fp8_e5m2: also time (and check) the decode and "
                             "ragged kernels on fp8 pages, next to bf16")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else Setup()
    if args.decode_shapes:
        shapes = tuple(tuple(int(x) for x in shape.split("x"))
                       for shape in args.decode_shapes.split(","))
        setup = dataclasses.replace(setup, decode_shapes=shapes)
    variants = parse_variants(args.decode_variants) if args.decode_variants else []
    extra_splits = [int(x) for x in args.decode_splits.split(",") if x]
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    env = environment()
    log(" ".join(f"{k}={v}" for k, v in env.items()))
    if not setup.interpret and jax.default_backend() != "gpu":
        log("no GPU: timings would be meaningless; use --smoke for a CPU run of the script")
        return 2
    started = time.perf_counter()
    fp8_setup = setup.fp8(KV_DTYPES[args.kv_dtype]) if KV_DTYPES[args.kv_dtype] else None
    ok = True
    if args.check or args.check_only:
        ok = run_checks(setup, log)
        if fp8_setup is not None:
            ok &= run_checks(fp8_setup, log)
        if not ok or args.check_only:
            log("CHECKS " + ("PASSED" if ok else "FAILED"))
            _write(args.out, env, None, [], lines)
            return 0 if ok else 1

    copy_bw = measure_copy_bandwidth(setup)
    log(f"copy bandwidth (read + write, {setup.copy_bytes / 2**30:.2f} GiB): "
        f"{copy_bw / 1e12:.3f} TB/s")
    pools = make_pools(setup, setup.pool_pages)
    pools_t = tuple(jnp.transpose(p, (2, 0, 1, 3)) for p in (pools.k, pools.v))
    fp8 = None if fp8_setup is None else (fp8_setup, make_pools(fp8_setup, fp8_setup.pool_pages))
    standard = not (variants and args.variants_only)
    fp8_overrides = tuple(s for s in args.fp8_decode_variants.split(",") if s)
    rows = (bench_decode(setup, pools, pools_t, copy_bw, log, fp8, fp8_overrides)
            if standard else [])
    if variants:
        rows += bench_decode_variants(setup, pools, pools_t, copy_bw, log, variants,
                                      extra_splits, check=not args.no_variant_checks)
    del pools_t
    if standard:
        rows += bench_small_pool(setup, copy_bw, log)
        rows += bench_ragged(setup, pools, log, fp8)
        if not args.no_sweep:
            rows += bench_decode_sweep(setup, pools, copy_bw, log)
    log(summary_table(rows))
    if variants:
        log(variant_summary(rows))
    log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s; total {time.perf_counter() - started:.0f} s")
    _write(args.out, env, copy_bw, rows, lines)
    return 0


def _write(out: pathlib.Path | None, env: dict, copy_bw: float | None, rows: list[Row],
           lines: list[str]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(env, copy_bandwidth_tbps=None if copy_bw is None else copy_bw / 1e12,
                   rows=[dataclasses.asdict(r) for r in rows])
    (out / "kernels.json").write_text(json.dumps(payload, indent=1))
    (out / "kernels.log").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
