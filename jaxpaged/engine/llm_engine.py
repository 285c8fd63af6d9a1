"""The engine: requests in, one scheduled step at a time, ``RequestOutput``s out.

``step()`` is the whole loop body: schedule -> run the model -> apply the sampled tokens ->
detokenize and check stop strings -> outputs. With ``EngineConfig.async_scheduling`` a step
dispatches its model step before processing the previous step's results: schedule k -> dispatch
k -> fetch k - 1 (done or nearly, while k is queued) -> apply and detokenize k - 1. So the device
never waits for the host; outputs come one step later. While beam search groups are live a beam's
next token is chosen on the host from step k - 1's candidates, so their rows of k - 1 are applied
before k is scheduled (``_step_beams``); only the rest overlaps the device.

The engine keeps the loop and delegates the rest: ``InputProcessor`` (tokenize, validate, build
the request), ``OutputProcessor`` (append, detokenize, build outputs), ``setup`` (every default
resolved against the model and the backend). It also owns its failure path: ``recover`` puts the
engine back in working order after ``step()`` raised.
"""

from __future__ import annotations

import concurrent.futures
import logging
import pathlib
import time
from typing import Any

import jax
from flax import nnx

from jaxpaged.config import EngineConfig
from jaxpaged.converters.gguf_model import resolve_model_path
from jaxpaged.converters.kv_scales import KVScales
from jaxpaged.converters.quant_config import resolve_quantization
from jaxpaged.core.request import Request, RequestStatus
from jaxpaged.core.scheduler import Scheduler
from jaxpaged.core.scheduler_output import RequestUpdate, ScheduledRequest, SchedulerOutput
from jaxpaged.engine import setup
from jaxpaged.engine.beam_search import (BEAM_WARMUP_SAMPLING, BeamSearchRunner,
                                         beam_step_params)
