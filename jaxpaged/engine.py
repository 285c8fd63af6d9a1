"""The engine: requests in, one scheduled step at a time, ``RequestOutput``s out.

``step()`` is the whole loop body: schedule -> run the model -> apply the sampled tokens ->
detokenize and check stop strings -> outputs. With ``EngineConfig.async_scheduling`` a step dispatches its model step before processing the
previous step's results: schedule k -> dispatch k -> fetch k - 1 (done or nearly, while k is queued)
-> apply and detokenize k - 1. So the device never waits for the host; outputs come one step later.
Requests with ``n > 1`` run as ``n`` child sequences
(see ``scheduler``); their outputs are gathered back under the parent's id here.

What the engine keeps per request to build its outputs is in ``request_state``; start-up helpers
(compilation caches, checkpoint dtype) are in ``engine_setup``.
"""

from __future__ import annotations

import logging
import pathlib
import time

import jax
from flax import nnx

from jaxpaged.buckets import BucketLadder
from jaxpaged.config import ModelConfig
from jaxpaged.engine_config import EngineConfig
from jaxpaged.engine_setup import (StartupTimings, enable_compilation_cache,
                                   open_executable_cache, read_json, resolve_dtype)
from jaxpaged.kv_sizing import KVPlan, activation_reserve_bytes, plan_kv_cache
from jaxpaged.model_loader import jax_dtype, load_model
from jaxpaged.outputs import Logprob, RequestMetrics, RequestOutput
from jaxpaged.prompt_logprobs import PromptLogprobsChunk
from jaxpaged.request import Request, RequestStatus
from jaxpaged.request_state import RequestState, SequenceState, prompt_logprob_entries
from jaxpaged.runner import ModelRunner, RunnerOutput, StepHandle, TokenLogprobs
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler, SchedulerConfig
from jaxpaged.scheduler_output import RequestUpdate, SchedulerOutput
from jaxpaged.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        start = time.perf_counter()
        enable_compilation_cache(config.compilation_cache_dir)
        model_dir = pathlib.Path(config.model)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.tokenizer = self._load_tokenizer(model_dir)
        self.generation_config = read_json(model_dir / "generation_config.json")
        self.max_model_len = self._resolve_max_model_len()
        on_cpu = jax.default_backend() == "cpu"
        self.max_num_seqs = config.max_num_seqs or (16 if on_cpu else 256)
        self.max_num_batched_tokens = self._resolve_max_num_batched_tokens()
        dtype = resolve_dtype(config.dtype, model_dir)
        model = load_model(model_dir, dtype=dtype, attn_impl=config.attention_impl,
                           load_format=config.load_format, seed=config.seed)
        jax.block_until_ready(nnx.state(model))
        weights_s = time.perf_counter() - start
        self.kv_plan = self._plan_kv(dtype)
        self.eos_token_id = self._eos_token_id()
        self.scheduler = Scheduler(self._scheduler_config(), self.kv_plan.num_blocks)
        start = time.perf_counter()
        self.runner = ModelRunner(
            model, num_blocks=self.kv_plan.num_blocks, block_size=config.block_size,
            kv_dtype=jax_dtype(dtype), ladder=self._ladder(),
            eos_token_ids=tuple(sorted(self._all_eos_ids())), seed=config.seed,
            penalty_width=self.max_model_len, executable_cache=open_executable_cache())
        jax.block_until_ready(self.runner.kv_cache.k)
        kv_alloc_s = time.perf_counter() - start
        self.startup = StartupTimings(weights_s=weights_s, kv_alloc_s=kv_alloc_s,
                                      compile_s=self.runner.warmup())
        self._requests: dict[str, RequestState] = {}
        # async scheduling: the dispatched step whose results are not applied yet
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        logger.info("KV cache: %d tokens (%d blocks of %d), maximum concurrency %.2fx at "
                    "max_model_len=%d", self.kv_plan.capacity_tokens, self.kv_plan.num_blocks - 1,
                    config.block_size, self.kv_plan.max_concurrency(self.max_model_len),
                    self.max_model_len)
        logger.info("engine ready: weights %.1f s, KV allocation %.1f s, compilation %.1f s "
                    "(%d step shapes; %s)", self.startup.weights_s, self.startup.kv_alloc_s,
                    self.startup.compile_s, len(self.runner.ladder.all_shapes()),
                    self.runner.executable_cache_summary())

    # ----- set-up -----

    def _load_tokenizer(self, model_dir: pathlib.Path):
        c = self.config
        tokenizer_dir = pathlib.Path(c.tokenizer) if c.tokenizer else model_dir
        has_files = any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        if c.skip_tokenizer_init or (c.load_format == "dummy" and not has_files):
            return None  # prompts must then be token ids
        return load_tokenizer(tokenizer_dir)

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        value = self.config.max_model_len or limit
        if value > limit:
            raise ValueError(f"max_model_len={value} exceeds the model's "
                             f"max_position_embeddings={limit}")
        return value

    def _resolve_max_num_batched_tokens(self) -> int:
        c = self.config
        if c.max_num_batched_tokens is not None:
            value = c.max_num_batched_tokens
        else:
            value = max(512 if jax.default_backend() == "cpu" else 8192, self.max_num_seqs)
            if not c.enable_chunked_prefill:
                value = max(value, self.max_model_len)
        if value < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({value}) must be >= max_num_seqs "
                             f"({self.max_num_seqs})")
        if not c.enable_chunked_prefill and value < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({value}) must be "
                             f">= max_model_len ({self.max_model_len})")
        return value

    def _plan_kv(self, dtype: str) -> KVPlan:
        c = self.config
        return plan_kv_cache(
            self.model_config, dtype=jax_dtype(dtype), block_size=c.block_size,
            max_model_len=self.max_model_len, gpu_memory_utilization=c.gpu_memory_utilization,
            activation_bytes=activation_reserve_bytes(self.model_config,
                                                      self.max_num_batched_tokens, self.max_num_seqs),
            kv_cache_memory_bytes=c.kv_cache_memory_bytes,
            num_blocks_override=c.num_gpu_blocks_override)

    def _scheduler_config(self) -> SchedulerConfig:
        c = self.config
        return SchedulerConfig(max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               enable_chunked_prefill=c.enable_chunked_prefill,
                               block_size=c.block_size,
                               enable_prefix_caching=c.enable_prefix_caching,
                               policy=c.scheduling_policy, max_waiting=c.max_waiting,
                               async_scheduling=c.async_scheduling)

    def _ladder(self) -> BucketLadder:
        return BucketLadder.create(max_num_batched_tokens=self.max_num_batched_tokens,
                                   max_num_seqs=self.max_num_seqs,
                                   max_model_len=self.max_model_len,
                                   block_size=self.config.block_size)

    def _eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        ids = self.model_config.eos_token_ids
        return ids[0] if ids else None

    def _all_eos_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        extra = self.generation_config.get("eos_token_id")
        ids.update([extra] if isinstance(extra, int) else extra or [])
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return ids

    # ----- requests -----

    def add_request(self, request_id: str, prompt: str | list[int] | None,
                    params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    priority: int = 0) -> None:
        """Queues a prompt: text, token ids, or both (text reported, ids run, e.g. after a chat
        template). Bad input raises ValueError and queues nothing."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params)!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if prompt_token_ids is not None:
            text, token_ids = prompt, self._tokenize(prompt_token_ids)[1]
        else:
            text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        params = params.clone()
        params.update_from_generation_config(
            {"eos_token_id": sorted(self._all_eos_ids())}, self.eos_token_id)
        arrival = arrival_time if arrival_time is not None else time.time()
        request = Request(request_id=request_id, prompt_token_ids=token_ids,
                          sampling_params=params, arrival_time=arrival, priority=priority,
                          eos_token_id=self.eos_token_id)
        self.scheduler.add_request(request)
        self._requests[request_id] = RequestState(
            request_id, text, token_ids, params, RequestMetrics(arrival_time=arrival),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    def _tokenize(self, prompt: str | list[int] | None) -> tuple[str | None, list[int]]:
        if prompt is None:
            raise ValueError("a prompt (text or prompt_token_ids) is required")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True)")
            return prompt, list(self.tokenizer.encode(prompt))
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.model_config.vocab_size:
                raise ValueError(f"prompt token id {t!r} is not in [0, {self.model_config.vocab_size})")
        return None, token_ids

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; with max_model_len="
                             f"{self.max_model_len} at most {self.max_model_len - 1} fit")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.config.max_logprobs:
                raise ValueError(f"{name}={value} exceeds max_logprobs={self.config.max_logprobs}")
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are not in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True)")

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Safe while a step is in flight: its results for aborted requests are dropped."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.scheduler.abort_request(request_id)
            self._requests.pop(request_id, None)
        self._drop_idle_in_flight()

    def _drop_idle_in_flight(self) -> None:
        """A step in flight whose requests are all gone has nothing left to report: forget it
        (the device finishes it unobserved), so the engine is idle at once."""
        if self._in_flight is not None and not self.scheduler.requests:
            self._in_flight = None

    def has_unfinished_requests(self) -> bool:
        """Also true while a step is in flight (async scheduling): it must still be applied."""
        return bool(self._requests) or self._in_flight is not None

    def kv_slot_usage(self) -> tuple[int, int]:
        """(slots allocated to running sequences, slots they fill): KV waste is 1 - used/allocated."""
        manager = self.scheduler.block_manager
        running = self.scheduler.running
        allocated = sum(len(manager.get_block_ids(r.request_id)) for r in running)
        return allocated * self.config.block_size, sum(r.num_computed_tokens for r in running)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ----- the loop -----

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of the requests that progressed in it (with async
        scheduling: of the previous step, whose results arrive one step late)."""
        if self.config.async_scheduling:
            return self._step_async()
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        self._mark_scheduled(scheduler_output)
        outputs = self._apply(scheduler_output, self.runner.execute(scheduler_output))
        self.runner.timings.steps += 1
        self.runner.timings.total_s += time.perf_counter() - start
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        """Schedule and dispatch step k, then apply step k - 1 while k runs on the device.

        A step whose rows use penalties needs the real output ids on the host, so the step in
        flight is applied first (a synchronous step)."""
        start = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        try:
            scheduler_output = self.scheduler.schedule()
            outputs: list[RequestOutput] = []
            if not scheduler_output.is_empty:
                self._mark_scheduled(scheduler_output)
                if previous is not None and _uses_penalties(scheduler_output):
                    outputs += self._apply(previous[0], self.runner.fetch(previous[1]))
                    previous = None
                self._in_flight = (scheduler_output, self.runner.dispatch(scheduler_output))
            if previous is not None:
                outputs += self._apply(previous[0], self.runner.fetch(previous[1]))
            elif scheduler_output.is_empty:
                return outputs
        except Exception:
            self._forget_placeholders()
            raise
        self._drop_idle_in_flight()
        self.runner.timings.steps += 1
        self.runner.timings.total_s += time.perf_counter() - start
        return outputs

    def _forget_placeholders(self) -> None:
        """After a failed async step no in-flight results will come: requests waiting to be
        recomputed drop their placeholders (and resample those tokens); running ones are aborted
        by the caller's recovery (server/recovery.py)."""
        self._in_flight = None
        for request in self.scheduler.waiting:
            request.num_output_placeholders = 0

    def _mark_scheduled(self, scheduler_output: SchedulerOutput) -> None:
        now = time.time()
        for s in scheduler_output.scheduled:
            if s.num_computed_tokens:  # scheduled before (its first step starts at token 0)
                continue
            state = self._requests.get(_parent_id(s.req_id, self.scheduler))
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now
                state.metrics.time_in_queue = now - state.metrics.arrival_time

    def _apply(self, scheduler_output: SchedulerOutput,
               runner_output: RunnerOutput) -> list[RequestOutput]:
        """The step's results into the scheduler (append, stops) and the requests' outputs."""
        self._collect_prompt_logprobs(runner_output.prompt_logprobs)  # before finished ones go
        updates = self.scheduler.update_from_output(scheduler_output,
                                                    runner_output.sampled_token_ids)
        return self._process(updates, runner_output.logprobs)

    def _process(self, updates: list[RequestUpdate],
                 logprobs: dict[str, TokenLogprobs]) -> list[RequestOutput]:
        """Runs once per step for every request that got tokens: keep it lean (at batch 256 it
        is a large part of a step's host time)."""
        now = time.time()
        # request id -> (state, indices of its sequences that changed; None: n == 1)
        touched: dict[str, tuple[RequestState, set[int] | None]] = {}
        requests = self._requests
        for update in updates:
            request = update.request
            parent_id = request.parent_id
            state = requests.get(parent_id or request.request_id)
            if state is None:
                continue
            index = request.sample_index
            seq = state.sequences.get(index)
            if seq is None:
                seq = state.sequences[index] = SequenceState.for_request(
                    request, state.prompt_token_ids, self.tokenizer)
            self._append(state, seq, request, update,
                         logprobs.get(request.request_id) if logprobs else None)
            metrics = state.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            if parent_id is None:
                touched[state.request_id] = (state, None)
            else:
                touched.setdefault(state.request_id, (state, set()))[1].add(index)
        outputs = []
        for state, changed in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                del requests[state.request_id]
            output = state.output(changed)
            if output is not None:
                outputs.append(output)
        return outputs

    def _collect_prompt_logprobs(self, chunks: dict[str, PromptLogprobsChunk]) -> None:
        for req_id, chunk in chunks.items():
            state = self._requests.get(_parent_id(req_id, self.scheduler))
            if state is not None:
                state.add_prompt_logprobs(chunk.first_index,
                                          prompt_logprob_entries(chunk, self.tokenizer))

    def _append(self, state: RequestState, seq: SequenceState, request: Request,
                update: RequestUpdate, token_logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.extend(update.new_token_ids)
        if seq.logprobs is not None and token_logprobs is not None and update.new_token_ids:
            token = update.new_token_ids[-1]
            entry = {t: Logprob(v, rank=i + 1) for i, (t, v) in enumerate(token_logprobs.top.items())}
            entry[token] = Logprob(token_logprobs.sampled_logprob, rank=token_logprobs.sampled_rank)
            seq.logprobs.append(entry)
            seq.cumulative_logprob += token_logprobs.sampled_logprob
        stop_string = seq.detokenizer.update(update.new_token_ids) if seq.detokenizer else None
        if stop_string is not None and not request.is_finished():
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED,
                                          stop_string)
        was_finished = seq.finish_reason is not None
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        elif request.is_finished():
            seq.finish_reason = request.get_finished_reason()
            seq.stop_reason = request.stop_reason
        if not was_finished and seq.finish_reason is not None:
            state.num_finished += 1


def _uses_penalties(scheduler_output: SchedulerOutput) -> bool:
    """Whether a sampled row needs its real output ids (presence/frequency/repetition)."""
    for s in scheduler_output.scheduled:
        p = s.sampling_params
        if s.do_sample and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                            or p.repetition_penalty != 1.0):
            return True
    return False


def _parent_id(req_id: str, scheduler: Scheduler) -> str:
    request = scheduler.requests.get(req_id)
    return request.parent_id or req_id if request is not None else req_id
