"""The candidates of a step's beams as arrays, and one selection over every ready group at once.

A beam's candidates are its ``2 * beam_width`` most likely next tokens (the sampler's top
logprobs) plus the sampled token when it is not among them (sampling at a temperature). A step
keeps them as ``StepCandidates``: one row per beam of the step, the rows of different groups
padded to the widest with invalid entries. ``core.beam_group.BeamStep`` refers to a row instead of
copying it, so a candidate becomes a Python tuple only if it ends up in a result.

``select_groups`` is vLLM's selection (``core.beam_group.BeamGroup`` documents the rule) for many
groups in one pass of numpy: every group's beams x candidates are ranked by score, invalid
entries last, ties in beam then candidate order (a stable sort, as Python's ``sorted`` on the
score).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxpaged.core.beam_candidates import Candidates, GroupRule, GroupSelection


@dataclasses.dataclass(frozen=True)
class StepCandidates:
    """Candidates of some beams of one step, one row per beam."""

    token_ids: np.ndarray  # i64[R, C]
    logprobs: np.ndarray  # f64[R, C]: raw logprobs (the sampler's float32 values, widened)
    ranks: np.ndarray  # i64[R, C]
    valid: np.ndarray  # bool[R, C]: padding is False

    @classmethod
    def from_sampler(cls, top_ids: np.ndarray, top_logprobs: np.ndarray, sampled: np.ndarray,
                     sampled_logprob: np.ndarray, sampled_rank: np.ndarray,
                     num_top: np.ndarray) -> StepCandidates:
        """``top_ids`` i32[R, N] / ``top_logprobs`` f32[R, N]: the rows' top logprobs;
        ``sampled`` / ``sampled_logprob`` / ``sampled_rank`` [R]: the sampled tokens;
        ``num_top`` i64[R]: how many top entries each row takes (``2 * beam_width``, at most N).
        The sampled token is a row's last candidate when it is not among its top ones."""
        rows, width = top_ids.shape[0], int(num_top.max(initial=0))
        if width > top_ids.shape[1]:
            raise ValueError(f"{width} top candidates asked for, the sampler returned "
                             f"{top_ids.shape[1]}")
        top_valid = np.arange(width)[None, :] < num_top[:, None]  # [R, width]
        ids = np.empty((rows, width + 1), np.int64)
        ids[:, :width] = top_ids[:, :width]
        ids[:, width] = sampled
        logprobs = np.empty((rows, width + 1), np.float64)
        logprobs[:, :width] = top_logprobs[:, :width]
        logprobs[:, width] = sampled_logprob
        ranks = np.empty((rows, width + 1), np.int64)
        ranks[:, :width] = np.arange(1, width + 1)[None, :]
        ranks[:, width] = sampled_rank
        valid = np.empty((rows, width + 1), np.bool_)
        valid[:, :width] = top_valid
        valid[:, width] = ~((ids[:, :width] == sampled[:, None]) & top_valid).any(axis=1)
        return cls(ids, logprobs, ranks, valid)

    @classmethod
    def concatenate(cls, parts: list[StepCandidates]) -> StepCandidates:
        """The rows of ``parts`` one after the other, padded to the widest."""
        width = max(p.token_ids.shape[1] for p in parts)

        def pad(array: np.ndarray, value) -> np.ndarray:
            return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=value)

        return cls(*(np.concatenate([pad(getattr(p, name), 0) for p in parts])
                     for name in ("token_ids", "logprobs", "ranks")),
                   np.concatenate([pad(p.valid, False) for p in parts]))

    def row(self, row: int) -> Candidates:
        valid = self.valid[row]
        return tuple(zip(self.token_ids[row][valid].tolist(), self.logprobs[row][valid].tolist(),
                         self.ranks[row][valid].tolist()))


def select_groups(candidates: StepCandidates, rows: np.ndarray, cum_logprobs: np.ndarray,
                  rules: list[GroupRule]) -> list[GroupSelection]:
    """One selection step of G groups.

    ``rows`` i64[G, B]: each group's beams as rows of ``candidates`` (-1 pads groups with fewer
    beams); ``cum_logprobs`` f64[G, B]: their scores so far; ``rules[g]``: group g's rule."""
    num_groups = rows.shape[0]
    if len(rules) != num_groups:
        raise ValueError(f"{len(rules)} rules for {num_groups} groups")
    # [G, 5] in GroupRule's field order (ids are exact in float64)
    num_fields = len(GroupRule._fields)
    table = np.fromiter(itertools.chain.from_iterable(rules), np.float64,
                        num_groups * num_fields).reshape(num_groups, num_fields)
    present = rows >= 0  # [G, B]
    safe = np.where(present, rows, 0)
    ids = candidates.token_ids[safe]  # [G, B, C]
    cum = cum_logprobs[:, :, None] + candidates.logprobs[safe]  # [G, B, C]
    valid = candidates.valid[safe] & present[:, :, None]  # [G, B, C]
    is_eos = valid & (ids == table[:, 1].astype(np.int64)[:, None, None])
    scored = (valid & ~is_eos).reshape(num_groups, -1)  # [G, B * C]
    divisors = np.where(ids == table[:, 3].astype(np.int64)[:, None, None],
                        table[:, 4, None, None], table[:, 2, None, None])  # [G, B, C]
    score = np.where(scored, (cum / divisors).reshape(num_groups, -1), 0.0)  # [G, B * C]
    # primary key: scored first; then the score, highest first; ties keep their order (stable)
    order = np.lexsort((-score, ~scored), axis=-1)  # [G, B * C]
    num_columns = ids.shape[2]
    widths = table[:, 0].astype(np.int64)  # [G]
    keep = int(widths.max(initial=0))
    best = order[:, :keep]  # [G, keep]
    flat = best + (np.arange(num_groups) * order.shape[1])[:, None]  # [G, keep] into [G * B * C]
    best_cum = cum.reshape(-1)[flat].tolist()
    best_ids = ids.reshape(-1)[flat].tolist()
    best_beams = (best // num_columns).tolist()
    num_kept = np.minimum(widths, scored.sum(axis=1)).tolist()  # [G]
    selections = [GroupSelection(list(zip(beams[:n], token_ids[:n], cums[:n])), [])
                  for beams, token_ids, cums, n in zip(best_beams, best_ids, best_cum, num_kept)]
    if is_eos.any():
        for g, b, c in np.argwhere(is_eos).tolist():  # g, b, c order
            selections[g].eos.append((b, int(ids[g, b, c]), float(cum[g, b, c])))
    return selections