from jaxpaged.engine.faults import RequestFault, StepHook
from jaxpaged.engine.generation_defaults import diff_sampling_param, generation_config_dir
from jaxpaged.engine.input_processor import InputLimits, InputProcessor
from jaxpaged.engine.output_processor import OutputProcessor
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.loader import load_model
from jaxpaged.outputs import BeamSearchOutput, RequestOutput
from jaxpaged.runner.block_copy import BlockCopier
from jaxpaged.models.tensor_parallel import TensorParallel
from jaxpaged.runner.kv_calibration import calibrate_kv_scales, calibration_token_ids
from jaxpaged.runner.kv_sizing import KVPlan
from jaxpaged.runner.model_runner import ModelRunner, RunnerOutput, StepHandle
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams
from jaxpaged.structured.manager import GrammarState, StructuredOutputManager
from jaxpaged.utils.host_phase import host_phase

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, step_hook: StepHook | None = None):
        """``step_hook``: called with every step's ``SchedulerOutput`` before the model step
        (``faults.py``: the documented fault-injection point of tests)."""
        self.config = config
        self._step_hook = step_hook
        self._failed_step: SchedulerOutput | None = None  # the step being run, until it ends
        start = time.perf_counter()
        setup.enable_compilation_cache(config.compilation_cache_dir)
        model_dir = resolve_model_path(config.model)  # a .gguf file: its side files
        self.model_config = ModelConfig.from_dir(model_dir)
        self.tokenizer = setup.load_engine_tokenizer(config, model_dir)
        self.generation_config = setup.read_json(
            generation_config_dir(config.generation_config, model_dir) / "generation_config.json")
        self._default_sampling_values = diff_sampling_param(
            config.generation_config, self.generation_config, config.override_generation_config)
        default_params = self.get_default_sampling_params()  # bad defaults fail at start-up
        self.limits = setup.resolve_limits(config, self.model_config,
                                           on_cpu=jax.default_backend() == "cpu")
        dtype = setup.resolve_dtype(config.dtype, model_dir)
        self.kv_dtype = setup.kv_pool_dtype(config, dtype)  # refused before the weights load
        # None on one device; an impossible split is refused before the weights load
        self.tensor_parallel = TensorParallel.create(config.tensor_parallel_size)
        if self.tensor_parallel is not None:
            self.tensor_parallel.check(self.model_config)
        self.quant, checkpoint_quantized = resolve_quantization(
            config.quantization, model_dir, kernel=config.quant_matmul_kernel,
            dummy=config.load_format == "dummy")
        model = load_model(model_dir, dtype=dtype, attn_impl=config.attention_impl,
                           load_format=config.load_format, seed=config.seed, quant=self.quant,
                           checkpoint_quantized=checkpoint_quantized,
                           tensor_parallel=self.tensor_parallel)
        jax.block_until_ready(nnx.state(model))
        weights_s = time.perf_counter() - start
        self.kv_plan = setup.plan_kv(config, self.model_config, self.limits, self.kv_dtype,
                                     self.tensor_parallel)
        self.limits = setup.fit_limits_to_pool(config, self.limits, self.kv_plan)
        self.eos_token_id, all_eos_ids = setup.eos_token_ids(
            self.model_config, self.generation_config, self.tokenizer)
        self._all_eos_ids = all_eos_ids
        # structured outputs: made with the first request that has a constraint
        self.structured: StructuredOutputManager | None = None
        # requests whose grammar compiles (off the step loop), by id: they enter the scheduler
        # once it is ready (``_admit_compiled``)
        self._awaiting_grammar: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        self.scheduler = Scheduler(setup.scheduler_config(config, self.limits),
                                   self.kv_plan.num_blocks)
        self.input_processor = InputProcessor(self.tokenizer, InputLimits(
            vocab_size=self.model_config.vocab_size, max_model_len=self.max_model_len,
            max_logprobs=config.max_logprobs, eos_token_id=self.eos_token_id,
            all_eos_token_ids=all_eos_ids), default_params)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        start = time.perf_counter()
        self.kv_scales = self._kv_scales(model, model_dir)
        self.runner = ModelRunner(
            model, num_blocks=self.kv_plan.num_blocks, block_size=config.block_size,
            kv_dtype=self.kv_dtype, kv_scales=self.kv_scales,
            ladder=setup.bucket_ladder(config, self.limits), eos_token_ids=all_eos_ids,
            seed=config.seed, penalty_width=self.max_model_len,
            executable_cache=setup.open_executable_cache())
        jax.block_until_ready(self.runner.kv_cache.k)
        kv_alloc_s = time.perf_counter() - start
        self.compiles_at_start = setup.compiles_at_start(config)
        compile_s = (self.runner.warmup(extra_sampling=BEAM_WARMUP_SAMPLING)
                     if self.compiles_at_start else 0.0)
        start = time.perf_counter()
        self._block_copier = BlockCopier(max_pairs=self.max_num_seqs)
        if self.compiles_at_start:
            self._block_copier.warmup(self.runner.kv_cache)
        self.startup = setup.StartupTimings(weights_s=weights_s, kv_alloc_s=kv_alloc_s,
                                            compile_s=compile_s + time.perf_counter() - start)
        self.beam_search = BeamSearchRunner(self.scheduler, self._copy_blocks, self.tokenizer,
                                            self.output_processor.token_texts)
        # async scheduling: the dispatched step whose results are not applied yet
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self._log_ready()

    def _kv_scales(self, model, model_dir: pathlib.Path) -> KVScales | None:
        """fp8 pools: calibrated (``calculate_kv_scales``) or the checkpoint's; None: 1.0."""
        if not self.config.calculate_kv_scales:
            return setup.checkpoint_kv_scales(self.config, model_dir, self.model_config,
                                              self.kv_dtype)
        token_ids = calibration_token_ids(self.tokenizer, self.model_config.vocab_size,
                                          self.max_model_len - 1)
        return calibrate_kv_scales(model, token_ids, block_size=self.config.block_size)

    def _log_ready(self) -> None:
        plan = self.kv_plan
        if self._default_sampling_values:
            logger.info("default sampling parameters from the generation config: %s (requests "
                        "without SamplingParams use them; generation_config='vllm' turns them "
                        "off)", self._default_sampling_values)
        logger.info("KV cache: %d tokens (%d blocks of %d), maximum concurrency %.2fx at "
                    "max_model_len=%d; %s pool%s, %s", plan.capacity_tokens, plan.num_blocks - 1,
                    self.config.block_size, plan.max_concurrency(self.max_model_len),
                    self.max_model_len, self.kv_dtype.name,
                    " with calibrated scales" if self.config.calculate_kv_scales else "",
                    _pool_size_text(plan))
        shapes = len(self.runner.ladder.all_shapes())
        if not self.compiles_at_start:
            logger.info("engine ready: weights %.1f s, KV allocation %.1f s; %d step shapes "
                        "compile on first use (compile_step_shapes=%r)", self.startup.weights_s,
                        self.startup.kv_alloc_s, shapes, self.config.compile_step_shapes)
            return
        logger.info("engine ready: weights %.1f s, KV allocation %.1f s, compilation %.1f s "
                    "(%d step shapes; %s)", self.startup.weights_s, self.startup.kv_alloc_s,
                    self.startup.compile_s, shapes, self.runner.executable_cache_summary())

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.limits.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.limits.max_num_batched_tokens

    # ----- requests -----

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """The default sampling values of the model's generation config (vLLM's
        ``ModelConfig.get_diff_sampling_param``: SamplingParams field names, only the fields the
        config sets; {} with ``generation_config="vllm"``). A server fills the fields a request
        omitted from these; a request given its own SamplingParams is never changed."""
        return dict(self._default_sampling_values)

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without SamplingParams gets: the defaults over vLLM's own."""
        try:
            return SamplingParams(**self._default_sampling_values)
        except ValueError as e:
            raise ValueError(f"the generation config's sampling defaults "
                             f"{self._default_sampling_values} are invalid: {e}") from None

    def add_request(self, request_id: str, prompt: str | list[int] | None,
                    params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    priority: int = 0, cache_salt: str | None = None) -> None:
        """Queues a prompt: text, token ids, or both (text reported, ids run, e.g. after a chat
        template). ``cache_salt`` (vLLM's): only requests with the same salt share prefix-cache
        blocks. Bad input raises ValueError and queues nothing."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request, state = self.input_processor.process(
            request_id, prompt, params, prompt_token_ids=prompt_token_ids,
            arrival_time=arrival_time, priority=priority, cache_salt=cache_salt)
        constraint = request.sampling_params.structured_outputs
        if constraint is not None:
            future = self._structured_outputs().submit(constraint)  # ValueError: invalid
            if not future.done():  # compiles in the grammar threads; the request waits here
                self._awaiting_grammar[request_id] = (request, future)
                self.output_processor.add(state)
                return
            future.result()  # a cached grammar that failed to compile raises now
        self.scheduler.add_request(request)
        self.output_processor.add(state)

    def _structured_outputs(self) -> StructuredOutputManager:
        if self.structured is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs a tokenizer (the engine runs without "
                                 "one)")
            self.structured = StructuredOutputManager(
                self.tokenizer, self.model_config.vocab_size, self._all_eos_ids)
        return self.structured

    def _admit_compiled(self) -> None:
        """Requests whose grammar is compiled enter the scheduler; with nothing else to run,
        waits for the first grammar. A grammar that failed to compile (it was validated when the
        request was added, so only resource limits) aborts its request."""
        if not self._awaiting_grammar:
            return
        if not self.scheduler.requests and self._in_flight is None:
            concurrent.futures.wait([f for _, f in self._awaiting_grammar.values()],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for request_id, (request, future) in list(self._awaiting_grammar.items()):
            if not future.done():
                continue
            del self._awaiting_grammar[request_id]
            error = future.exception()
            if error is None:
                try:
                    self.scheduler.add_request(request)
                    continue
                except ValueError as e:
                    error = e
            logger.error("request %r aborted: %s", request_id, error)
            self.output_processor.requests.pop(request_id, None)

    def add_beam_search(self, request_id: str, prompt: str | list[int] | None,
                        params: BeamSearchParams, *, prompt_token_ids: list[int] | None = None,
                        priority: int = 0, cache_salt: str | None = None) -> None:
        """Queues a beam search (``jaxpaged.engine.beam_search``); its result comes from
        ``take_beam_search_outputs`` once the group ends."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params)!r}")
        if request_id in self.output_processor.requests or request_id in self.beam_search.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request, _ = self.input_processor.process(
            request_id, prompt, beam_step_params(params), prompt_token_ids=prompt_token_ids,
            priority=priority, cache_salt=cache_salt)
        self.beam_search.add(request, params)

    def take_beam_search_outputs(self) -> dict[str, BeamSearchOutput]:
        """Results of the beam searches finished since the last call, by request id."""
        return self.beam_search.take_finished()

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.runner.kv_cache = self._block_copier(self.runner.kv_cache, copies)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Safe while a step is in flight: its results for aborted requests are dropped. Many
        ids are aborted in one batch (one pass over the waiting queue)."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        ids = [i for i in ids if not self.beam_search.abort(i)]  # beam groups end themselves
        for request in self.scheduler.abort_requests(ids):
            if self.structured is not None:
                self.structured.free(request.request_id)
        for request_id in ids:
            self._awaiting_grammar.pop(request_id, None)
            self.output_processor.requests.pop(request_id, None)
        self._drop_idle_in_flight()

    def _drop_idle_in_flight(self) -> None:
        """A step in flight whose requests are all gone has nothing left to report: forget it
        (the device finishes it unobserved), so the engine is idle at once."""
        if self._in_flight is not None and not self.scheduler.requests:
            self._in_flight = None

    def has_unfinished_requests(self) -> bool:
        """Also true while a step is in flight (async scheduling): it must still be applied."""
        return (bool(self.output_processor.requests) or self._in_flight is not None
                or bool(self.beam_search.groups))

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    def kv_slot_usage(self) -> tuple[int, int]:
        """(slots allocated to running sequences, slots they fill): KV waste is 1 - used/allocated."""
        manager = self.scheduler.block_manager
        running = self.scheduler.running
        allocated = sum(len(manager.get_block_ids(r.request_id)) for r in running)
        return allocated * self.config.block_size, sum(r.num_computed_tokens for r in running)

    # ----- the loop -----

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of the requests that progressed in it (with async
        scheduling: of the previous step, whose results arrive one step late)."""
        with host_phase("step"):
            return self._step()

    def _step(self) -> list[RequestOutput]:
        self._admit_compiled()
        if self.config.async_scheduling:
            return self._step_beams() if self.beam_search.groups else self._step_async()
        # without async scheduling every step is applied before the next is scheduled
        outputs = []
        if self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            outputs = self._apply(previous[0], self.runner.fetch(previous[1]))
        start = time.perf_counter()
        with host_phase("schedule"):
            scheduler_output = self.scheduler.schedule()
            self.beam_search.after_schedule(scheduler_output)
        if scheduler_output.is_empty:
            return outputs
        self.output_processor.mark_scheduled(scheduler_output)
        self._failed_step = scheduler_output
        self._run_hook(scheduler_output)
        bitmask = (self.structured.bitmask
                   if self.structured is not None and _has_grammar(scheduler_output) else None)
        outputs += self._apply(scheduler_output,
                               self.runner.execute(scheduler_output, bitmask) if bitmask
                               else self.runner.execute(scheduler_output))
        self._failed_step = None
        self._count_step(start)
        return outputs

    def _run_hook(self, scheduler_output: SchedulerOutput) -> None:
        if self._step_hook is not None:
            self._step_hook(scheduler_output)

    def _step_async(self) -> list[RequestOutput]:
        """Schedule and dispatch step k, then apply step k - 1 while k runs on the device.

        A step whose rows use penalties needs the real output ids on the host, so the step in
        flight is applied first (a synchronous step). A step with structured-outputs rows needs
        them for its grammar bitmask: the step in flight is applied after this step's model is
        queued, before its sampler (the host works while the device runs the model)."""
        start = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        try:
            with host_phase("schedule"):
                scheduler_output = self.scheduler.schedule()
            outputs: list[RequestOutput] = []
            self._failed_step = scheduler_output
            if not scheduler_output.is_empty:
                self.output_processor.mark_scheduled(scheduler_output)
                self._run_hook(scheduler_output)
                if previous is not None and _uses_penalties(scheduler_output):
                    outputs += self._apply(previous[0], self.runner.fetch(previous[1]))
                    previous = None
                bitmask = None
                if self.structured is not None and _has_grammar(scheduler_output):
                    def bitmask(requests: list[ScheduledRequest], pad_to: int):
                        nonlocal previous
                        if previous is not None:  # the grammars must see its tokens first
                            outputs.extend(self._apply(previous[0],
                                                       self.runner.fetch(previous[1])))
                            previous = None
                        return self.structured.bitmask(requests, pad_to)
                self._in_flight = (scheduler_output,
                                   self.runner.dispatch(scheduler_output, bitmask) if bitmask
                                   else self.runner.dispatch(scheduler_output))
            if previous is not None:
                outputs += self._apply(previous[0], self.runner.fetch(previous[1]))
            elif scheduler_output.is_empty:
                return outputs
        except Exception:
            self._forget_placeholders()
            raise
        self._failed_step = None
        self._drop_idle_in_flight()
        self._count_step(start)
        return outputs

    def _step_beams(self) -> list[RequestOutput]:
        """Async scheduling while beam groups are live: apply the beam rows of step k - 1 (a
        beam's next token is chosen on the host from its candidates), schedule and dispatch step
        k, then apply the rest of step k - 1 (other requests' tokens and outputs) while k runs on
        the device. A beam's candidates are never guessed: only the host work that does not
        decide step k's tokens overlaps the device.

        As in ``_step_async``, a step whose rows use penalties or grammars applies all of step
        k - 1 before it is dispatched (they read the real output ids)."""
        start = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        outputs: list[RequestOutput] = []
        rest: tuple[SchedulerOutput, RunnerOutput] | None = None
        try:
            arrived = None
            if previous is not None:
                runner_output = self.runner.fetch(previous[1])
                arrived = time.perf_counter()
                rest = (self.beam_search.take_rows(previous[0], runner_output.sampled_token_ids,
                                                   runner_output.logprobs), runner_output)
            with host_phase("schedule"):
                scheduler_output = self.scheduler.schedule()
                self.beam_search.after_schedule(scheduler_output)
            self._failed_step = scheduler_output
            if not scheduler_output.is_empty:
                self.output_processor.mark_scheduled(scheduler_output)
                self._run_hook(scheduler_output)
                grammar = self.structured is not None and _has_grammar(scheduler_output)
                if rest is not None and (grammar or _uses_penalties(scheduler_output)):
                    outputs += self._apply_rows(*rest)
                    rest = None
                bitmask = self.structured.bitmask if grammar else None
                self._in_flight = (scheduler_output,
                                   self.runner.dispatch(scheduler_output, bitmask) if bitmask
                                   else self.runner.dispatch(scheduler_output))
                if arrived is not None:
                    timings = self.runner.timings
                    timings.beam_gap_s += time.perf_counter() - arrived
                    timings.beam_model_gap_s += self.runner.model_queued_at - arrived
            if rest is not None:
                outputs += self._apply_rows(*rest)
        except Exception:
            self._forget_placeholders()
            raise
        self._failed_step = None
        self._drop_idle_in_flight()
        if previous is not None or self._in_flight is not None:
            self._count_step(start)
        return outputs

    def _count_step(self, start: float) -> None:
        self.runner.timings.steps += 1
        self.runner.timings.total_s += time.perf_counter() - start

    def _apply(self, scheduler_output: SchedulerOutput,
               runner_output: RunnerOutput) -> list[RequestOutput]:
        """The step's results into the scheduler (append, stops) and the requests' outputs."""
        return self._apply_rows(self.beam_search.take_rows(
            scheduler_output, runner_output.sampled_token_ids, runner_output.logprobs),
            runner_output)

    def _apply_rows(self, scheduler_output: SchedulerOutput,
                    runner_output: RunnerOutput) -> list[RequestOutput]:
        """``_apply`` of a step whose beam rows were taken already."""
        with host_phase("apply"):
            return self._apply_updates(scheduler_output, runner_output)

    def _apply_updates(self, scheduler_output: SchedulerOutput,
                       runner_output: RunnerOutput) -> list[RequestOutput]:
        self.output_processor.collect_prompt_logprobs(runner_output.prompt_logprobs)
        updates = self.scheduler.update_from_output(scheduler_output,
                                                    runner_output.sampled_token_ids)
        if self.structured is None:
            return self.output_processor.process(updates, runner_output.logprobs)
        updates = self._advance_grammars(updates)
        outputs = self.output_processor.process(updates, runner_output.logprobs)
        for update in updates:
            if update.request.is_finished():
                self.structured.free(update.request.request_id)
        return outputs

    def _advance_grammars(self, updates: list[RequestUpdate]) -> list[RequestUpdate]:
        """Feed the new tokens to the requests' grammars; a grammar that completes ends its
        request ("stop"), one that rejects a token (never under the mask) aborts it."""
        for i, update in enumerate(updates):
            request = update.request
            constraint = request.sampling_params.structured_outputs
            if constraint is None or not update.new_token_ids:
                continue
            state = self.structured.accept(request.request_id, constraint, update.new_token_ids)
            if state is not GrammarState.RUNNING and not request.is_finished():
                status = (RequestStatus.FINISHED_STOPPED if state is GrammarState.STOPPED
                          else RequestStatus.FINISHED_ABORTED)
                self.scheduler.finish_request(request.request_id, status)
                updates[i] = update._replace(finished=True)
        return updates

    # ----- failure -----

    def _forget_placeholders(self) -> None:
        """After a failed async step no in-flight results will come: requests waiting to be
        recomputed drop their placeholders (and resample those tokens); running ones are aborted
        by ``recover``."""
        self._in_flight = None
        for request in self.scheduler.waiting:
            request.num_output_placeholders = 0

    def recover(self, live_request_ids: set[str],
                error: BaseException | None = None) -> set[str]:
        """Puts the engine back in working order after ``step()`` raised ``error``; returns the
        (parent) ids of the requests it aborted. ``live_request_ids``: those the caller still
        serves. Only requests the failure could have affected are aborted; every other running
        request is recomputed from its tokens (preempted), so it loses nothing.

        - ``schedule()`` already ran: the step's requests hold newly allocated blocks and their
          ``num_computed_tokens`` counts tokens whose K/V may never have been written, so no
          running request may simply go on. Requests the failure belongs to are aborted: those a
          ``RequestFault`` names, else (a failure that names nobody) those the step scheduled.
          Running requests owed prompt logprobs are aborted too (a recomputation would skip the
          positions the failed step took). The rest are preempted: they recompute from scratch.
        - ``update_from_output()`` may have finished some requests in the scheduler before the
          engine's own bookkeeping raised: nothing will ever finish them for the caller, so
          every live request the scheduler no longer knows is aborted too.
        - The KV pool is donated to the jitted step; if the step failed after the donation, or
          on the device, the pool is deleted or poisoned. Then every cached block is garbage:
          all requests are aborted, the prefix cache is forgotten and a zeroed pool replaces it.

        Waiting requests hold no blocks and survive (unless the pool was lost)."""
        scheduler = self.scheduler
        failed_step, self._failed_step = self._failed_step, None
        self._forget_placeholders()
        beam_groups = set(self.beam_search.groups)
        for group_id in beam_groups:  # their beams may have missed a step
            self.beam_search.abort(group_id)
        known = {_parent(r) for r in scheduler.requests.values()}
        victims = self._culprits(error, failed_step)
        victims |= {_parent(r) for r in scheduler.running
                    if r.sampling_params.prompt_logprobs is not None}
        victims |= live_request_ids - known
        pool_lost = not self.runner.kv_cache_is_usable()
        if pool_lost:
            victims |= known | live_request_ids
        self.abort_request(sorted(victims))
        scheduler.preempt_all_running()
        if pool_lost:
            logger.warning("the KV pool was lost in the failed step; starting from an empty pool")
            self.runner.reset_kv_cache()
            if not scheduler.block_manager.reset_prefix_cache():
                raise RuntimeError("KV blocks are still held after aborting every request")
        return victims | beam_groups

    def _culprits(self, error: BaseException | None,
                  failed_step: SchedulerOutput | None) -> set[str]:
        """Parent ids of the requests a failure belongs to: those a ``RequestFault`` names, else
        those the failed step scheduled (every running one when the step is unknown)."""
        requests = self.scheduler.requests
        if isinstance(error, RequestFault):
            ids = error.request_ids
        elif failed_step is not None:
            ids = {s.req_id for s in failed_step.scheduled}
        else:
            return {_parent(r) for r in self.scheduler.running}
        return {_parent(requests[i]) if i in requests else i for i in ids}


def _parent(request) -> str:
    return request.parent_id or request.request_id


def _has_grammar(scheduler_output: SchedulerOutput) -> bool:
    """Whether a sampled row has structured outputs (its sampler needs a bitmask)."""
    return any(s.do_sample and s.sampling_params.structured_outputs is not None
               for s in scheduler_output.scheduled)


def _pool_size_text(plan: KVPlan) -> str:
    """The pool's bytes; under tensor parallelism per device and summed over them."""
    gib = plan.num_blocks * plan.bytes_per_block / 2**30
    if plan.num_devices == 1:
        return f"{gib:.2f} GiB"
    return (f"{gib * plan.num_devices:.2f} GiB over {plan.num_devices} devices "
            f"({gib:.2f} GiB each, split by KV heads)")


def _uses_penalties(scheduler_output: SchedulerOutput) -> bool:
    """Whether a sampled row needs its real output ids (presence/frequency/repetition)."""
    for s in scheduler_output.scheduled:
        p = s.sampling_params
        if s.do_sample and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                            or p.repetition_penalty != 1.0):
            return True
    return False
