"""Quantized-weight matmul candidates at decode and prefill token counts (issue 14).

    python bench/quant_matmul.py --out OUT                  # every candidate, every shape
    python bench/quant_matmul.py --m 1 16 --shapes qkv down  # a subset

For each M (tokens) and Llama-3-8B projection shape K x N, times every candidate kernel and
checks it against its jnp reference (dequantize, then matmul in f32):
- ``bf16_xla``: ``x @ w`` with bf16 weights (the baseline);
- ``dequant_xla`` (fp8, int8): ``(x @ codes.astype(bf16)) * scale`` in XLA;
- ``w8a16_gemv`` (fp8, int8; M <= 8) with each ``--gemv-tiles`` config: the CUDA-core GEMV of
  pallas_kernels/quant_gemv.py;
- ``w8a16_pallas`` (fp8, int8) with each ``--tiles`` config: pallas_kernels/quant_matmul.py;
- ``w8a8_pallas`` (fp8) with each tile config: per-token fp8 activations, fp8 x fp8 tile dots;
- ``w8a8_xla`` (fp8): the same activations, XLA's fp8 ``dot_general`` and an XLA epilogue;
- ``w8a8_xla_kn`` / ``dequant_xla_kn`` (fp8, ``--kn``): the same two XLA paths with the codes
  stored ``[K, N]``, the layout before 2026-12-08 (the library stores them ``[N, K]``, the
  K-contiguous layout cuBLASLt's fp8 GEMM takes); ``custom_calls`` in the XLA rows names the GEMM
  XLA chose;
- ``fp8_pertensor_xla``: the pattern XLA's GemmRewriter turns into an fp8 cuBLASLt GEMM
  (convert -> multiply by a *scalar* scale -> dot, weights stored [N, K]); per-tensor scales
  only, so it is a yardstick of what cuBLASLt fp8 gives, not a kernel the model can use with
  per-channel scales as is. ``cublas_f8`` in its row says whether the rewrite happened. It is
  handed x already in fp8; ``fp8_pertensor_dynamic_xla`` also quantizes x (one scale per tensor,
  from its amax) inside the timed call, as W8A8 quantizes x per token.
``--kernel-tables NAME...`` writes, for those candidates (e.g. ``w8a8_xla``), the GPU kernels of
one call with their times (``bench/gpu_trace.py``) to ``kernels_NAME_M_KxN.txt`` under ``--out``:
what the quantization of x, the GEMM and the epilogue each take.
``--step-options`` compiles every candidate with the options the engine gives a model step of M
tokens (``jaxpaged.runner.compiler_options``: above 16 tokens XLA's Triton GEMMs are off, so
XLA's GEMMs are cuBLAS(Lt) ones), as the step would run them.
Timing: one jitted call runs the candidate on enough copies of the weights (distinct buffers,
together >= ``ROTATION_BYTES``) that no copy is still in L2 when it is read again, and the time
per matmul is the call's time over the copies; so neither host dispatch (tens of microseconds a
call, more than a decode GEMV takes) nor the cache is measured.
Writes ``quant_matmul.json`` and a Markdown table (``quant_matmul.md``) with, per M and shape,
the time, weight-read TB/s, speed-up over bf16 and the error; ``best`` rows give what
``KERNEL_BY_TOKENS`` / ``TUNING_BY_TOKENS`` in pallas_kernels/quant_matmul.py should say.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_trace import with_kernel_table  # noqa: E402
from report import emit  # noqa: E402

from jaxpaged.pallas_kernels.quant_gemv import GEMV_MAX_ROWS, GemvTuning  # noqa: E402
from jaxpaged.pallas_kernels.quant_matmul import (DEQUANT_MIN_ROWS, MatmulTuning,  # noqa: E402
                                                  quant_matmul,
                                                  quant_matmul_reference, quantize_rows,
                                                  quantize_weight, w8a8_reference)
from jaxpaged.runner.compiler_options import step_compiler_options  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
TOKENS = (1, 16, 64, 256, 1024, 2048)
# block_m x block_n x block_k / splits / warps / stages
# Tile configs tried at M <= 16 (decode GEMV: 16-row tiles, split-K) and above (prefill).
SMALL_M_TILES = ("16x64x256/1/4/3", "16x32x512/1/4/3", "16x64x256/4/4/3", "16x128x128/2/4/4")
LARGE_M_TILES = ("64x64x128/1/4/3", "128x128x64/1/8/3", "128x64x64/1/4/4", "64x128x128/1/8/3")
# block_k x block_n / splits (0: automatic) / warps / stages [/ target programs] of the GEMV
# (M <= GEMV_MAX_ROWS).
GEMV_TILES = ("32x256/0/4/2", "16x256/0/4/2", "32x128/0/4/2", "64x128/0/4/2", "32x256/0/8/2",
              "16x512/0/8/2", "32x256/0/4/3", "32x256/4/4/2")
PAD_ROWS = (2, 4, 8, 16)
ROTATION_BYTES = 512 * 2**20  # > 4x an H100/H200's L2
MAX_COPIES = 48
MAX_REL_ERROR = 2e-2  # bf16 output rounding; a wrong kernel is off by far more


def parse_tile(text: str) -> MatmulTuning:
    dims, splits, warps, stages = text.split("/")
    bm, bn, bk = (int(v) for v in dims.split("x"))
    return MatmulTuning(block_m=bm, block_n=bn, block_k=bk, splits=int(splits),
                        num_warps=int(warps), num_stages=int(stages))


def parse_gemv_tile(text: str) -> GemvTuning:
    """``bk x bn / splits / warps / stages [/ target programs]``."""
    dims, splits, warps, stages, *target = text.split("/")
    bk, bn = (int(v) for v in dims.split("x"))
    extra = {}
    if target:  # more programs: allow the splits to reach them
        extra = dict(target_programs=int(target[0]), max_splits=64)
    return GemvTuning(block_k=bk, block_n=bn, splits=int(splits) or None, num_warps=int(warps),
                      num_stages=int(stages), **extra)


def compiled(fn: Callable, *args, options: dict | None = None):
    """``fn`` jitted and compiled for ``args`` with XLA ``options`` (None: the defaults)."""
    return jax.jit(fn).lower(*args).compile(options or None)


def weight_copies(weights: tuple[jax.Array, ...]) -> list[tuple[jax.Array, ...]]:
    """Distinct device copies of ``weights``, together at least ``ROTATION_BYTES`` (at most
    ``MAX_COPIES``: small test shapes are not timed for real)."""
    nbytes = sum(w.nbytes for w in weights)
    count = min(MAX_COPIES, max(2, -(-ROTATION_BYTES // nbytes)))
    return [tuple(jnp.array(w, copy=True) for w in weights) for _ in range(count)]


def best_time(fn: Callable, x: jax.Array, weights: tuple[jax.Array, ...], repeats: int = 5,
              calls: int = 3, options: dict | None = None) -> float:
    """Best seconds per matmul: ``fn(x, *w)`` for every copy of the weights in one jitted call
    (see the module docstring), ``calls`` such calls back to back, best of ``repeats``."""
    copies = weight_copies(weights)
    every_copy = compiled(lambda x, copies: [fn(x, *w) for w in copies], x, copies,
                          options=options)
    jax.block_until_ready(every_copy(x, copies))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = every_copy(x, copies)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / (calls * len(copies)))
    return best


def rel_error(out: jax.Array, ref: jax.Array) -> float:
    a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fp8_pertensor_pattern(x, w_nk, sx, sw):
    """x [M, K] e4m3, w_nk [N, K] e4m3, f32 scalar scales -> bf16 [M, N] (GemmRewriter's form)."""
    a = x.astype(jnp.bfloat16) * sx.astype(jnp.bfloat16)
    b = w_nk.astype(jnp.bfloat16) * sw.astype(jnp.bfloat16)
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.bfloat16)


