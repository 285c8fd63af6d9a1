"""What beam search selects from, without the arrays: a beam's candidates, a group's rule for a
step and what its selection found (``jaxpaged.engine.beam_selection`` holds a step's candidates as
arrays and selects every ready group at once; the core only keeps rows of them).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

# (token id, raw logprob, rank in the vocabulary) of a beam's candidates, most likely first (the
# sampled token last if it is not among the top ones)
Candidates = tuple[tuple[int, float, int], ...]


class CandidateRows(Protocol):
    """A step's candidates, one row per beam (``engine.beam_selection.StepCandidates``)."""

    def row(self, row: int) -> Candidates: ...


class GroupRule(NamedTuple):
    """How one group selects this step. (A NamedTuple: made for every group every step, and
    ``select_groups`` reads the rules of a step as one numpy array.)"""

    width: int  # beams to keep
    eos_id: int  # the id that ends a beam (-1: EOS ignored)
    # vLLM's score divides by ``len ** length_penalty``, the length one less for a last token
    # equal to the tokenizer's EOS even when EOS is ignored (``get_beam_search_score``): every
    # beam of a group has the same length, so two divisors cover every candidate
    divisor: float
    short_id: int  # the id scored with ``short_divisor`` (-1: none)
    short_divisor: float


class GroupSelection(NamedTuple):
    """What ``select_groups`` found for one group: (beam index, token id, new cum logprob).
    (A NamedTuple: made for every group every step.)"""

    survivors: list[tuple[int, int, float]]  # the kept candidates, best first
    eos: list[tuple[int, int, float]]  # EOS candidates, in beam then candidate order
