"""Token constraints: ``logit_bias``, ``allowed_token_ids`` and ``bad_words`` as padded per-row
arrays for the jitted sampler (``TokenConstraints``), and the host work that builds them.

Every array is ``[B, C]``: one row per sampler row, ``C`` entries padded with -1 (one width for
the three lists of a batch, a power of two >= ``MIN_CONSTRAINT_WIDTH``, so a batch's lists add at
most a few shapes). A batch without any constraint carries ``None`` instead (its sampler program
has no constraint stage at all).

Bad words (vLLM's rule, ``vllm/v1/sample/ops/bad_words.py``): a bad word is a token sequence
``w`` of length m; its last token ``w[-1]`` is banned for the next sample when the request has
generated at least m - 1 tokens and the last m - 1 of them equal ``w[:-1]``. A one-token word is
always banned. The host knows every generated token but, with async scheduling, possibly the last
one, which the step in flight is still sampling. So the host checks ``w[:-2]`` against the
generated tokens before the last and sends ``(w[-1], w[-2])`` as (``ban_ids``, ``ban_after``);
the device compares ``ban_after`` with the row's last generated token, taken from the previous
step's sampled ids on the device when it is in flight (``last_token_row``) or from the host
(``last_token``). No step waits for the host to see a token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.sample.inputs import SamplingParamsLike, check_ids, frozen, id_array, pad_lists

# Smallest width C of the constraint arrays (a few biased / allowed ids / bad words share one
# compiled sampler; warm-up compiles this width).
MIN_CONSTRAINT_WIDTH = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenConstraints:
    """The batch's constraint arrays (device side of ``SamplingTensors.constraints``)."""

    bias_ids: jax.Array  # i32[B, C]: logit_bias token ids, -1 = padding
    bias_values: jax.Array  # f32[B, C]: their biases (0 in padding)
    allowed_ids: jax.Array  # i32[B, C]: allowed_token_ids; a row starting with -1 allows all
    ban_ids: jax.Array  # i32[B, C]: bad-word tokens to ban this step, -1 = padding
    ban_after: jax.Array  # i32[B, C]: ban only if the last generated token is this; -1: always
    last_token: jax.Array  # i32[B]: the row's last generated token when the host has it, else -1
    last_token_row: jax.Array  # i32[B]: row of the previous step's sampled ids holding it, else -1

    def last_tokens(self, prev_sampled_ids: jax.Array | None) -> jax.Array:
        """i32[B]: each row's last generated token (-1: none yet). ``prev_sampled_ids``
        i32[P]: the previous step's sampled ids on the device (None: every token is on the host,
        then ``last_token_row`` must be all -1)."""
        if prev_sampled_ids is None:
            return self.last_token
        in_flight = prev_sampled_ids[jnp.maximum(self.last_token_row, 0)]
        return jnp.where(self.last_token_row >= 0, in_flight, self.last_token)


@dataclasses.dataclass(frozen=True, eq=False)
class ConstraintRow:
    """One request's constraints, validated against the vocabulary once."""

    bias_ids: np.ndarray  # i64[nb]
    bias_values: np.ndarray  # f32[nb]
    allowed_ids: np.ndarray  # i64[na] (empty: every token allowed)
    single_bans: np.ndarray  # i64[ns]: one-token bad words, banned at every step
    multi_words: tuple[tuple[int, ...], ...]  # bad words of >= 2 tokens

    @property
    def width(self) -> int:
        """Entries this row needs in the widest of the batch's arrays."""
        return max(len(self.bias_ids), len(self.allowed_ids),
                   len(self.single_bans) + len(self.multi_words))


def constraint_row(row: int, p: SamplingParamsLike, vocab_size: int) -> ConstraintRow | None:
    """The row's constraints (None: it has none); ValueError names an id outside the vocabulary,
    or ``bad_words`` that were never tokenized."""
    bias = p.logit_bias or {}
    allowed = p.allowed_token_ids
    words = p.bad_words_token_ids
    if words is None and p.bad_words:
        raise ValueError(f"params_list[{row}].bad_words must be tokenized first "
                         "(SamplingParams.update_from_tokenizer)")
    if not bias and allowed is None and not words:
        return None
    bias_ids = id_array(list(bias))
    allowed_ids = id_array(allowed if allowed is not None else ())
    check_ids(f"params_list[{row}].logit_bias", bias_ids, vocab_size)
    check_ids(f"params_list[{row}].allowed_token_ids", allowed_ids, vocab_size)
    words = [tuple(int(t) for t in w) for w in words or ()]
    check_ids(f"params_list[{row}].bad_words", id_array([t for w in words for t in w]),
              vocab_size)
    return ConstraintRow(
        bias_ids=bias_ids, bias_values=np.asarray(list(bias.values()), np.float32),
        allowed_ids=allowed_ids,
        single_bans=id_array([w[0] for w in words if len(w) == 1]),
        multi_words=tuple(w for w in words if len(w) > 1))


