"""The host side of sampling: each step's ``SamplingTensors`` built from the scheduled requests.

A runner keeps a ``SamplingTensorBuilder``, which does the per-request work once per request; the
one-shot ``build_sampling_tensors`` validates everything on every call. Both return numpy arrays
(the jitted step that takes them moves them to the device).

Every array shape and static switch of ``SamplingTensors`` keys a compile, so the builder keeps
their set small: widths are rounded up to powers of two (or forced with ``penalty_width``),
penalty ids are only sent when a row uses penalties, constraint arrays only when a row has
logit_bias, allowed_token_ids or bad words (``token_constraints``), and ``num_logprobs`` is rounded
up to ``0``, ``LOGPROBS_BUCKET`` or a power of two.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Hashable, Mapping, Sequence

import jax
import numpy as np

from jaxpaged.sample.inputs import (SamplingParamsLike, check_ids, frozen, id_array, pad_lists,
                                    validate_batch, validate_ids, validate_params)
from jaxpaged.sample.tensors import SamplingTensors, step_key_data
from jaxpaged.sample.token_constraints import BatchConstraints, ConstraintRow, constraint_row
from jaxpaged.sampling_params import SAMPLING_EPS
from jaxpaged.utils.row_store import RowStore

# Smallest width of the banned-ids matrix (eos + a few stop ids fit without a recompile).
MIN_BANNED_WIDTH = 4
# Smallest width of the padded prompt/output id matrices used for penalties.
MIN_PENALTY_WIDTH = 16
# Top-N logprobs requests of 1..LOGPROBS_BUCKET share one compile (vLLM's default max_logprobs).
LOGPROBS_BUCKET = 20


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


def _seed_halves(seed: int | None) -> tuple[int, int]:
    if seed is None:
        return 0, 0
    seed64 = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    return seed64 & 0xFFFF_FFFF, seed64 >> 32


# The per-request values kept in SamplingTensorBuilder's store, one row per live request.
# f32 columns, with the value a padding row gets (greedy, no filters, no penalties):
_FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty")
_FLOAT_PADS = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# i64 columns (padding rows get 0): top_k 0 = off; logprobs -2 = None, -1 = whole vocabulary.
_INT_COLUMNS = ("top_k", "min_tokens", "has_seed", "seed_lo", "seed_hi", "logprobs", "greedy",
                "uses_penalties", "uses_filters")
_INT = {name: i for i, name in enumerate(_INT_COLUMNS)}
_NO_LOGPROBS = -2


@dataclasses.dataclass(frozen=True, eq=False)
class _Row:
    """One request in the builder: where its values live and what is not a column."""

    params: SamplingParamsLike  # the object it was built from; another object means a new request
    prompt_ids: Sequence[int]  # likewise
    slot: int  # row of the builder's store
    stop_ids: np.ndarray  # i64[k]: eos + stop token ids (sorted, unique), banned below min_tokens
    prompt_array: np.ndarray | None  # i64[Lp] prompt ids; only for rows that use penalties
    constraints: ConstraintRow | None  # logit_bias / allowed_token_ids / bad words, if any


def _row_values(p: SamplingParamsLike, vocab_size: int) -> tuple[tuple, tuple]:
    """(float column values, int column values) of one request's row."""
    greedy = p.temperature < SAMPLING_EPS
    top_k = 0 if p.top_k <= 0 or p.top_k >= vocab_size else p.top_k
    uses_penalties = (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                      or p.repetition_penalty != 1.0)
    uses_filters = not greedy and (top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)
    seed_lo, seed_hi = _seed_halves(p.seed)
    floats = (p.temperature, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
              p.repetition_penalty)
    ints = (top_k, p.min_tokens, p.seed is not None, seed_lo, seed_hi,
            _NO_LOGPROBS if p.logprobs is None else p.logprobs, greedy, uses_penalties,
            uses_filters)
    return floats, ints


@dataclasses.dataclass(frozen=True, eq=False)
class _BatchColumns:
    """The per-request (static) columns of one batch, reused while the batch stays the same."""

    rows: list[_Row]
    pad_to: int
    floats: np.ndarray  # f32[6, B], rows in _FLOAT_COLUMNS order
    top_k: np.ndarray  # i32[B]
    min_tokens: np.ndarray  # i64[n]: real rows only
    seeds: np.ndarray  # u32[B, 2]
    has_seed: np.ndarray  # bool[B]
    penalty_rows: np.ndarray  # i64[P]: rows that use penalties
    prompt_ids: np.ndarray | None  # i32[B, Lp]; None unless a row uses penalties
    constraints: BatchConstraints | None  # None unless a row has token constraints
    all_greedy: bool
    use_top_k_top_p_min_p: bool
    num_logprobs: int | None