def fp8_pertensor_dynamic(x, w_nk, sw):
    """x [M, K] bf16 quantized with one scale (its amax / 448) inside the call, then
    ``fp8_pertensor_pattern``: the per-tensor yardstick with the activation quantization W8A8
    pays too."""
    sx = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), 1e-12) / 448.0
    x8 = (x.astype(jnp.float32) / sx).astype(jnp.float8_e4m3fn)
    return fp8_pertensor_pattern(x8, w_nk, sx, sw)


def custom_calls(executable) -> list[str]:
    """The custom-call targets of a compiled executable (which GEMM XLA chose)."""
    text = executable.as_text()
    return sorted({line.split('custom_call_target="')[1].split('"')[0]
                   for line in text.splitlines() if 'custom_call_target="' in line})


def candidates(m: int, tiles: list[str], gemv_tiles: list[str], kn: bool = False
               ) -> list[tuple[str, str, str | None]]:
    """(name, weight format, tile) of every candidate at M tokens."""
    rows = [("dequant_xla", fmt, None) for fmt in ("fp8", "int8")]
    # XLA's dequantize + dot (unpadded, the reference) with x padded to R rows ("padR"): XLA picks
    # its GEMM by M; "dequant_xla" itself pads to DEQUANT_MIN_ROWS
    rows += [("dequant_xla", fmt, f"pad{r}") for fmt in ("fp8", "int8") for r in PAD_ROWS if r > m]
    if m <= GEMV_MAX_ROWS:
        rows += [("w8a16_gemv", fmt, t) for fmt in ("fp8", "int8") for t in gemv_tiles]
    rows += [("w8a16_pallas", fmt, t) for fmt in ("fp8", "int8") for t in tiles]
    rows += [("w8a8_pallas", "fp8", t) for t in tiles]
    rows.append(("w8a8_xla", "fp8", None))
    if kn:
        rows += [("w8a8_xla_kn", "fp8", None), ("dequant_xla_kn", "fp8", None)]
    return rows


