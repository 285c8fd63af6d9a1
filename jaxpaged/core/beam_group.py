"""One beam search request as the scheduler runs it: a group of beams, each a ``Request``.

vLLM v1 runs beam search outside its engine, one new one-token request per beam per step. Here a
group lives in the engine: its beams are sequences in the scheduler whose KV blocks are shared.
Each step every live beam yields its ``2 * beam_width`` best next tokens (``top_k`` on the device,
the raw logprobs of the vocabulary never leave it); once every live beam of the group has them,
``engine.beam_selection.select_groups`` (every ready group of a step at once) keeps the
``beam_width`` best candidates by ``get_beam_search_score`` (vLLM's rule: the beams' candidates
in beam order, EOS ones to ``completed``, the best others survive, stable order on ties),
``apply`` records it and
``jaxpaged.core.beam_fork`` forks and frees the beams' sequences. A candidate ending in EOS (unless
``ignore_eos``) leaves as a finished sequence, which needs no KV; after ``max_tokens`` steps the
group ends and the best ``beam_width`` of its finished and live beams are its result.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jaxpaged.core.beam_candidates import (CandidateRows, Candidates, GroupRule,
                                           GroupSelection)
from jaxpaged.core.request import Request

_new_tuple = tuple.__new__  # builds a NamedTuple from all its fields (see scheduler_output)


class BeamStep(NamedTuple):
    """One generated token of a beam, linked to the steps before it (shared between beams). Its
    candidates stay a row of the step's arrays until a result reads them. (A NamedTuple: made
    for every beam of every step.)"""

    token_id: int
    source: CandidateRows  # the step's candidates; this beam's are row ``row``
    row: int
    previous: BeamStep | None

    @property
    def candidates(self) -> Candidates:
        """What the beam could have taken at this step (vLLM's logprobs)."""
        return self.source.row(self.row)

    def path(self) -> list[BeamStep]:
        steps: list[BeamStep] = []
        step: BeamStep | None = self
        while step is not None:
            steps.append(step)
            step = step.previous
        return steps[::-1]


@dataclasses.dataclass(slots=True)
class Beam:
    """A live beam: its sequence in the scheduler and its score so far."""

    request: Request
    cum_logprob: float = 0.0
    last_step: BeamStep | None = None


@dataclasses.dataclass(frozen=True)
class FinishedBeam:
    tokens: list[int]  # prompt included
    cum_logprob: float
    last_step: BeamStep | None
    finished_by_eos: bool


class Survivor(NamedTuple):
    """A candidate kept by the selection: the beam it extends, by which token."""

    parent: Beam
    token_id: int
    cum_logprob: float
    step: BeamStep
    parent_index: int  # the parent's index in the group's beams


@dataclasses.dataclass(frozen=True)
class BeamGroupConfig:
    beam_width: int
    max_tokens: int
    ignore_eos: bool
    length_penalty: float
    eos_token_id: int | None


def get_beam_search_score(tokens: list[int], cumulative_logprob: float,
                          eos_token_id: int | None, length_penalty: float = 1.0) -> float:
    """vLLM's score: ``cum_logprob / len ** length_penalty``, the length counting the prompt and
    not a final EOS."""
    seq_len = len(tokens)
    if eos_token_id is not None and tokens[-1] == eos_token_id:
        seq_len -= 1
    return cumulative_logprob / (seq_len ** length_penalty)


def beam_score(tokens_len: int, last_token: int, cum_logprob: float,
               config: BeamGroupConfig) -> float:
    """``get_beam_search_score`` without building the token list."""
    seq_len = tokens_len - (1 if config.eos_token_id is not None
                            and last_token == config.eos_token_id else 0)
    return cum_logprob / (seq_len ** config.length_penalty)


class BeamGroup:
    """The beams of one beam search request and the candidates of the current step."""

    def __init__(self, group_id: str, config: BeamGroupConfig, first: Request) -> None:
        self.group_id = group_id
        self.config = config
        self.beams: list[Beam] = [Beam(first)]
        self.completed: list[FinishedBeam] = []
        self.num_steps = 0
        # beam request id -> this step's candidates (a row of a step's CandidateRows)
        self._pending: dict[str, tuple[CandidateRows, int]] = {}
        self._next_beam = 0

    def new_beam_id(self) -> str:
        self._next_beam += 1
        return f"{self.group_id}-beam{self._next_beam}"

    @property
    def done(self) -> bool:
        return self.num_steps >= self.config.max_tokens

    def beam_ids(self) -> list[str]:
        return [b.request.request_id for b in self.beams]

    def add_candidates(self, beam_id: str, candidates: CandidateRows, row: int) -> None:
        """Beam ``beam_id``'s candidates of this step are row ``row`` of ``candidates``."""
        self._pending[beam_id] = (candidates, row)

    def drop_candidates(self, beam_id: str) -> None:
        """A preempted beam recomputes, and proposes its candidates again."""
        self._pending.pop(beam_id, None)

    def ready(self) -> bool:
        """Every live beam has proposed its candidates for this step."""
        return all(b.request.request_id in self._pending for b in self.beams)

    def pending(self) -> list[tuple[CandidateRows, int]]:
        """The live beams' candidates, in beam order (once ``ready``)."""
        return [self._pending[b.request.request_id] for b in self.beams]

    def rule(self) -> GroupRule:
        """This step's selection rule: every beam has the same length (they advance in
        lockstep), so every candidate's length is the same."""
        config = self.config
        new_len = self.beams[0].request.num_tokens + 1
        eos = config.eos_token_id
        return GroupRule(config.beam_width, -1 if config.ignore_eos or eos is None else eos,
                         new_len ** config.length_penalty,
                         -1 if eos is None else eos, (new_len - 1) ** config.length_penalty)

    def apply(self, selection: GroupSelection) -> list[Survivor]:
        """One step of vLLM's beam search from ``select_groups``' result: the EOS candidates to
        ``completed``, the kept ones as survivors (best first)."""
        pending, beams = self.pending(), self.beams
        for b, token_id, cum in selection.eos:
            beam = beams[b]
            source, row = pending[b]
            self.completed.append(FinishedBeam(
                beam.request.all_token_ids + [token_id], cum,
                BeamStep(token_id, source, row, beam.last_step), True))
        survivors = []
        for b, token_id, cum in selection.survivors:
            beam = beams[b]
            # NamedTuples built from all their fields (see core.scheduler_output's NOTE)
            step = _new_tuple(BeamStep, (token_id, *pending[b], beam.last_step))
            survivors.append(_new_tuple(Survivor, (beam, token_id, cum, step, b)))
        self._pending.clear()
        self.num_steps += 1
        return survivors

    def finish(self, survivors: list[Survivor]) -> list[FinishedBeam]:
        """After the last step: the best ``beam_width`` of the finished and surviving beams."""
        config = self.config
        everything = self.completed + [
            FinishedBeam(s.parent.request.all_token_ids + [s.token_id], s.cum_logprob, s.step,
                         False) for s in survivors]
        everything.sort(key=lambda f: beam_score(len(f.tokens), f.tokens[-1], f.cum_logprob,
                                                 config), reverse=True)
        return everything[:config.beam_width]
