"""Shared helpers of the kernel tests: random paged batches and an independent numpy reference.

A batch is built the way the engine lays memory out, with the traps a kernel must survive:
pages handed out in a random order, every slot no sequence owns (whole unused pages, the tail of
each last page, the null page 0) filled with NaN, block-table entries past a sequence's end
pointing at random pages (NaN ones included), and padding tokens whose q is NaN. ``dense_attention``
recomputes the expected output in float64 numpy, one token at a time, from the host-side block
tables, so it checks the jnp references as well as the kernels.

fp8 pools (``AttentionConfig.kv_dtype``): the same values are quantized in numpy (ml_dtypes, not
the library's code) under non-trivial per-tensor scales; NaN slots stay NaN. The expected output
then attends over the dequantized codes (``code * scale``); the same batch with ``kv_dtype=None``
holds the unquantized values, for comparisons with exact attention.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Relative-norm error bounds by dtype (bf16: a few output ulps of accumulated rounding).
REL_TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1.2e-2}
ABS_TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 4e-2}

E4M3, E5M2 = jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2)
# Scales of the test pools: N(0, 1) values reach codes of a few hundred (e4m3's largest is 448,
# so 7 * 64 is the K clipping point: never reached), and a kernel that ignored a scale would be
# off by 32x or 64x.
K_SCALE, V_SCALE = 1.0 / 64, 1.0 / 32


def fp8_codes(x, scale: float, dtype: jnp.dtype) -> np.ndarray:
    """numpy quantization, independent of the kernels' code: fp8(clip(x / scale, +-max))."""
    limit = np.float32(jnp.finfo(dtype).max)
    quotient = np.asarray(x, np.float32) / np.float32(scale)
    return np.clip(quotient, -limit, limit).astype(dtype)


