"""Per-step sampling tensors: every request's sampling parameters as one row of device arrays.

The host builds a ``SamplingTensors`` once per step from the scheduled requests
(``build_sampling_tensors``); the jitted step hands it to ``sampler.sample``. Rows are padded to a
static batch bucket ``B``; padding rows are greedy and use no penalties, so whatever logits they
carry cannot disturb real rows.

Compilation: array shapes (``B``, the banned-id width ``K``, the penalty widths ``Lp``/``Lo``) and
the four static switches (``all_greedy``, ``use_penalties``, ``use_top_k_top_p_min_p``,
``num_logprobs``) each key a compile. The builder keeps that set small: widths are rounded up to
powers of two (or forced with ``penalty_width``), penalty ids are only sent when a row uses
penalties, and ``num_logprobs`` is rounded up to ``0``, ``LOGPROBS_BUCKET`` or a power of two.

Random keys (reproducibility): the key of row ``i`` is derived on the device by ``row_keys``:

* seeded request (``seed`` not None):
  ``fold_in(fold_in(key(seed_lo32), seed_hi32), num_generated_tokens)``. It depends only on the
  request's seed and on how many tokens it has generated so far, so a seeded request yields the
  same tokens whichever batch, row or step it lands in.
* unseeded request: ``fold_in(step_key, i)``, where ``step_key`` is a fresh engine key per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

# Rows with temperature below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5
# Smallest width of the banned-ids matrix (eos + a few stop ids fit without a recompile).
MIN_BANNED_WIDTH = 4
# Smallest width of the padded prompt/output id matrices used for penalties.
MIN_PENALTY_WIDTH = 16
# Top-N logprobs requests of 1..LOGPROBS_BUCKET share one compile (vLLM's default max_logprobs).
LOGPROBS_BUCKET = 20


class SamplingParamsLike(Protocol):
    """The fields of ``jaxpaged.SamplingParams`` (vLLM names) that the sampler reads."""

    temperature: float
    top_p: float
    top_k: int  # 0 or -1: off
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int | None
    min_tokens: int
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    logprobs: int | None  # None: none; 0: the sampled token's only; -1: the whole vocabulary


def _static():
    return dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    temperature: jax.Array  # f32[B]: < GREEDY_EPS means greedy
    top_k: jax.Array  # i32[B]: 0 = off
    top_p: jax.Array  # f32[B]: 1 = off
    min_p: jax.Array  # f32[B]: 0 = off
    presence_penalty: jax.Array  # f32[B]: 0 = off
    frequency_penalty: jax.Array  # f32[B]: 0 = off
    repetition_penalty: jax.Array  # f32[B]: 1 = off
    banned_ids: jax.Array  # i32[B, K]: ids forced to -inf (stop ids while below min_tokens), -1 = none
    seeds: jax.Array  # u32[B, 2]: low and high 32 bits of the request seed (see row_keys)
    has_seed: jax.Array  # bool[B]: the request set a seed
    gen_counts: jax.Array  # i32[B]: tokens the request has generated so far
    step_key: jax.Array  # key[]: this step's engine key, for unseeded rows
    prompt_ids: jax.Array | None  # i32[B, Lp]: prompt token ids, -1 = padding; None unless use_penalties
    output_ids: jax.Array | None  # i32[B, Lo]: output token ids, -1 = padding; None unless use_penalties
    # Every row is greedy: sampling (temperature, top-k/p, min-p, random keys) is skipped entirely.
    all_greedy: bool = _static()
    # Some row has a non-default presence/frequency/repetition penalty.
    use_penalties: bool = _static()
    # Some sampling row uses top-k, top-p or min-p (needs the per-row sort).
    use_top_k_top_p_min_p: bool = _static()
    # Top-N raw logprobs to return (N >= the batch's largest request); None = no logprobs at all.
    num_logprobs: int | None = _static()

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def row_keys(self) -> jax.Array:
        """Per-row PRNG keys, key[B]; see the module docstring for the derivation."""
        return row_keys(self.seeds, self.has_seed, self.gen_counts, self.step_key)


def row_keys(
    seeds: jax.Array, has_seed: jax.Array, gen_counts: jax.Array, step_key: jax.Array
) -> jax.Array:
    """Derive key[B] on the device: seeded rows from (seed, gen_count), others from (step_key, row).

    Args:
      seeds: u32[B, 2], (low, high) 32-bit halves of each request's seed.
      has_seed: bool[B].
      gen_counts: i32[B], tokens generated so far by each request.
      step_key: typed key[], the engine's key for this step.
    """
    impl = jax.random.key_impl(step_key)

    def seeded_key(seed_halves, count):  # [2], []
        key = jax.random.key(seed_halves[0], impl=impl)
        return jax.random.fold_in(jax.random.fold_in(key, seed_halves[1]), count)

    num_rows = seeds.shape[0]
    seeded = jax.random.key_data(jax.vmap(seeded_key)(seeds, gen_counts))  # [B, *key_shape]
    rows = jnp.arange(num_rows, dtype=jnp.uint32)
    unseeded = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(step_key, i))(rows))
    pick_seeded = has_seed.reshape((num_rows,) + (1,) * (seeded.ndim - 1))
    return jax.random.wrap_key_data(jnp.where(pick_seeded, seeded, unseeded), impl=impl)


def _next_pow2(n: int, minimum: int) -> int:
    width = minimum
    while width < n:
        width *= 2
    return width


def _logprobs_bucket(requested: list[int | None], vocab_size: int) -> int | None:
    """Round the batch's largest logprobs request up to a small enumerable set."""
    wanted = [vocab_size if n == -1 else n for n in requested if n is not None]
    if not wanted:
        return None
    largest = max(wanted)
    if largest == 0:
        return 0
    if largest <= LOGPROBS_BUCKET:
        return min(LOGPROBS_BUCKET, vocab_size)
    return min(_next_pow2(largest, LOGPROBS_BUCKET), vocab_size)


