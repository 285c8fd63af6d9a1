"""``select_groups`` (every group of a step in one numpy pass) against vLLM's rule written out in
Python, one group at a time: candidates in beam order, EOS ones finish, the best others by
``get_beam_search_score`` survive, ties in beam then candidate order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.core.beam_candidates import GroupRule
from jaxpaged.engine.beam_selection import StepCandidates, select_groups
from jaxpaged.core.beam_group import get_beam_search_score


def reference(beams: list[list[tuple[int, float]]], cums: list[float], tokens: list[int],
              width: int, eos: int | None, ignore_eos: bool, penalty: float):
    """vLLM's step for one group: (survivors, eos) as (beam, token, cum) lists."""
    scored, finished = [], []
    for b, (candidates, cum) in enumerate(zip(beams, cums)):
        for token_id, logprob in candidates:
            new_cum = cum + logprob
            if not ignore_eos and token_id == eos:
                finished.append((b, token_id, new_cum))
            else:
                score = get_beam_search_score(tokens + [token_id], new_cum, eos, penalty)
                scored.append((score, b, token_id, new_cum))
    best = sorted(scored, key=lambda entry: entry[0], reverse=True)[:width]
    return [(b, t, c) for _, b, t, c in best], finished


def rule(width: int, eos: int | None, ignore_eos: bool, penalty: float, new_len: int) -> GroupRule:
    return GroupRule(width, -1 if ignore_eos or eos is None else eos, new_len ** penalty,
                     -1 if eos is None else eos, (new_len - 1) ** penalty)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_matches_the_rule_written_out(data):
    num_groups = data.draw(st.integers(1, 4))
    groups, rows, all_ids, all_logprobs = [], [], [], []
    for _ in range(num_groups):
        width = data.draw(st.integers(1, 3))
        num_beams = data.draw(st.integers(1, width))
        eos = data.draw(st.sampled_from([None, 3]))
        ignore_eos = data.draw(st.booleans())
        penalty = data.draw(st.sampled_from([1.0, 0.5, 2.0]))
        tokens = [7] * data.draw(st.integers(2, 6))
        cums = [data.draw(st.sampled_from([0.0, -1.0, -2.5])) for _ in range(num_beams)]
        beams = []
        for _ in range(num_beams):
            # few distinct values: many ties; ids from a small vocabulary: EOS often among them
            ids = data.draw(st.lists(st.integers(0, 9), min_size=2 * width,
                                     max_size=2 * width, unique=True))
            logprobs = sorted((data.draw(st.sampled_from([-0.5, -1.0, -1.5, -3.0]))
                               for _ in ids), reverse=True)
            beams.append(list(zip(ids, logprobs)))
            rows.append(len(all_ids))
            all_ids.append(ids)
            all_logprobs.append(logprobs)
        groups.append((beams, cums, tokens, width, eos, ignore_eos, penalty))
    num_top = np.array([len(ids) for ids in all_ids])
    top_width = int(num_top.max())
    top_ids = np.array([ids + [0] * (top_width - len(ids)) for ids in all_ids], np.int32)
    top_logprobs = np.array([lp + [0.0] * (top_width - len(lp)) for lp in all_logprobs],
                            np.float32)
    # greedy: the sampled token is the first top one, so no extra candidate
    candidates = StepCandidates.from_sampler(top_ids, top_logprobs, top_ids[:, 0],
                                             top_logprobs[:, 0], np.ones(len(rows), np.int32),
                                             num_top)
    max_beams = max(len(g[0]) for g in groups)
    row_matrix = np.full((num_groups, max_beams), -1, np.int64)
    cum_matrix = np.zeros((num_groups, max_beams))
    offset = 0
    for g, (beams, cums, *_rest) in enumerate(groups):
        row_matrix[g, :len(beams)] = rows[offset:offset + len(beams)]
        cum_matrix[g, :len(beams)] = cums
        offset += len(beams)
    rules = [rule(width, eos, ignore_eos, penalty, len(tokens) + 1)
             for _, _, tokens, width, eos, ignore_eos, penalty in groups]
    selections = select_groups(candidates, row_matrix, cum_matrix, rules)
    for (beams, cums, tokens, width, eos, ignore_eos, penalty), selection in zip(groups,
                                                                                selections):
        # the sampler's float32 logprobs, as the engine reads them
        beams32 = [[(t, float(np.float32(v))) for t, v in beam] for beam in beams]
        survivors, finished = reference(beams32, cums, tokens, width, eos, ignore_eos, penalty)
        assert selection.survivors == survivors
        assert selection.eos == finished


def test_a_sampled_token_outside_the_top_is_a_candidate():
    top_ids = np.array([[4, 5], [4, 5]], np.int32)
    top_logprobs = np.array([[-0.1, -0.2], [-0.1, -0.2]], np.float32)
    candidates = StepCandidates.from_sampler(top_ids, top_logprobs, np.array([9, 5]),
                                             np.array([-4.0, -0.2], np.float32),
                                             np.array([7, 2]), np.array([2, 2]))
    assert candidates.row(0) == ((4, pytest.approx(-0.1), 1), (5, pytest.approx(-0.2), 2),
                                 (9, -4.0, 7))
    assert len(candidates.row(1)) == 2  # sampled 5 is a top one already


def test_asking_for_more_candidates_than_returned_is_an_error():
    with pytest.raises(ValueError, match="top candidates"):
        StepCandidates.from_sampler(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32),
                                    np.zeros(1), np.zeros(1, np.float32), np.ones(1),
                                    np.array([4]))
