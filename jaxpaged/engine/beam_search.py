"""The engine's side of beam search: groups in, candidates from each step, forks, results out.

A beam search request enters the scheduler as one ordinary request (its first beam) that asks
for ``2 * beam_width`` logprobs with ``ignore_eos`` (the group, not the scheduler, decides when
beams end). Its rows never reach ``Scheduler.update_from_output``: ``take_rows`` records each
beam's candidates instead of appending the sampled token, and once every live beam of a group has
proposed, runs the selection (``select_groups``: every complete group of the step at once), forks
the sequences (``beam_fork.fork_beams``) and has the partly filled blocks copied on the device
(one call per step). A beam whose candidates are pending is not scheduled (it has no token to
compute), so the beams of a group advance in lockstep. A preempted beam takes its whole group
with it (``Scheduler._preempt``): the group is recomputed as a whole, and proposes again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from jaxpaged.core.beam_candidates import GroupSelection
from jaxpaged.core.beam_fork import BlockCopy, fork_beams
from jaxpaged.core.beam_group import BeamGroup, BeamGroupConfig, FinishedBeam, Survivor
from jaxpaged.core.request import Request, RequestStatus
from jaxpaged.core.scheduler import Scheduler
from jaxpaged.core.scheduler_output import SchedulerOutput
from jaxpaged.engine.beam_selection import StepCandidates, select_groups
from jaxpaged.engine.tokenizer import TokenTexts
from jaxpaged.outputs import BeamSearchOutput, BeamSearchSequence, Logprob
from jaxpaged.runner.step_logprobs import StepLogprobs
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams
from jaxpaged.utils.host_phase import host_phase


def beam_step_params(params: BeamSearchParams) -> SamplingParams:
    """What each beam's step samples with: the candidates as logprobs, EOS left to the group."""
    return SamplingParams(temperature=params.temperature, logprobs=2 * params.beam_width,
                          max_tokens=params.max_tokens, ignore_eos=True, detokenize=False)


# The sampler switches of beam steps (top-N logprobs up to the first logprobs bucket, beam widths
# up to 10; greedy, and sampled as the server's default temperature), compiled at warm-up.
BEAM_WARMUP_SAMPLING = (SamplingParams(temperature=0.0, logprobs=1),
                        SamplingParams(temperature=1.0, logprobs=1))


@dataclasses.dataclass(frozen=True)
class _GroupInfo:
    group: BeamGroup
    params: BeamSearchParams


