"""On-device sampler: one token per row of logits, inside the jitted step, with vLLM's semantics.

Pipeline per row (all rows at once, f32 math; the static switches of ``SamplingTensors`` drop the
stages no row needs):

0. structured outputs: tokens the row's grammar bitmask disallows -> -inf (only batches with a
   grammar row run this stage; vLLM applies its bitmask before the sampler, raw logprobs
   included).
1. raw logprobs: ``log_softmax`` of the logits as given (vLLM's default ``raw_logprobs`` mode).
2. token constraints (vLLM order): ``allowed_token_ids`` (every other token -> -inf), bad-word
   bans (-> -inf), ``logit_bias`` (added). Only batches with such a row run this stage.
3. penalties (vLLM order): repetition (tokens seen in prompt or output: divide
   positive logits by the penalty, multiply negative ones), frequency (``- freq * count`` in the
   output), presence (``- presence * (count > 0)`` in the output).
4. the min_tokens ban: ``banned_ids`` -> -inf (vLLM bans before the penalties: -inf is left
   -inf by the penalties and by a bias, so the order of the bans does not matter).
5. greedy rows (temperature < 1e-5) take the argmax of these logits.
6. sampling rows: divide by temperature; min-p (drop tokens with ``p < min_p * p_max``); top-k
   (keep logits >= the k-th largest, ties kept); top-p (keep the smallest prefix of the sorted
   distribution whose mass reaches ``top_p``; the top token always stays); then Gumbel-max with the
   row's own key: ``argmax(logits + Gumbel noise)`` is an exact draw from ``softmax(logits)``.

Like vLLM v1, min-p runs before top-k/top-p (it is an "argmax-invariant logits processor" applied
right after temperature). Top-k and top-p are exact: each row is sorted once (values only), the
kept set -- a prefix of that order -- becomes one threshold per row, and the row is masked with it
in vocabulary order, so no scatter back is needed. Ties with the threshold value are all kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpaged.sample.tensors import SamplingTensors
from jaxpaged.sample.token_constraints import TokenConstraints
from jaxpaged.sampling_params import SAMPLING_EPS
from jaxpaged.structured.bitmask import apply_grammar_bitmask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleLogprobs:
    top_ids: jax.Array  # i32[B, N]: the N most likely token ids, most likely first
    top_logprobs: jax.Array  # f32[B, N]: their raw logprobs
    sampled_logprob: jax.Array  # f32[B]: raw logprob of the sampled token
    sampled_rank: jax.Array  # i32[B]: 1 + number of tokens more likely than it (vLLM's rank)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # i32[B]
    logprobs: SampleLogprobs | None  # None unless tensors.num_logprobs is not None


def _token_presence_and_counts(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """ids i32[B, L] (-1 = padding) -> (bool[B, V] seen, i32[B, V] count)."""
    counts = _scatter_rows(ids, jnp.ones(ids.shape, jnp.int32), vocab_size)
    return counts > 0, counts


def apply_penalties(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """Repetition, frequency and presence penalties on f32[B, V] logits (vLLM semantics)."""
    vocab_size = logits.shape[-1]
    prompt_seen, _ = _token_presence_and_counts(tensors.prompt_ids, vocab_size)
    output_seen, output_counts = _token_presence_and_counts(tensors.output_ids, vocab_size)
    repetition = tensors.repetition_penalty[:, None]  # [B, 1]
    penalized = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = jnp.where(prompt_seen | output_seen, penalized, logits)
    logits = logits - tensors.frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - tensors.presence_penalty[:, None] * output_seen.astype(jnp.float32)


def _scatter_rows(ids: jax.Array, values: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] zeros with values[b, j] added at column ids[b, j]; -1 ids add nothing.
    ids i32[B, K]; values [B, K] (bool values: set instead of added)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    cols = jnp.where(ids < 0, vocab_size, ids)  # padding lands in an extra column, dropped below
    dense = jnp.zeros((ids.shape[0], vocab_size + 1), values.dtype).at[rows, cols]
    dense = dense.set(values) if values.dtype == jnp.bool_ else dense.add(values)
    return dense[:, :vocab_size]


def ban_tokens(logits: jax.Array, banned_ids: jax.Array) -> jax.Array:
    """Set logits[b, banned_ids[b, j]] to -inf; -1 entries ban nothing. [B, V], i32[B, K]."""
    banned = _scatter_rows(banned_ids, jnp.ones(banned_ids.shape, jnp.bool_), logits.shape[-1])
    return jnp.where(banned, -jnp.inf, logits)


def apply_token_constraints(logits: jax.Array, constraints: TokenConstraints,
                            last_tokens: jax.Array) -> jax.Array:
    """allowed_token_ids, bad-word bans and logit_bias on f32[B, V] logits (vLLM's order);
    ``last_tokens`` i32[B]: each row's last generated token (-1: none)."""
    vocab_size = logits.shape[-1]
    allowed = _scatter_rows(constraints.allowed_ids,
                            jnp.ones(constraints.allowed_ids.shape, jnp.bool_), vocab_size)
    restricted = constraints.allowed_ids[:, :1] >= 0  # [B, 1]: the row lists allowed ids
    logits = jnp.where(restricted & ~allowed, -jnp.inf, logits)
    active = (constraints.ban_after < 0) | (constraints.ban_after == last_tokens[:, None])
    logits = ban_tokens(logits, jnp.where(active, constraints.ban_ids, -1))
    return logits + _scatter_rows(constraints.bias_ids, constraints.bias_values, vocab_size)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below min_p * the row's top probability. [B, V], f32[B]."""
    relative_prob = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # p / p_max
    return jnp.where(relative_prob < min_p[:, None], -jnp.inf, logits)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Exact top-k (0 = off) then top-p (1 = off) on temperature-scaled f32[B, V] logits."""
    vocab_size = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V], largest first
    k = jnp.where((top_k <= 0) | (top_k >= vocab_size), vocab_size, top_k)  # [B]
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    in_top_k = sorted_desc >= kth_value  # [B, V]; ties with the k-th value stay, as in vLLM
    sorted_desc = jnp.where(in_top_k, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)  # [B, V], renormalised over the top-k
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly better tokens
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep = (in_top_k & in_top_p).at[:, 0].set(True)  # the top token always stays
    num_kept = jnp.sum(keep, axis=-1, keepdims=True)  # [B, 1]; keep is a prefix of the order
    threshold = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)  # [B, 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sampling_logits(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """The logits a sampling row draws from: temperature, then min-p, top-k, top-p. f32[B, V].

    ``logits`` are already penalised and banned. Greedy rows are scaled by 1 (their result is
    ignored by ``sample``).
    """
    temperature = jnp.where(tensors.temperature < SAMPLING_EPS, 1.0, tensors.temperature)
    logits = logits / temperature[:, None]
    if tensors.use_top_k_top_p_min_p:
        logits = apply_min_p(logits, tensors.min_p)
        logits = apply_top_k_top_p(logits, tensors.top_k, tensors.top_p)
    return logits


def gumbel_argmax(logits: jax.Array, keys: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits): argmax(logits + Gumbel(0, 1) noise). [B, V], key[B]."""
    vocab_size = logits.shape[-1]
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab_size,), jnp.float32))(keys)  # [B, V]
    return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def gather_logprobs(raw_logprobs: jax.Array, token_ids: jax.Array, num_logprobs: int) -> SampleLogprobs:
    """Top-N and sampled-token logprobs from f32[B, V] raw logprobs."""
    top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_logprobs)  # [B, N], descending
    sampled = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)[:, 0]  # [B]
    rank = jnp.sum(raw_logprobs >= sampled[:, None], axis=-1).astype(jnp.int32)
    return SampleLogprobs(top_ids.astype(jnp.int32), top_logprobs, sampled, rank)