def assert_codes_close(actual, expected, dtype: jnp.dtype, what: str = "", *,
                       max_fraction_off: float = 1.0) -> None:
    """fp8 codes equal (NaN matching NaN) or one step of the format apart, with at most
    ``max_fraction_off`` of the finite values not equal."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert (np.isnan(a) == np.isnan(e)).all(), f"{what}: NaN where none is expected, or none"
    a, e = a[~np.isnan(e)], e[~np.isnan(e)]
    info = jnp.finfo(dtype)
    step = float(info.eps) * np.maximum(np.abs(a), np.abs(e)) + float(info.smallest_subnormal)
    far = np.abs(a - e) > step
    assert not far.any(), f"{what}: {far.sum()} codes more than one step apart"
    off = float(np.mean(a != e)) if a.size else 0.0
    assert off <= max_fraction_off, f"{what}: {off:.3%} of codes differ"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: jnp.dtype = jnp.float32  # q's dtype, and the pools' unless kv_dtype is set
    soft_cap: float | None = None
    kv_dtype: jnp.dtype | None = None  # an fp8 pool, scaled by K_SCALE / V_SCALE

    @property
    def pool_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.kv_dtype or self.dtype)

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def __str__(self) -> str:
        dt = jnp.dtype(self.dtype).name
        kv = "" if self.kv_dtype is None else f"-kv_{jnp.dtype(self.kv_dtype).name}"
        return (f"Hq{self.num_q_heads}-Hkv{self.num_kv_heads}-D{self.head_dim}-bs{self.page_size}"
                f"-{dt}-cap{self.soft_cap}{kv}")


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    q: jax.Array  # [T, Hq, D]; padding tokens hold NaN
    k_cache: jax.Array  # [P, page_size, Hkv, D]; slots owned by no sequence hold NaN
    v_cache: jax.Array  # [P, page_size, Hkv, D]
    block_tables: jax.Array  # i32[S, W]; entries past each sequence's end are random pages
    seq_lens: jax.Array  # i32[S]
    query_start_loc: jax.Array  # i32[S + 1]
    q_lens: tuple[int, ...]  # host copy of the query lengths
    k_scale: float | None = None  # fp8 pools: value = code * scale
    v_scale: float | None = None

    def scale_kwargs(self) -> dict[str, float]:
        """``k_scale``/``v_scale`` for the attention functions (none for unquantized pools)."""
        if self.k_scale is None:
            return {}
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)

    @property
    def num_real_tokens(self) -> int:
        return sum(self.q_lens)

    def attention_args(self) -> tuple[jax.Array, ...]:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_loc)


def make_paged_batch(seed: int, config: AttentionConfig, *, q_lens: list[int],
                     seq_lens: list[int], num_padding_tokens: int = 0,
                     extra_table_width: int = 1, spare_pages: int = 3) -> PagedBatch:
    """A ragged batch: sequence ``s`` has ``q_lens[s]`` new tokens, ``seq_lens[s]`` of context."""
    if len(q_lens) != len(seq_lens) or any(q > n for q, n in zip(q_lens, seq_lens)):
        raise ValueError(f"need q_len <= seq_len per sequence, got {q_lens} / {seq_lens}")
    rng = np.random.default_rng(seed)
    c = config
    pages_needed = [-(-n // c.page_size) for n in seq_lens]
    width = max(pages_needed + [1]) + extra_table_width
    num_pages = 1 + sum(pages_needed) + spare_pages  # page 0: the null page, never owned
    order = rng.permutation(np.arange(1, num_pages))

    kv_shape = (num_pages, c.page_size, c.num_kv_heads, c.head_dim)
    k_pool = np.full(kv_shape, np.nan, np.float32)
    v_pool = np.full(kv_shape, np.nan, np.float32)
    tables = rng.integers(0, num_pages, size=(len(seq_lens), width)).astype(np.int32)
    next_page = 0
    for s, (n, pages) in enumerate(zip(seq_lens, pages_needed)):
        tables[s, :pages] = order[next_page:next_page + pages]
        next_page += pages
        for pos in range(n):
            page, offset = tables[s, pos // c.page_size], pos % c.page_size
            k_pool[page, offset] = rng.standard_normal((c.num_kv_heads, c.head_dim))
            v_pool[page, offset] = rng.standard_normal((c.num_kv_heads, c.head_dim))

    num_tokens = sum(q_lens) + num_padding_tokens
    q = rng.standard_normal((num_tokens, c.num_q_heads, c.head_dim)).astype(np.float32)
    q[sum(q_lens):] = np.nan
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    scales = {}
    if c.kv_dtype is not None:
        k_pool, v_pool = (fp8_codes(k_pool, K_SCALE, c.kv_dtype),
                          fp8_codes(v_pool, V_SCALE, c.kv_dtype))
        scales = dict(k_scale=K_SCALE, v_scale=V_SCALE)
    return PagedBatch(
        q=jnp.asarray(q, c.dtype), k_cache=jnp.asarray(k_pool, c.pool_dtype),
        v_cache=jnp.asarray(v_pool, c.pool_dtype), block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(seq_lens, jnp.int32), query_start_loc=jnp.asarray(qsl),
        q_lens=tuple(q_lens), **scales)


def make_decode_batch(seed: int, config: AttentionConfig, *, seq_lens: list[int],
                      extra_table_width: int = 1) -> PagedBatch:
    """One query token per sequence (``q_len = 1``; a ``seq_len`` of 0 is a padding row)."""
    q_lens = [1 if n > 0 else 0 for n in seq_lens]
    batch = make_paged_batch(seed, config, q_lens=q_lens, seq_lens=seq_lens,
                             extra_table_width=extra_table_width)
    # Decode takes one q row per sequence: padding rows get a NaN query.
    rng = np.random.default_rng(seed + 1)
    q = rng.standard_normal((len(seq_lens), config.num_q_heads, config.head_dim))
    q[np.asarray(seq_lens) == 0] = np.nan
    return dataclasses.replace(batch, q=jnp.asarray(q, config.dtype))


def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _attend(q: np.ndarray,  # [Hq, D]
            k: np.ndarray,  # [n, Hkv, D]
            v: np.ndarray,  # [n, Hkv, D]
            sm_scale: float, soft_cap: float | None) -> np.ndarray:  # [Hq, D]
    group = q.shape[0] // k.shape[1]
    k = np.repeat(k, group, axis=1)  # [n, Hq, D]: query head h reads kv head h // group
    v = np.repeat(v, group, axis=1)
    logits = np.einsum("hd,nhd->hn", q, k) * sm_scale
    if soft_cap is not None:
        logits = soft_cap * np.tanh(logits / soft_cap)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hn,nhd->hd", p, v)


def _context(batch: PagedBatch, s: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of sequence ``s``'s first ``length`` positions, slot by slot: [length, Hkv, D]
    (an fp8 pool's codes times its scales)."""
    tables = np.asarray(batch.block_tables)
    page_size = batch.k_cache.shape[1]
    pages = [tables[s, pos // page_size] for pos in range(length)]
    offsets = [pos % page_size for pos in range(length)]
    k_scale = 1.0 if batch.k_scale is None else batch.k_scale
    v_scale = 1.0 if batch.v_scale is None else batch.v_scale
    return (_host(batch.k_cache)[pages, offsets] * k_scale,
            _host(batch.v_cache)[pages, offsets] * v_scale)


def dense_attention(batch: PagedBatch, *, sm_scale: float,
                    soft_cap: float | None = None) -> np.ndarray:  # f64[T, Hq, D]
    """Expected ragged attention output: one token at a time over its causal context."""
    q = _host(batch.q)
    out = np.zeros(q.shape, np.float64)
    qsl, seq_lens = np.asarray(batch.query_start_loc), np.asarray(batch.seq_lens)
    for s, q_len in enumerate(batch.q_lens):
        k, v = _context(batch, s, int(seq_lens[s]))
        for i in range(q_len):
            pos = int(seq_lens[s]) - q_len + i
            out[qsl[s] + i] = _attend(q[qsl[s] + i], k[:pos + 1], v[:pos + 1], sm_scale, soft_cap)
    return out


def dense_decode_attention(batch: PagedBatch, *, sm_scale: float,
                           soft_cap: float | None = None) -> np.ndarray:  # f64[S, Hq, D]
    """Expected decode output: each sequence's query row over its whole context (0 if empty)."""
    q = _host(batch.q)
    out = np.zeros(q.shape, np.float64)
    for s, n in enumerate(np.asarray(batch.seq_lens)):
        if n > 0:
            k, v = _context(batch, s, int(n))
            out[s] = _attend(q[s], k, v, sm_scale, soft_cap)
    return out


def _as_f64(x: jax.Array | np.ndarray) -> np.ndarray:
    return _host(x) if isinstance(x, jax.Array) else np.asarray(x, np.float64)


def relative_error(actual: jax.Array, expected: np.ndarray | jax.Array) -> float:
    """``|actual - expected| / |expected|`` in the Frobenius norm, in float64."""
    actual, expected = _as_f64(actual), _as_f64(expected)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def assert_close(actual: jax.Array, expected: np.ndarray | jax.Array, dtype: jnp.dtype,
                 what: str = "", *, slack: float = 1.0) -> None:
    """Relative-norm and max-abs error within the dtype's bounds (times ``slack``); no NaN."""
    actual, expected = _as_f64(actual), _as_f64(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.isfinite(actual).all(), f"{what}: non-finite output"
    err = np.abs(actual - expected)
    rel = relative_error(actual, expected)
    rel_tol, abs_tol = REL_TOL[jnp.dtype(dtype)] * slack, ABS_TOL[jnp.dtype(dtype)] * slack
    assert rel <= rel_tol and err.max() <= abs_tol, (
        f"{what}: relative-norm error {rel:.3g} (bound {rel_tol:.3g}), max abs error "
        f"{err.max():.3g} (bound {abs_tol:.3g})")


def assert_pools_equal(actual: jax.Array, expected: np.ndarray) -> None:
    """Bit-for-bit equality of a whole pool, NaN matching NaN."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    assert same.all(), f"{(~same).sum()} pool values differ, first at {np.argwhere(~same)[0]}"