class BeamSearchRunner:
    """The live beam groups of an engine. ``copy_blocks`` runs a step's block copies on the
    device (one batch per step); ``token_texts`` decodes the candidates' texts (shared with the
    engine's other outputs: each id is decoded once)."""

    def __init__(self, scheduler: Scheduler, copy_blocks: Callable[[list[BlockCopy]], None],
                 tokenizer, token_texts: TokenTexts) -> None:
        self.scheduler = scheduler
        self.copy_blocks = copy_blocks
        self.tokenizer = tokenizer
        self.token_texts = token_texts
        self.groups: dict[str, _GroupInfo] = {}  # group id -> its group
        self._group_of: dict[str, str] = {}  # live beam request id -> group id
        self.finished: dict[str, BeamSearchOutput] = {}  # group id -> result, until taken
        # groups ended whose results are not built yet: (group id, group, its best beams)
        self._unbuilt: list[tuple[str, _GroupInfo, list[FinishedBeam]]] = []

    def add(self, request: Request, params: BeamSearchParams) -> None:
        """``request``: the group's first beam, with ``beam_step_params(params)``."""
        config = self.scheduler.config
        if params.beam_width > config.max_num_seqs:
            raise ValueError(f"beam_width={params.beam_width} is larger than max_num_seqs="
                             f"{config.max_num_seqs}")
        total = request.num_prompt_tokens + params.max_tokens
        if total > config.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} with a {request.num_prompt_tokens}"
                             f"-token prompt exceeds max_model_len={config.max_model_len}")
        manager = self.scheduler.block_manager
        need = params.beam_width * manager.num_blocks_for(total)
        if need > manager.num_blocks - 1:
            raise ValueError(f"beam_width={params.beam_width} beams of {total} tokens need "
                             f"{need} KV blocks; the pool has {manager.num_blocks - 1}")
        group = BeamGroup(request.request_id, BeamGroupConfig(
            params.beam_width, params.max_tokens, params.ignore_eos, params.length_penalty,
            request.eos_token_id), request)
        request.beam_seats = params.beam_width
        request.beam_group_id = request.request_id
        self.scheduler.add_request(request)
        self.groups[request.request_id] = _GroupInfo(group, params)
        self._group_of[request.request_id] = request.request_id

    def abort(self, group_id: str) -> bool:
        info = self.groups.pop(group_id, None)
        if info is None:
            return False
        for beam_id in info.group.beam_ids():
            self._group_of.pop(beam_id, None)
            self.scheduler.abort_request(beam_id)
        return True

    def after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        """Beams take no output placeholder (their next token is chosen on the host), and a
        preempted beam proposes again once recomputed."""
        if not self.groups:
            return
        group_of, requests = self._group_of, self.scheduler.requests
        for scheduled in scheduler_output.scheduled:
            if scheduled.req_id in group_of:
                requests[scheduled.req_id].num_output_placeholders = 0
        for req_id in scheduler_output.preempted_req_ids:
            self._drop_candidates(req_id)

    def take_rows(self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, int],
                  logprobs: Mapping[str, object]) -> SchedulerOutput:
        """Handles the step's beam rows; returns the step without them (for the scheduler)."""
        if not self.groups:
            return scheduler_output
        group_of, requests = self._group_of, self.scheduler.requests
        tables, cache_full_blocks = (self.scheduler.block_manager.tables,
                                     self.scheduler.block_manager.cache_full_blocks)
        running, groups = RequestStatus.RUNNING, self.groups
        kept, beam_rows = [], []  # beam_rows: (beam id, its group)
        for scheduled in scheduler_output.scheduled:
            req_id = scheduled.req_id
            group_id = group_of.get(req_id)
            if group_id is None:
                kept.append(scheduled)
                continue
            request = requests.get(req_id)
            if request is None or request.status != running:
                continue
            table = tables.get(req_id)
            if table is not None and request.num_computed_tokens >= table.cache_from:
                cache_full_blocks(request)
            if scheduled.do_sample:
                beam_rows.append((req_id, groups[group_id]))
        if beam_rows:
            with host_phase("beams"):
                self._propose(beam_rows, sampled_token_ids, logprobs)
        return dataclasses.replace(scheduler_output, scheduled=kept)

    def _propose(self, beam_rows: list[tuple[str, _GroupInfo]], sampled_token_ids: dict[str, int],
                 logprobs: Mapping[str, object]) -> None:
        """The beams' candidates into their groups; the groups that are complete advance (one
        selection for all of them, their block copies in one device call)."""
        if not isinstance(logprobs, StepLogprobs):
            raise TypeError("beam rows need the step's logprobs as StepLogprobs")
        arrays, row_of = logprobs.arrays, logprobs.rows
        ids = [beam_id for beam_id, _ in beam_rows]
        rows = np.fromiter([row_of[i][0] for i in ids], np.intp, len(ids))  # [R]
        candidates = StepCandidates.from_sampler(
            arrays.top_ids[rows], arrays.top_logprobs[rows],
            np.fromiter([sampled_token_ids[i] for i in ids], np.int64, len(ids)),
            arrays.sampled_logprob[rows], arrays.sampled_rank[rows],
            np.fromiter([2 * info.params.beam_width for _, info in beam_rows], np.int64,
                        len(ids)))
        touched: dict[str, _GroupInfo] = {}  # a group's beams are usually consecutive rows
        last = None
        for r, (beam_id, info) in enumerate(beam_rows):
            info.group.add_candidates(beam_id, candidates, r)
            if info is not last:
                touched[info.group.group_id] = last = info
        ready = [(group_id, info) for group_id, info in touched.items() if info.group.ready()]
        if not ready:
            return
        selections = _select([info.group for _, info in ready])
        copies: list[BlockCopy] = []
        for (group_id, info), selection in zip(ready, selections):
            copies += self._advance(group_id, info, info.group.apply(selection))
        if copies:  # every group's copies of this step in one device call
            self.copy_blocks(_last_copy_per_destination(copies))

    def _advance(self, group_id: str, info: _GroupInfo,
                 survivors: list[Survivor]) -> list[BlockCopy]:
        """The group's selection applied; returns the block copies its forks need."""
        group = info.group
        if group.done:
            self._finish(group_id, info, group.finish(survivors))
            return []
        fork = fork_beams(self.scheduler, group, survivors)
        for req_id in fork.removed_ids:
            self._group_of.pop(req_id, None)
        for req_id in fork.added_ids:
            self._group_of[req_id] = group_id
        for req_id in fork.preempted:
            self._drop_candidates(req_id)
        return fork.copies

    def _drop_candidates(self, req_id: str) -> None:
        group_id = self._group_of.get(req_id)
        if group_id is not None:
            self.groups[group_id].group.drop_candidates(req_id)

    def _finish(self, group_id: str, info: _GroupInfo, best: list[FinishedBeam]) -> None:
        for beam_id in info.group.beam_ids():
            self._group_of.pop(beam_id, None)
            request = self.scheduler.requests.get(beam_id)
            if request is not None:
                self.scheduler._finish(request, RequestStatus.FINISHED_STOPPED, None)
        del self.groups[group_id]
        self._unbuilt.append((group_id, info, best))

    def take_finished(self) -> dict[str, BeamSearchOutput]:
        """Results of the groups finished since the last call, by group id. A result (texts,
        every step's candidates as logprobs) is built here, not when its group ends: the engine
        step that ends a group has dispatched the next step by the time its caller asks."""
        for group_id, info, best in self._unbuilt:
            prompt_len = info.group.beams[0].request.num_prompt_tokens
            entries: dict[int, dict[int, Logprob]] = {}  # shared by the beams' paths
            self.finished[group_id] = BeamSearchOutput(
                [self._sequence(f, prompt_len, info.params, entries) for f in best])
        self._unbuilt = []
        finished, self.finished = self.finished, {}
        return finished

    def _sequence(self, beam: FinishedBeam, prompt_len: int, params: BeamSearchParams,
                  entries: dict[int, dict[int, Logprob]]) -> BeamSearchSequence:
        """``entries``: id of a ``BeamStep`` -> its logprobs entry, for the steps of the group's
        beams made so far (beams share the steps of their common ancestors; their ``Logprob``
        objects are shared too, as vLLM's beam search shares a common prefix's entries)."""
        path = beam.last_step.path() if beam.last_step else []
        new = [step for step in path if id(step) not in entries]
        candidates = [step.candidates for step in new]
        texts = self.token_texts.texts(
            token_id for step in candidates for token_id, _, _ in step)
        for step, step_candidates in zip(new, candidates):
            entries[id(step)] = {token_id: Logprob(logprob, rank, texts[token_id])
                                 for token_id, logprob, rank in step_candidates}
        logprobs = [dict(entries[id(step)]) for step in path]
        generated = beam.tokens[prompt_len:]
        if beam.finished_by_eos and not params.include_stop_str_in_output:
            generated = generated[:-1]
        text = self.tokenizer.decode(generated) if self.tokenizer is not None else None
        eos = beam.tokens[-1] if beam.finished_by_eos else None
        return BeamSearchSequence(list(beam.tokens), logprobs, beam.cum_logprob, text,
                                  "stop" if beam.finished_by_eos else "length", eos)