def _check_shapes(logits: jax.Array, tensors: SamplingTensors) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    if logits.shape[0] != tensors.batch_size:
        raise ValueError(
            f"logits has {logits.shape[0]} rows but tensors.batch_size is {tensors.batch_size}"
        )
    if tensors.num_logprobs is not None and not 0 <= tensors.num_logprobs <= logits.shape[1]:
        raise ValueError(
            f"tensors.num_logprobs must be in [0, V={logits.shape[1]}], got {tensors.num_logprobs}"
        )
    mask = tensors.grammar_bitmask
    if mask is not None and (mask.shape[0] != logits.shape[0]
                             or mask.shape[1] * 32 < logits.shape[1]):
        raise ValueError(f"tensors.grammar_bitmask must be [B={logits.shape[0]}, >= "
                         f"{-(-logits.shape[1] // 32)}], got shape {mask.shape}")


def sample(logits: jax.Array, tensors: SamplingTensors,
           prev_sampled_ids: jax.Array | None = None) -> SamplerOutput:
    """Pick one token per row of f32/bf16[B, V] logits; traceable, meant to run inside the step.

    Returns token ids i32[B] and, when ``tensors.num_logprobs`` is not None, raw logprobs of the
    sampled token and of the top ``num_logprobs`` tokens. See the module docstring for the order.
    ``prev_sampled_ids`` i32[P]: the previous step's sampled ids on the device, read only by
    bad words whose last generated token is still in flight (``TokenConstraints``).
    """
    _check_shapes(logits, tensors)
    logits = logits.astype(jnp.float32)
    if tensors.grammar_bitmask is not None:  # vLLM masks the logits before its sampler
        logits = apply_grammar_bitmask(logits, tensors.grammar_bitmask)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1) if tensors.num_logprobs is not None else None
    if tensors.constraints is not None:
        logits = apply_token_constraints(logits, tensors.constraints,
                                         tensors.constraints.last_tokens(prev_sampled_ids))
    if tensors.use_penalties:
        logits = apply_penalties(logits, tensors)
    logits = ban_tokens(logits, tensors.banned_ids)
    token_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy
    if not tensors.all_greedy:
        sampled = gumbel_argmax(sampling_logits(logits, tensors), tensors.row_keys())
        token_ids = jnp.where(tensors.temperature < SAMPLING_EPS, token_ids, sampled)
    logprobs = None
    if raw_logprobs is not None:
        logprobs = gather_logprobs(raw_logprobs, token_ids, tensors.num_logprobs)
    return SamplerOutput(token_ids, logprobs)
