"""Per-step sampling tensors: every request's sampling parameters as one row of device arrays.

The host builds a ``SamplingTensors`` of numpy arrays once per step from the scheduled requests
(see ``sampling_tensor_builder``); the jitted step that takes it moves it to the device and hands
it to ``sampler.sample``. Rows are padded to a static batch bucket ``B``; padding rows are greedy
and use no penalties, so whatever logits they carry cannot disturb real rows.

Compilation: array shapes (``B``, the banned-id width ``K``, the penalty widths ``Lp``/``Lo``, the
constraint width ``C``), the four static switches (``all_greedy``, ``use_penalties``,
``use_top_k_top_p_min_p``, ``num_logprobs``) and whether ``constraints`` is None (a batch without
logit_bias / allowed_token_ids / bad_words has no constraint stage) each key a compile; the builder
keeps that set small.

Random keys (reproducibility): the key of row ``i`` is derived on the device by ``row_keys``:

* seeded request (``seed`` not None):
  ``fold_in(fold_in(key(seed_lo32), seed_hi32), num_generated_tokens)``. It depends only on the
  request's seed and on how many tokens it has generated so far, so a seeded request yields the
  same tokens whichever batch, row or step it lands in.
* unseeded request: ``fold_in(step_key, i)``, where ``step_key`` is a fresh engine key per step
  (the runner's is ``fold_in(base_key, step)``, derived in blocks by ``StepKeys``). The tensors
  carry the step key as raw key data, so the host can make it without a device dispatch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.sample.token_constraints import TokenConstraints


def _static():
    return dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    temperature: jax.Array  # f32[B]: < SAMPLING_EPS means greedy
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
    step_key: jax.Array  # u32[2]: raw data of this step's engine key (default impl), unseeded rows
    prompt_ids: jax.Array | None  # i32[B, Lp]: prompt token ids, -1 = padding; None unless use_penalties
    output_ids: jax.Array | None  # i32[B, Lo]: output token ids, -1 = padding; None unless use_penalties
    # logit_bias, allowed_token_ids and bad-word bans, [B, C] each; None when no row has any
    constraints: TokenConstraints | None
    # Every row is greedy: sampling (temperature, top-k/p, min-p, random keys) is skipped entirely.
    all_greedy: bool = _static()
    # Some row has a non-default presence/frequency/repetition penalty.
    use_penalties: bool = _static()
    # Some sampling row uses top-k, top-p or min-p (needs the per-row sort).
    use_top_k_top_p_min_p: bool = _static()
    # Top-N raw logprobs to return (N >= the batch's largest request); None = no logprobs at all.
    num_logprobs: int | None = _static()
    # Structured outputs: i32[B, ceil(V / 32)] allowed-token bits per row (all ones for rows
    # without a grammar); None when no row has one (the sampler then has no mask stage).
    grammar_bitmask: jax.Array | None = None

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
      step_key: the engine's key for this step: a typed key[] or its raw key data (default impl).
    """
    if not jnp.issubdtype(step_key.dtype, jax.dtypes.prng_key):
        step_key = jax.random.wrap_key_data(step_key)
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


def step_key_data(step_key: jax.Array | np.ndarray) -> np.ndarray:
    """The raw key data (u32[2] for the default impl) that ``SamplingTensors.step_key`` holds."""
    if jnp.issubdtype(step_key.dtype, jax.dtypes.prng_key):
        step_key = jax.random.key_data(step_key)
    return np.asarray(step_key)


@functools.partial(jax.jit, static_argnames=("count",))
def _fold_in_range(base_key: jax.Array, first: jax.Array, count: int) -> jax.Array:
    steps = first + jnp.arange(count, dtype=jnp.uint32)
    return jax.random.key_data(jax.vmap(lambda s: jax.random.fold_in(base_key, s))(steps))


class StepKeys:
    """``key_data(fold_in(base_key, step))`` for each step, as host arrays.

    Derived on the device ``block`` steps at a time (one jitted call and one copy per block),
    instead of an eager ``fold_in`` dispatch per step; the values are those of the eager call.
    """

    def __init__(self, base_key: jax.Array, block: int = 1024):
        self._base_key = base_key
        self._block = block
        self._first = -1  # step of the cached block's first row
        self._data: np.ndarray | None = None  # u32[block, *key_shape]
        self(0)  # compiles the derivation now (start-up), not at the first step

    def __call__(self, step: int) -> np.ndarray:
        first = step - step % self._block
        if first != self._first:
            data = np.array(_fold_in_range(self._base_key, np.uint32(first), self._block))
            data.flags.writeable = False  # handed out to every step of the block
            self._data, self._first = data, first
        return self._data[step - first]