def _select(groups: list[BeamGroup]) -> list[GroupSelection]:
    """``select_groups`` over groups whose candidates are usually rows of one step's arrays
    (beams recomputed after a preemption may have proposed in earlier steps: then the rows are
    stacked first). Runs every step: one pass over the beams builds flat lists, which become the
    [G, B] matrices in one numpy call when every group has the same number of beams."""
    pending = [group.pending() for group in groups]
    flat = [entry for beams in pending for entry in beams]  # (source, row) of every beam
    first = flat[0][0]
    if all([source is first for source, _ in flat]):
        candidates = first
        flat_rows = [row for _, row in flat]
    else:  # stack every source once; a row's index is its source's offset plus its row
        sources = {id(source): source for source, _ in flat}
        candidates = StepCandidates.concatenate(list(sources.values()))
        offsets = np.cumsum([0] + [s.token_ids.shape[0] for s in sources.values()]).tolist()
        index = dict(zip(sources, offsets))
        flat_rows = [index[id(source)] + row for source, row in flat]
    flat_cums = [beam.cum_logprob for group in groups for beam in group.beams]
    counts = [len(beams) for beams in pending]
    width = max(counts)
    if min(counts) == width:
        rows = np.array(flat_rows, np.int64).reshape(len(groups), width)  # [G, B]
        cum = np.array(flat_cums, np.float64).reshape(len(groups), width)  # [G, B]
    else:
        rows = np.full((len(groups), width), -1, np.int64)  # [G, B]
        cum = np.zeros((len(groups), width), np.float64)  # [G, B]
        start = 0
        for g, count in enumerate(counts):
            rows[g, :count] = flat_rows[start:start + count]
            cum[g, :count] = flat_cums[start:start + count]
            start += count
    return select_groups(candidates, rows, cum, [group.rule() for group in groups])


def _last_copy_per_destination(copies: list[BlockCopy]) -> list[BlockCopy]:
    """One copy per destination block, the last one listed: a group's fork may preempt an
    earlier group of the step, whose copy destination is then freed and handed out again; run one
    by one, the later copy would overwrite it (a batched copy's order among equal destinations is
    undefined)."""
    return [(src, dst) for dst, src in {dst: src for src, dst in copies}.items()]