def w8a8_xla_kn(x: jax.Array, codes_kn: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K] bf16, codes_kn [K, N] e4m3, scale f32[N] -> [M, N]: per-token fp8 x, XLA's fp8
    dot (x's dtype out), the per-token x per-channel epilogue."""
    x_codes, x_scale = quantize_rows(x)
    acc = jax.lax.dot_general(x_codes, codes_kn, (((1,), (0,)), ((), ())),
                              preferred_element_type=x.dtype)  # [M, N]
    return (acc.astype(jnp.float32) * x_scale[:, None] * scale[None, :]).astype(x.dtype)


def dequant_xla_kn(x: jax.Array, codes_kn: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K], codes_kn [K, N] -> ``(x @ codes_kn.astype(x.dtype)) * scale``, x padded to
    ``DEQUANT_MIN_ROWS`` rows as the library's ``dequant_xla`` does."""
    m = x.shape[0]
    padded = jnp.pad(x, ((0, max(0, DEQUANT_MIN_ROWS - m)), (0, 0)))
    acc = jax.lax.dot_general(padded, codes_kn.astype(x.dtype), (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return (acc * scale).astype(x.dtype)[:m]


KN_KERNELS = {"w8a8_xla_kn": w8a8_xla_kn, "dequant_xla_kn": dequant_xla_kn}


def write_kernel_table(out: pathlib.Path | None, name: str, m: int, k: int, n: int,
                       executable, *args) -> None:
    """The GPU kernels of one call of ``executable(*args)`` (already run once) to ``out``."""
    if out is None:
        return
    table = with_kernel_table(lambda: jax.block_until_ready(executable(*args)), steps=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels_{name}_{m}_{k}x{n}.txt").write_text(table + "\n")


def bench_shape(m: int, k: int, n: int, tiles: list[str], gemv_tiles: list[str], *,
                interpret: bool = False, step_options: bool = False,
                kn: bool = False, kernel_tables: tuple[str, ...] = (),
                tables_dir: pathlib.Path | None = None) -> list[dict]:
    options = step_compiler_options(m, jax.default_backend()) if step_options else None
    key_x, key_w = jax.random.split(jax.random.key(m * 7 + n))
    x = jax.random.normal(key_x, (m, k), jnp.bfloat16)
    w = (jax.random.normal(key_w, (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    rows = []
    t_bf16 = best_time(lambda a, b: a @ b, x, (w,), options=options)
    rows.append(dict(kernel="bf16_xla", format="bf16", tile=None, us=t_bf16 * 1e6, rel_error=0.0,
                     weight_bytes=2 * k * n))
    quantized = {fmt: quantize_weight(w, fmt) for fmt in ("fp8", "int8")}
    refs = {fmt: quant_matmul_reference(x, *quantized[fmt]) for fmt in ("fp8", "int8")}
    ref_w8a8 = w8a8_reference(x, *quantized["fp8"])
    for name, fmt, tile in candidates(m, tiles, gemv_tiles, kn):
        pad_to = int(tile[3:]) if tile and tile.startswith("pad") else None
        tuning = (None if tile is None or pad_to else parse_gemv_tile(tile)
                  if name == "w8a16_gemv" else parse_tile(tile))
        codes, scale = quantized[fmt]
        if name in KN_KERNELS:
            codes = codes.T.copy()  # [K, N]

        def fn(a, c, s, name=name, tuning=tuning, pad_to=pad_to):
            if pad_to:  # XLA's own choice at pad_to rows (the kernel pads to 4 itself)
                padded = jnp.pad(a, ((0, pad_to - a.shape[0]), (0, 0)))
                return quant_matmul_reference(padded, c, s)[:a.shape[0]]
            if name in KN_KERNELS:
                return KN_KERNELS[name](a, c, s)
            return quant_matmul(a, c, s, kernel=name, tuning=tuning, interpret=interpret)
        row = dict(kernel=name, format=fmt, tile=tile,
                   weight_bytes=k * n + 4 * n)
        try:
            executable = compiled(fn, x, codes, scale, options=options)
            out = executable(x, codes, scale)
            row["rel_error"] = rel_error(out, ref_w8a8 if name.startswith("w8a8") else refs[fmt])
            row["us"] = best_time(fn, x, (codes, scale), options=options) * 1e6
            if name.endswith("_xla") or name in KN_KERNELS:
                row["custom_calls"] = custom_calls(executable)
            if name in kernel_tables and tile is None:
                write_kernel_table(tables_dir, f"{name}-{fmt}", m, k, n, executable, x, codes, scale)
        except Exception as e:  # a tile that does not compile (SMEM, ...) is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    # cuBLASLt fp8 yardstick: per-tensor scales, weights [N, K]
    x8 = x.astype(jnp.float8_e4m3fn)
    sw = jnp.max(jnp.abs(w.astype(jnp.float32))) / 448.0
    w_nk = (w.astype(jnp.float32).T / sw).astype(jnp.float8_e4m3fn)
    sx = jnp.float32(1.0)
    pertensor = compiled(fp8_pertensor_pattern, x8, w_nk, sx, sw, options=options)
    out = pertensor(x8, w_nk, sx, sw)
    ref = (x8.astype(jnp.float32) @ (w_nk.astype(jnp.float32).T * sw)).astype(jnp.bfloat16)
    rows.append(dict(kernel="fp8_pertensor_xla", format="fp8/tensor", tile=None,
                     weight_bytes=k * n, rel_error=rel_error(out, ref),
                     us=best_time(lambda a, w8, s: fp8_pertensor_pattern(a, w8, sx, s), x8,
                                  (w_nk, sw), options=options) * 1e6,
                     cublas_f8=any("f8" in c for c in custom_calls(pertensor))))
    dynamic = compiled(fp8_pertensor_dynamic, x, w_nk, sw, options=options)
    out_dynamic = dynamic(x, w_nk, sw)
    sx_dynamic = jnp.max(jnp.abs(x.astype(jnp.float32))) / 448.0
    x_values = (x.astype(jnp.float32) / sx_dynamic).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    ref_dynamic = ((x_values * sx_dynamic) @ (w_nk.astype(jnp.float32).T * sw)).astype(jnp.bfloat16)
    rows.append(dict(kernel="fp8_pertensor_dynamic_xla", format="fp8/tensor", tile=None,
                     weight_bytes=k * n, rel_error=rel_error(out_dynamic, ref_dynamic),
                     us=best_time(fp8_pertensor_dynamic, x, (w_nk, sw), options=options) * 1e6,
                     cublas_f8=any("f8" in c for c in custom_calls(dynamic))))
    if "fp8_pertensor_xla" in kernel_tables:
        write_kernel_table(tables_dir, "fp8_pertensor_xla", m, k, n, pertensor, x8, w_nk, sx, sw)
    if "fp8_pertensor_dynamic_xla" in kernel_tables:
        write_kernel_table(tables_dir, "fp8_pertensor_dynamic_xla", m, k, n, dynamic, x, w_nk, sw)
    for row in rows:
        row.update(m=m, k=k, n=n)
        if "us" in row:
            row["TBps"] = row["weight_bytes"] / (row["us"] * 1e-6) / 1e12
            row["speedup_vs_bf16"] = t_bf16 * 1e6 / row["us"]
            row["ok"] = row["rel_error"] <= MAX_REL_ERROR
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| M | shape | kernel | format | tile | us | TB/s | x bf16 | rel err | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "us" not in r:
            lines.append(f"| {r['m']} | {r['k']}x{r['n']} | {r['kernel']} | {r['format']} | "
                         f"{r['tile']} | - | - | - | {r.get('error', '')[:60]} | no |")
            continue
        lines.append(f"| {r['m']} | {r['k']}x{r['n']} | {r['kernel']} | {r['format']} | "
                     f"{r['tile'] or ''} | {r['us']:.1f} | {r['TBps']:.2f} | "
                     f"{r['speedup_vs_bf16']:.2f} | {r['rel_error']:.1e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def best_per_m(rows: list[dict]) -> dict:
    """Per M and format: the fastest correct kernel+tile summed over the four shapes."""
    totals: dict = {}
    for r in rows:
        if r.get("ok") and r["kernel"] not in ("bf16_xla", "fp8_pertensor_xla",
                                               "fp8_pertensor_dynamic_xla", *KN_KERNELS):
            key = (r["m"], r["format"], r["kernel"], r["tile"])
            totals.setdefault(key, []).append(r["us"])
    shapes = len({(r["k"], r["n"]) for r in rows})
    best: dict = {}
    for (m, fmt, kernel, tile), times in totals.items():
        if len(times) != shapes:
            continue
        entry = best.setdefault(f"{fmt} M={m}", {"us": float("inf")})
        if sum(times) < entry["us"]:
            best[f"{fmt} M={m}"] = {"kernel": kernel, "tile": tile, "us": sum(times)}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES),
                        help=f"names ({', '.join(SHAPES)}) or KxN")
    parser.add_argument("--interpret", action="store_true",
                        help="Pallas kernels in interpret mode (a CPU smoke run; times mean nothing)")
    parser.add_argument("--tiles", nargs="+", default=None,
                        help="block_m x block_n x block_k / splits / warps / stages (default: "
                             "SMALL_M_TILES for M <= 16, LARGE_M_TILES above)")
    parser.add_argument("--gemv-tiles", nargs="+", default=list(GEMV_TILES),
                        help="w8a16_gemv configs at M <= 8: block_k x block_n / splits (0: auto) "
                             "/ warps / stages")
    parser.add_argument("--step-options", action="store_true",
                        help="compile with the engine's options for an M-token step")
    parser.add_argument("--kn", action="store_true",
                        help="also the XLA paths with the codes stored [K, N] (the old layout)")
    parser.add_argument("--no-tiles", action="store_true",
                        help="no Pallas tile kernels (XLA's paths and the GEMV only)")
    parser.add_argument("--kernel-tables", nargs="+", default=[], metavar="NAME",
                        help="candidates whose GPU kernels are traced (kernels_NAME_M_KxN.txt)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    rows = []
    for m in args.m:
        for shape in args.shapes:
            k, n = SHAPES[shape] if shape in SHAPES else (int(v) for v in shape.split("x"))
            tiles = [] if args.no_tiles else (args.tiles or list(SMALL_M_TILES if m <= 16
                                                                  else LARGE_M_TILES))
            shape_rows = bench_shape(m, k, n, tiles, args.gemv_tiles, interpret=args.interpret,
                                     step_options=args.step_options, kn=args.kn,
                                     kernel_tables=tuple(args.kernel_tables),
                                     tables_dir=args.out)
            for row in shape_rows:
                row["shape"] = shape
                print(json.dumps(row), flush=True)
            rows += shape_rows
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "best": best_per_m(rows), "rows": rows}
    emit({k: v for k, v in result.items() if k != "rows"}, args.out, "quant_matmul.json")
    if args.out:
        (args.out / "quant_matmul.json").write_text(json.dumps(result, indent=2))
        (args.out / "quant_matmul.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