def _check_range(row: int, name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"params_list[{row}].{name} must be {expected}, got {value!r}")


def _validate_params(row: int, p: SamplingParamsLike) -> None:
    _check_range(row, "temperature", p.temperature, p.temperature >= 0.0, ">= 0")
    _check_range(row, "top_p", p.top_p, 0.0 < p.top_p <= 1.0, "in (0, 1]")
    _check_range(row, "top_k", p.top_k, p.top_k >= -1, "-1, 0 (off) or positive")
    _check_range(row, "min_p", p.min_p, 0.0 <= p.min_p <= 1.0, "in [0, 1]")
    _check_range(row, "repetition_penalty", p.repetition_penalty, p.repetition_penalty > 0.0, "> 0")
    _check_range(row, "min_tokens", p.min_tokens, p.min_tokens >= 0, ">= 0")
    _check_range(row, "logprobs", p.logprobs, p.logprobs is None or p.logprobs >= -1, "None or >= -1")


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"{name} holds token id {int(bad)} outside [0, vocab_size={vocab_size})")


def _is_greedy(p: SamplingParamsLike) -> bool:
    return p.temperature < GREEDY_EPS


def _uses_penalties(p: SamplingParamsLike) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _top_k_or_off(p: SamplingParamsLike, vocab_size: int) -> int:
    return 0 if p.top_k <= 0 or p.top_k >= vocab_size else p.top_k


