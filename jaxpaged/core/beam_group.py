"""One beam search request as the scheduler runs it: a group of beams, each a ``Request``.

vLLM v1 runs beam search outside its engine, one new one-token request per beam per step. Here a
group lives in the engine: its beams are sequences in the scheduler whose KV blocks are shared.
Each step every live beam yields its ``2 * beam_width`` best next tokens (``top_k`` on the device,
the raw logprobs of the vocabulary never leave it); once every live beam of the group has them,
``select`` keeps the ``beam_width`` best candidates by ``get_beam_search_score`` (vLLM's rule) and
``jaxpaged.core.beam_fork`` forks and frees the beams' sequences. A candidate ending in EOS (unless
``ignore_eos``) leaves as a finished sequence, which needs no KV; after ``max_tokens`` steps the
group ends and the best ``beam_width`` of its finished and live beams are its result.
"""

from __future__ import annotations

import dataclasses

from jaxpaged.core.request import Request

# (token id, raw logprob, rank in the vocabulary) of a beam's candidates, most likely first (the
# sampled token last if it is not among the top ones)
Candidates = tuple[tuple[int, float, int], ...]


@dataclasses.dataclass(frozen=True)
class BeamStep:
    """One generated token of a beam, linked to the steps before it (shared between beams)."""

    token_id: int
    candidates: Candidates  # what the beam could have taken at this step (vLLM's logprobs)
    previous: BeamStep | None

    def path(self) -> list[BeamStep]:
        steps: list[BeamStep] = []
        step: BeamStep | None = self
        while step is not None:
            steps.append(step)
            step = step.previous
        return steps[::-1]


@dataclasses.dataclass
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


@dataclasses.dataclass(frozen=True)
class Survivor:
    """A candidate kept by ``select``: the beam it extends, by which token."""

    parent: Beam
    token_id: int
    cum_logprob: float
    step: BeamStep


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
        self._pending: dict[str, Candidates] = {}  # beam request id -> this step's candidates
        self._next_beam = 0

    def new_beam_id(self) -> str:
        self._next_beam += 1
        return f"{self.group_id}-beam{self._next_beam}"

    @property
    def done(self) -> bool:
        return self.num_steps >= self.config.max_tokens

    def beam_ids(self) -> list[str]:
        return [b.request.request_id for b in self.beams]

    def add_candidates(self, beam_id: str, candidates: Candidates) -> None:
        self._pending[beam_id] = candidates

    def drop_candidates(self, beam_id: str) -> None:
        """A preempted beam recomputes, and proposes its candidates again."""
        self._pending.pop(beam_id, None)

    def ready(self) -> bool:
        """Every live beam has proposed its candidates for this step."""
        return all(b.request.request_id in self._pending for b in self.beams)

    def select(self) -> list[Survivor]:
        """One step of vLLM's beam search: every live beam's candidates in beam order, EOS ones
        to ``completed``, the ``beam_width`` best others (stable order on ties) survive.

        Scores are (score, beam index, candidate index) tuples until the cut: a ``BeamStep`` is
        made only for the kept candidates (a step has beam_width x 2 beam_width of them)."""
        config, scored = self.config, []
        eos = None if config.ignore_eos else config.eos_token_id
        for b, beam in enumerate(self.beams):
            request = beam.request
            candidates = self._pending[request.request_id]
            new_len = request.num_tokens + 1
            for c, (token_id, logprob, _) in enumerate(candidates):
                cum = beam.cum_logprob + logprob
                if token_id == eos:
                    self.completed.append(FinishedBeam(
                        request.all_token_ids + [token_id], cum,
                        BeamStep(token_id, candidates, beam.last_step), True))
                else:
                    scored.append((beam_score(new_len, token_id, cum, config), b, c, cum))
        # sorted() is stable: equal scores keep beam and candidate order
        best = sorted(scored, key=lambda entry: entry[0], reverse=True)[:config.beam_width]
        survivors = []
        for _, b, c, cum in best:
            beam = self.beams[b]
            candidates = self._pending[beam.request.request_id]
            token_id = candidates[c][0]
            survivors.append(Survivor(beam, token_id, cum,
                                      BeamStep(token_id, candidates, beam.last_step)))
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