class SamplingTensorBuilder:
    """Builds each step's host ``SamplingTensors`` from the rows that need a token.

    The per-request work (validating the parameters, turning them into row values, the stop ids
    banned below ``min_tokens``, the prompt ids for penalties) is done once per request: its values
    go to a row of a store kept while the request keeps coming back (under its key, the request
    id), and a step's static columns are one gather of the store rows in batch order, reused while
    the batch is unchanged (the steady decode step). So a step costs O(rows) of list work plus a
    few numpy calls, not O(prompt + output tokens).

    A cached row is trusted only while the request hands in the very same params and prompt
    objects; a new object (a reused request id) rebuilds the row. Output ids are checked only
    where they are read (rows with penalties): a runner's output ids come from the sampler.
    Returned arrays may be shared with later steps and are read-only.
    """

    def __init__(self, vocab_size: int, eos_ids: Sequence[int], *,
                 penalty_width: int | None = None):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.penalty_width = penalty_width
        self._eos_ids = id_array(eos_ids)
        check_ids("eos_ids", self._eos_ids, vocab_size)
        # [slots, 6] floats and [slots, 9] ints of each live request's row
        self._store = RowStore({"floats": (len(_FLOAT_COLUMNS), np.float32),
                                "ints": (len(_INT_COLUMNS), np.int64)})
        self._rows: dict[Hashable, _Row] = {}  # the last step's rows by key
        # The last step's (keys, params, prompts, rows), for a step with the very same requests.
        self._last_batch: tuple[list, list, list, list[_Row]] = ([], [], [], [])
        self._columns: _BatchColumns | None = None  # the last step's static columns
        self._no_bans: dict[int, np.ndarray] = {}  # pad_to -> i32[pad_to, MIN_BANNED_WIDTH] of -1

    def build(
        self,
        keys: Sequence[Hashable],
        params_list: Sequence[SamplingParamsLike],
        prompt_ids_list: Sequence[Sequence[int]],
        output_ids_list: Sequence[Sequence[int]],
        pad_to: int,
        step_key: jax.Array | np.ndarray,
        num_generated: Sequence[int] | None = None,
        prev_rows: Mapping[Hashable, int] | None = None,
    ) -> SamplingTensors:
        """Host (numpy) ``SamplingTensors`` of one step; see ``build_sampling_tensors`` for the
        arguments. ``keys`` name the rows' requests (unique within a step). ``num_generated``:
        each row's count of generated tokens when it exceeds ``len(output_ids_list[i])`` (async
        scheduling: samples of the step in flight are counted before their ids arrive; only rows
        without penalties may have them, as penalties read the ids); default: those lengths.
        ``prev_rows``: key -> row of the previous step's sampled ids (the device array handed to
        the sampler) holding such an in-flight sample; read for rows with multi-token bad words."""
        validate_batch(params_list, prompt_ids_list, output_ids_list, pad_to, self.vocab_size)
        if len(keys) != len(params_list):
            raise ValueError(f"keys has {len(keys)} entries for {len(params_list)} rows")
        rows = self._rows_for(keys, params_list, prompt_ids_list)
        columns = self._columns
        if (columns is None or columns.pad_to != pad_to or len(columns.rows) != len(rows)
                or not all(map(operator.is_, columns.rows, rows))):
            columns = self._columns = self._stack(rows, pad_to)
        num_rows = len(rows)
        gen_counts = np.zeros(pad_to, np.int32)
        gen_counts[:num_rows] = np.fromiter(
            map(len, output_ids_list) if num_generated is None else num_generated, np.int64,
            num_rows)
        floats = columns.floats
        constraints = columns.constraints
        if constraints is not None:
            constraints = constraints.for_step(keys, output_ids_list, gen_counts, prev_rows)
        return SamplingTensors(
            temperature=floats[0], top_k=columns.top_k, top_p=floats[1], min_p=floats[2],
            presence_penalty=floats[3], frequency_penalty=floats[4],
            repetition_penalty=floats[5],
            banned_ids=self._banned_ids(columns, gen_counts[:num_rows]),
            seeds=columns.seeds, has_seed=columns.has_seed, gen_counts=gen_counts,
            step_key=step_key, prompt_ids=columns.prompt_ids,
            output_ids=self._output_ids(columns, output_ids_list), constraints=constraints,
            all_greedy=columns.all_greedy, use_penalties=columns.prompt_ids is not None,
            use_top_k_top_p_min_p=columns.use_top_k_top_p_min_p,
            num_logprobs=columns.num_logprobs,
        )

    def _rows_for(self, keys, params_list, prompt_ids_list) -> list[_Row]:
        """This step's rows: kept where the request is the same, made where it is new; the rows
        of requests gone from the batch are released."""
        keys, last = list(keys), self._last_batch
        if (keys == last[0] and all(map(operator.is_, params_list, last[1]))
                and all(map(operator.is_, prompt_ids_list, last[2]))):
            return last[3]  # the same requests as last step, in the same order
        rows = self._update_rows(keys, params_list, prompt_ids_list)
        self._last_batch = (keys, list(params_list), list(prompt_ids_list), rows)
        return rows

    def _update_rows(self, keys, params_list, prompt_ids_list) -> list[_Row]:
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys must be unique within a step, got {list(keys)!r}")
        previous = self._rows
        rows = [previous.pop(key, None) for key in keys]
        self._store.release(row.slot for row in previous.values())
        for i, (row, p, prompt) in enumerate(zip(rows, params_list, prompt_ids_list)):
            if row is None or row.params is not p or row.prompt_ids is not prompt:
                if row is not None:
                    self._store.release((row.slot,))
                rows[i] = self._make_row(i, p, prompt)
        self._rows = dict(zip(keys, rows))
        return rows

    def _make_row(self, row: int, p: SamplingParamsLike, prompt_ids: Sequence[int]) -> _Row:
        """Validate one request's parameters (and its ids where they are used); store its row."""
        validate_params(row, p)
        stop_ids = id_array(p.stop_token_ids or ())
        check_ids(f"params_list[{row}].stop_token_ids", stop_ids, self.vocab_size)
        floats, ints = _row_values(p, self.vocab_size)
        prompt_array = None
        if ints[_INT["uses_penalties"]]:
            prompt_array = id_array(prompt_ids)
            check_ids(f"prompt_ids_list[{row}]", prompt_array, self.vocab_size)
        slot = self._store.take()
        self._store["floats"][slot] = floats
        self._store["ints"][slot] = ints
        return _Row(params=p, prompt_ids=prompt_ids, slot=slot,
                    stop_ids=np.unique(np.concatenate([self._eos_ids, stop_ids])),
                    prompt_array=prompt_array,
                    constraints=constraint_row(row, p, self.vocab_size))

    def _stack(self, rows: list[_Row], pad_to: int) -> _BatchColumns:
        """The batch's static columns: one gather of the rows' store rows, padded to pad_to."""
        num_rows = len(rows)
        slots = np.fromiter([r.slot for r in rows], np.intp, num_rows)
        floats = np.empty((len(_FLOAT_COLUMNS), pad_to), np.float32)
        floats[:] = np.asarray(_FLOAT_PADS, np.float32)[:, None]
        floats[:, :num_rows] = self._store["floats"][slots].T
        ints = np.zeros((len(_INT_COLUMNS), pad_to), np.int64)
        ints[:, :num_rows] = self._store["ints"][slots].T
        logprobs = ints[_INT["logprobs"], :num_rows]
        penalty_rows = np.flatnonzero(ints[_INT["uses_penalties"], :num_rows])
        return _BatchColumns(
            rows=rows, pad_to=pad_to, floats=frozen(floats),
            top_k=frozen(ints[_INT["top_k"]].astype(np.int32)),
            min_tokens=ints[_INT["min_tokens"], :num_rows].copy(),
            seeds=frozen(np.stack([ints[_INT["seed_lo"]], ints[_INT["seed_hi"]]], axis=1)
                          .astype(np.uint32)),
            has_seed=frozen(ints[_INT["has_seed"]].astype(np.bool_)),
            penalty_rows=penalty_rows,
            prompt_ids=self._prompt_ids(rows, penalty_rows, pad_to),
            constraints=BatchConstraints.stack([r.constraints for r in rows], pad_to),
            all_greedy=bool(ints[_INT["greedy"], :num_rows].all()),
            use_top_k_top_p_min_p=bool(ints[_INT["uses_filters"], :num_rows].any()),
            num_logprobs=_logprobs_bucket(
                logprobs[logprobs != _NO_LOGPROBS].tolist(), self.vocab_size),
        )

    def _penalty_width(self, longest: int, name: str) -> int:
        if self.penalty_width is None:
            return _next_pow2(longest, MIN_PENALTY_WIDTH)
        if longest > self.penalty_width:
            raise ValueError(f"penalty_width={self.penalty_width} is shorter than a row of {name} "
                             f"({longest} ids)")
        return self.penalty_width

    def _prompt_ids(self, rows: list[_Row], penalty_rows: np.ndarray, pad_to: int):
        """i32[B, Lp] prompt ids of the rows that use penalties (others -1); None if none does."""
        if not penalty_rows.size:
            return None
        prompts = [rows[i].prompt_array for i in penalty_rows]
        width = self._penalty_width(max(map(len, prompts)), "prompt_ids_list")
        return frozen(pad_lists(prompts, penalty_rows, pad_to, width))

    def _output_ids(self, columns: _BatchColumns, output_ids_list) -> np.ndarray | None:
        """i32[B, Lo] output ids of the rows that use penalties (others -1); None if none does."""
        if columns.prompt_ids is None:
            return None
        outputs = [id_array(output_ids_list[i]) for i in columns.penalty_rows]
        for i, ids in zip(columns.penalty_rows, outputs):
            check_ids(f"output_ids_list[{i}]", ids, self.vocab_size)
        width = self._penalty_width(max(map(len, outputs)), "output_ids_list")
        return pad_lists(outputs, columns.penalty_rows, columns.pad_to, width)

    def _banned_ids(self, columns: _BatchColumns, gen_counts: np.ndarray) -> np.ndarray:
        """i32[B, K] stop ids of the rows still below min_tokens (-1 elsewhere).

        Like vLLM, the model's eos ids count as stop ids here even with ``ignore_eos`` (vLLM adds
        them to ``all_stop_token_ids``, which the min-tokens processor bans).
        """
        below = np.flatnonzero(gen_counts < columns.min_tokens)
        if not below.size:
            no_bans = self._no_bans.get(columns.pad_to)
            if no_bans is None:
                no_bans = np.full((columns.pad_to, MIN_BANNED_WIDTH), -1, np.int32)
                no_bans = self._no_bans[columns.pad_to] = frozen(no_bans)
            return no_bans
        stop_ids = [columns.rows[i].stop_ids for i in below]
        width = _next_pow2(max(map(len, stop_ids)), MIN_BANNED_WIDTH)
        return pad_lists(stop_ids, below, columns.pad_to, width)


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
    """Build the ``SamplingTensors`` of one step as numpy arrays (the jitted step that takes them
    moves them to the device: passing host arrays to a jitted call costs far less than an explicit
    ``jax.device_put`` of each leaf).

    Every input is validated on every call; a runner building one batch per step should keep a
    ``SamplingTensorBuilder`` instead, which validates each request once (the two give equal
    tensors).

    Args:
      params_list: one sampling-params object per row that needs a token this step.
      prompt_ids_list: each row's prompt token ids (read only for penalties).
      output_ids_list: each row's generated token ids so far (penalties, min_tokens, seed stream).
      eos_ids: the model's eos token id(s), banned with the stop ids while below min_tokens.
      pad_to: the static batch bucket B (>= number of rows).
      vocab_size: V, the width of the logits.
      step_key: typed PRNG key, or its raw key data, for this step's unseeded rows.
      penalty_width: fixed width for the prompt/output id matrices (avoids a compile per
        power-of-two width); by default they are rounded up to a power of two >= 16.
    """
    validate_batch(params_list, prompt_ids_list, output_ids_list, pad_to, vocab_size)
    for row, p in enumerate(params_list):
        validate_params(row, p)
    validate_ids(prompt_ids_list, output_ids_list, vocab_size)
    builder = SamplingTensorBuilder(vocab_size, eos_ids, penalty_width=penalty_width)
    return builder.build(range(len(params_list)), params_list, prompt_ids_list, output_ids_list,
                         pad_to, step_key_data(step_key))