def _uses_filters(p: SamplingParamsLike, vocab_size: int) -> bool:
    return not _is_greedy(p) and (_top_k_or_off(p, vocab_size) > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def _pad_rows(rows: list[np.ndarray], num_rows: int, width: int) -> np.ndarray:
    """Stack id lists into i32[num_rows, width], -1 padded."""
    out = np.full((num_rows, width), -1, np.int32)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


def _banned_ids(
    params_list: Sequence[SamplingParamsLike], output_lens: list[int], eos_ids: Sequence[int], pad_to: int
) -> np.ndarray:
    """i32[B, K] stop ids of the rows still below min_tokens.

    Like vLLM, the model's eos ids count as stop ids here even with ``ignore_eos`` (vLLM adds them to
    ``all_stop_token_ids``, which the min-tokens processor bans).
    """
    rows = []
    for p, n_out in zip(params_list, output_lens):
        if n_out < p.min_tokens:
            rows.append(np.unique(np.asarray([*eos_ids, *(p.stop_token_ids or ())], np.int64)))
        else:
            rows.append(np.zeros((0,), np.int64))
    width = _next_pow2(max((len(r) for r in rows), default=0), MIN_BANNED_WIDTH)
    return _pad_rows(rows, pad_to, width)


def _penalty_ids(
    id_lists: list[np.ndarray], use_rows: list[bool], pad_to: int, width: int | None, name: str
) -> np.ndarray | None:
    """i32[B, L] ids of the rows that use penalties (others empty), or None if no row does."""
    if not any(use_rows):
        return None
    rows = [ids if use else ids[:0] for ids, use in zip(id_lists, use_rows)]
    longest = max((len(r) for r in rows), default=0)
    if width is None:
        width = _next_pow2(longest, MIN_PENALTY_WIDTH)
    elif longest > width:
        raise ValueError(f"penalty_width={width} is shorter than a row of {name} ({longest} ids)")
    return _pad_rows(rows, pad_to, width)


def _seed_halves(seed: int | None) -> tuple[int, int]:
    if seed is None:
        return 0, 0
    seed64 = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    return seed64 & 0xFFFF_FFFF, seed64 >> 32


def _validate_ids(
    params_list, prompts: list[np.ndarray], outputs: list[np.ndarray], eos_ids, vocab_size: int
) -> None:
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        _check_ids(f"prompt_ids_list[{row}]", prompt, vocab_size)
        _check_ids(f"output_ids_list[{row}]", output, vocab_size)
    _check_ids("eos_ids", np.asarray(eos_ids, np.int64).reshape(-1), vocab_size)
    for row, p in enumerate(params_list):
        stop_ids = np.asarray(p.stop_token_ids or (), np.int64).reshape(-1)
        _check_ids(f"params_list[{row}].stop_token_ids", stop_ids, vocab_size)


def _validate_batch(params_list, prompt_ids_list, output_ids_list, pad_to: int, vocab_size: int) -> None:
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if len(params_list) > pad_to:
        raise ValueError(f"params_list has {len(params_list)} rows, more than pad_to={pad_to}")
    if not len(prompt_ids_list) == len(output_ids_list) == len(params_list):
        raise ValueError(
            f"params_list, prompt_ids_list and output_ids_list must have equal lengths, got "
            f"{len(params_list)}, {len(prompt_ids_list)} and {len(output_ids_list)}"
        )
    for row, p in enumerate(params_list):
        _validate_params(row, p)


def build_sampling_tensors(
    params_list: Sequence[SamplingParamsLike],
    prompt_ids_list: Sequence[Sequence[int]],
    output_ids_list: Sequence[Sequence[int]],
    eos_ids: Sequence[int],
    pad_to: int,
    vocab_size: int,
    step_key: jax.Array,
    *,
    penalty_width: int | None = None,
) -> SamplingTensors:
    """Build the device ``SamplingTensors`` of one step (host side, numpy, then one transfer).

    Args:
      params_list: one sampling-params object per row that needs a token this step.
      prompt_ids_list: each row's prompt token ids (read only for penalties).
      output_ids_list: each row's generated token ids so far (penalties, min_tokens, seed stream).
      eos_ids: the model's eos token id(s), banned with the stop ids while below min_tokens.
      pad_to: the static batch bucket B (>= number of rows).
      vocab_size: V, the width of the logits.
      step_key: typed PRNG key for this step's unseeded rows (a raw u32[2] is wrapped).
      penalty_width: fixed width for the prompt/output id matrices (avoids a compile per
        power-of-two width); by default they are rounded up to a power of two >= 16.
    """
    _validate_batch(params_list, prompt_ids_list, output_ids_list, pad_to, vocab_size)
    prompts = [np.asarray(ids, np.int64).reshape(-1) for ids in prompt_ids_list]
    outputs = [np.asarray(ids, np.int64).reshape(-1) for ids in output_ids_list]
    _validate_ids(params_list, prompts, outputs, eos_ids, vocab_size)
    if not jnp.issubdtype(step_key.dtype, jax.dtypes.prng_key):
        step_key = jax.random.wrap_key_data(step_key)

    def column(values, dtype, pad_value):  # one value per real row -> [B]
        out = np.full((pad_to,), pad_value, dtype)
        out[: len(values)] = values
        return out

    ps = list(params_list)
    penalty_rows = [_uses_penalties(p) for p in ps]
    seeds = np.zeros((pad_to, 2), np.uint32)
    seeds[: len(ps)] = np.asarray([_seed_halves(p.seed) for p in ps], np.uint32).reshape(-1, 2)
    host = SamplingTensors(
        temperature=column([p.temperature for p in ps], np.float32, 0.0),
        top_k=column([_top_k_or_off(p, vocab_size) for p in ps], np.int32, 0),
        top_p=column([p.top_p for p in ps], np.float32, 1.0),
        min_p=column([p.min_p for p in ps], np.float32, 0.0),
        presence_penalty=column([p.presence_penalty for p in ps], np.float32, 0.0),
        frequency_penalty=column([p.frequency_penalty for p in ps], np.float32, 0.0),
        repetition_penalty=column([p.repetition_penalty for p in ps], np.float32, 1.0),
        banned_ids=_banned_ids(ps, [len(o) for o in outputs], eos_ids, pad_to),
        seeds=seeds,
        has_seed=column([p.seed is not None for p in ps], np.bool_, False),
        gen_counts=column([len(o) for o in outputs], np.int32, 0),
        step_key=step_key,
        prompt_ids=_penalty_ids(prompts, penalty_rows, pad_to, penalty_width, "prompt_ids_list"),
        output_ids=_penalty_ids(outputs, penalty_rows, pad_to, penalty_width, "output_ids_list"),
        all_greedy=all(_is_greedy(p) for p in ps),
        use_penalties=any(penalty_rows),
        use_top_k_top_p_min_p=any(_uses_filters(p, vocab_size) for p in ps),
        num_logprobs=_logprobs_bucket([p.logprobs for p in ps], vocab_size),
    )
    return jax.device_put(host)