def constraint_width(rows: Sequence[ConstraintRow]) -> int:
    """C for a batch: the widest row's need rounded up to a power of two >= the minimum."""
    need = max([r.width for r in rows], default=0)
    width = MIN_CONSTRAINT_WIDTH
    while width < need:
        width *= 2
    return width


def bad_word_bans(row: ConstraintRow, output_ids: Sequence[int],
                  num_generated: int) -> tuple[list[int], list[int]]:
    """(ban ids, ban-after tokens) of one row for this step (see the module docstring).

    ``output_ids`` are the generated tokens the host has; ``num_generated`` counts those plus
    the one still in flight, if any (so it is ``len(output_ids)`` or one more)."""
    ban_ids = row.single_bans.tolist()
    ban_after = [-1] * len(ban_ids)
    for word in row.multi_words:
        prefix_len = len(word) - 1
        if prefix_len > num_generated:
            continue
        # generated tokens num_generated - prefix_len .. num_generated - 2 (all on the host)
        head = output_ids[num_generated - prefix_len:num_generated - 1] if prefix_len > 1 else ()
        if tuple(head) == word[:-2]:
            ban_ids.append(word[-1])
            ban_after.append(word[-2])
    return ban_ids, ban_after


@dataclasses.dataclass(frozen=True, eq=False)
class BatchConstraints:
    """One batch's constraints: the arrays that stay while the batch does, and the rows whose
    bad-word bans depend on the tokens generated so far (rebuilt each step, O(those rows))."""

    rows: list[ConstraintRow | None]  # by sampler row
    static: TokenConstraints  # bans of one-token words only; last tokens all -1
    multi_rows: list[int]  # rows with bad words of >= 2 tokens

    @classmethod
    def stack(cls, rows: list[ConstraintRow | None], pad_to: int) -> BatchConstraints | None:
        """The batch's arrays padded to ``pad_to`` rows; None when no row has a constraint."""
        index = [i for i, r in enumerate(rows) if r is not None]
        if not index:
            return None
        used = [rows[i] for i in index]
        width = constraint_width(used)

        def pad(lists, dtype, fill):
            return frozen(pad_lists(lists, index, pad_to, width, dtype, fill))

        no_last = frozen(np.full(pad_to, -1, np.int32))
        static = TokenConstraints(
            bias_ids=pad([r.bias_ids for r in used], np.int32, -1),
            bias_values=pad([r.bias_values for r in used], np.float32, 0.0),
            allowed_ids=pad([r.allowed_ids for r in used], np.int32, -1),
            ban_ids=pad([r.single_bans for r in used], np.int32, -1),
            ban_after=frozen(np.full((pad_to, width), -1, np.int32)),
            last_token=no_last, last_token_row=no_last)
        return cls(rows, static, [i for i in index if rows[i].multi_words])

    def for_step(self, keys: Sequence[Hashable], output_ids_list: Sequence[Sequence[int]],
                 num_generated: Sequence[int],
                 prev_rows: Mapping[Hashable, int] | None) -> TokenConstraints:
        """This step's constraints. ``prev_rows``: key -> row of the previous step's sampled ids,
        for the rows whose last generated token is still in flight (async scheduling)."""
        if not self.multi_rows:
            return self.static
        static = self.static
        ban_ids, ban_after = np.array(static.ban_ids), np.array(static.ban_after)
        last_token, last_row = np.array(static.last_token), np.array(static.last_token_row)
        for i in self.multi_rows:
            output_ids, count = output_ids_list[i], int(num_generated[i])
            ids, after = bad_word_bans(self.rows[i], output_ids, count)
            ban_ids[i, :len(ids)], ban_after[i, :len(after)] = ids, after
            last_token[i], last_row[i] = _last_token(keys[i], output_ids, count, prev_rows)
        return TokenConstraints(bias_ids=static.bias_ids, bias_values=static.bias_values,
                                allowed_ids=static.allowed_ids, ban_ids=ban_ids,
                                ban_after=ban_after, last_token=last_token,
                                last_token_row=last_row)


def _last_token(key: Hashable, output_ids: Sequence[int], num_generated: int,
                prev_rows: Mapping[Hashable, int] | None) -> tuple[int, int]:
    """(last generated token or -1, -1) when the host has it; (-1, its row in the previous
    step's sampled ids) when it is in flight."""
    known = len(output_ids)
    if num_generated == known:
        return (int(output_ids[-1]) if known else -1), -1
    row = (prev_rows or {}).get(key) if num_generated == known + 1 else None
    if row is None:
        raise ValueError(f"row {key!r} counts {num_generated} generated tokens but has {known} "
                         "and no in-flight sample to read the last one from")
    return -1, row
