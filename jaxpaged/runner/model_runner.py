"""The model runner: owns the weights and the KV pool on the device and runs one jitted step.

``execute(scheduler_output)`` packs the step (``step_inputs.pack_step``), runs the model with the
KV pool donated (updated in place), samples the sequences that need a token and returns their ids.
The model step and the sampler are two jitted programs, so the compile count is
(model buckets) + (sampler buckets x sampling switches), not their product.

Prompt logprobs: the model step also returns the final hidden states of all T tokens; a step that
schedules prompt positions of a request that asked for ``prompt_logprobs`` runs a third program on
those rows (``jaxpaged.sample.prompt_logprobs``).

Host-to-device traffic: the weights are passed as a flat list of arrays (flattening the model's
nnx State on every call was measurable host time per step: bench/RESULTS.md), and each step's
small host arrays (packed inputs; sampling rows and tensors) travel as one byte buffer per program
(``host_bundle``) instead of one transfer per array.

Async scheduling splits ``execute`` into ``dispatch`` (queue the step on the device, no host sync)
and ``fetch`` (copy its sampled ids and their logprobs to the host, one array: ``sample_results``).
The sampler also returns its ids padded to a fixed ``prev_width`` on the device; the next
dispatched step reads the tokens it does not know yet (-1, see ``step_inputs``) from there, so a
step never waits for the previous one's host copy.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpaged.converters.kv_scales import KVScales
from jaxpaged.core.scheduler_output import ScheduledRequest, SchedulerOutput
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.llama import LlamaForCausalLM
from jaxpaged.models.sharding import kv_cache_shardings, replicated
from jaxpaged.runner.buckets import BucketLadder, StepShape
from jaxpaged.runner.compiler_options import step_compiler_options
from jaxpaged.runner.executable_cache import ExecutableCache, abstract_signature
from jaxpaged.runner.host_bundle import BundleLayout, bundle, unbundle, unbundle_shapes
from jaxpaged.runner.sample_results import pack_results, unpack_results
from jaxpaged.runner.step_inputs import StepInputs, StepPacker, pack_step
from jaxpaged.runner.step_logprobs import LogprobArrays, StepLogprobs, TokenLogprobs
from jaxpaged.sample.prompt_logprobs import (PromptLogprobsChunk, PromptLogprobsPlan,
                                             plan_prompt_logprobs, prompt_logprobs_program)
from jaxpaged.sample.sampler import SampleLogprobs, sample
from jaxpaged.sample.tensor_builder import SamplingTensorBuilder, build_sampling_tensors
from jaxpaged.sample.tensors import SamplingTensors, StepKeys
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.structured.bitmask import bitmask_width
from jaxpaged.utils.host_phase import host_phase

# (sampled requests in sampler row order, pad_to) -> i32[pad_to, W] grammar bitmask, or None
GrammarBitmaskFn = Callable[[list[ScheduledRequest], int], np.ndarray | None]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepTimings:
    """Where the wall time of steps goes: the host works while the device runs the step, then
    waits for the sampled ids. host_s = total_s - device_wait_s is time the device may sit idle."""

    steps: int = 0
    total_s: float = 0.0  # whole engine steps (schedule, run, update, detokenize)
    device_wait_s: float = 0.0  # blocked on the sampled ids after dispatching the step
    # beam steps (``LLMEngine._step_beams``): from the previous step's ids on the host to this
    # step queued on the device, which idles meanwhile (selection, forks, scheduling, dispatch)
    beam_gap_s: float = 0.0
    # the part of beam_gap_s until the model step was queued: the rest (sampling tensors, the
    # sampler's dispatch) overlaps the model step on an accelerator
    beam_model_gap_s: float = 0.0

    @property
    def host_s(self) -> float:
        return self.total_s - self.device_wait_s


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    sampled_token_ids: dict[str, int]  # req_id -> its new token (only do_sample requests)
    # req_id -> logprobs, for requests that asked for them (built on lookup; the host arrays
    # are ``logprobs.arrays``)
    logprobs: Mapping[str, TokenLogprobs]
    # req_id -> prompt logprobs this step computed, for requests whose ScheduledRequest has
    # non-empty prompt_logprobs_positions
    prompt_logprobs: dict[str, PromptLogprobsChunk] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepHandle:
    """A dispatched step whose results are still on the device (``ModelRunner.fetch``)."""

    sampled: list[ScheduledRequest]  # the do_sample requests, in sampler row order
    # i32[B, K] sampled ids and logprobs in one array (``sample_results``); None: nothing sampled
    results: jax.Array | None
    prompt_logprobs: tuple[PromptLogprobsPlan, SampleLogprobs] | None


@functools.partial(jax.jit, static_argnames=("graphdef", "state_treedef", "layout"),
                   donate_argnames=("kv_cache",))
def _model_step(graphdef, state_treedef, layout: BundleLayout, state_leaves: list[jax.Array],
                kv_cache: KVCache, packed: jax.Array, prev_sampled_ids: jax.Array):
    """``packed``: the step's ``StepInputs`` as one u8 buffer;
    ``prev_sampled_ids`` i32[P]: the previous step's padded sampled ids (device).
    -> logits f32[S, V] of each sequence's last new token, final hidden states [T, hidden] of
    every token (read only for prompt logprobs), updated pool."""
    model = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, state_leaves))
    inputs = unbundle(packed, layout)
    sources = inputs.prev_source_rows  # i32[T]
    token_ids = jnp.where(sources >= 0, prev_sampled_ids[jnp.maximum(sources, 0)],
                          inputs.token_ids)  # [T]
    hidden, kv_cache = model(token_ids, inputs.positions, kv_cache, inputs.md)
    # tensor parallel: the sampler reads one whole copy of the logits (split by vocab here)
    logits = replicated(model.compute_logits(hidden[inputs.logits_indices]),
                        model.attention.mesh)
    return logits, hidden, kv_cache


@functools.partial(jax.jit, static_argnames=("layout", "pad_to"))
def _sample(logits: jax.Array, packed: jax.Array, prev_sampled_ids: jax.Array, *,
            layout: BundleLayout, pad_to: int):
    """logits f32[S, V]; ``packed``: (rows i32[B] (which logits rows need a token),
    SamplingTensors) as one u8 buffer; ``prev_sampled_ids`` i32[pad_to]: the previous step's
    padded ids (read only by bad words, see ``TokenConstraints``) -> the SamplerOutput [B] as one
    i32[B, K] array (``sample_results.pack_results``), and its token ids padded with zeros to
    i32[pad_to] (the next step's ``prev_sampled_ids``)."""
    rows, tensors = unbundle(packed, layout)
    out = sample(logits[rows], tensors, prev_sampled_ids)
    ids = out.token_ids.astype(jnp.int32)
    return pack_results(out), jnp.zeros(pad_to, jnp.int32).at[:ids.shape[0]].set(ids)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, block_size: int,
                 kv_dtype, ladder: BucketLadder, eos_token_ids: tuple[int, ...], seed: int,
                 penalty_width: int, executable_cache: ExecutableCache | None = None,
                 kv_scales: KVScales | None = None):
        cfg = model.config
        self.config = cfg
        self.graphdef, state = nnx.split(model)
        self._state_leaves, self._state_treedef = jax.tree.flatten(state)
        self.block_size = block_size
        self.ladder = ladder
        self.eos_token_ids = eos_token_ids
        self.penalty_width = penalty_width
        # Tensor parallel (the model's mesh): the pool is split over KV heads, and the small
        # arrays every program shares (logits, sampled ids) live whole on every device.
        self.mesh = model.attention.mesh
        self._kv_spec = dict(num_layers=cfg.num_layers, num_blocks=num_blocks,
                             block_size=block_size, num_kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, dtype=kv_dtype,
                             **kv_cache_shardings(self.mesh))
        self._replicated = (None if self.mesh is None
                            else NamedSharding(self.mesh, PartitionSpec()))
        self._kv_scales = kv_scales
        self.kv_cache = self._new_kv_cache()
        self._base_key = jax.random.key(seed)
        self._num_steps = 0
        # Host-side per-step builders; they keep per-request work from one step to the next.
        # Fixed length of the sampled ids handed to the next step: the largest batch.
        self.prev_width = max([s.num_seqs for s in ladder.all_shapes()]
                              + list(ladder.sampler_batch_sizes))
        self._packer = StepPacker(block_size=block_size, table_width=ladder.table_width)
        # The last dispatched sampling step: its padded ids on the device, req_id -> row.
        self._prev_sampled_ids: jax.Array | None = None
        self._no_prev_ids = jax.device_put(np.zeros(self.prev_width, np.int32),
                                           self._replicated)
        self._prev_rows: dict[str, int] = {}
        self._sampling_builder = SamplingTensorBuilder(cfg.vocab_size, eos_token_ids,
                                                       penalty_width=penalty_width)
        self._step_keys = StepKeys(self._base_key)
        self.timings = StepTimings()
        self.model_queued_at = 0.0  # perf_counter() when the last model step was queued
        # Compiled programs: model steps by input layout, samplers by (layout, logits shape).
        self._executables: dict[BundleLayout, jax.stages.Compiled] = {}
        self._samplers: dict[tuple[BundleLayout, tuple[int, ...]], jax.stages.Compiled] = {}
        self._executable_cache = executable_cache
        self._model_signature: str | None = None  # the static part, described once

    def kv_cache_is_usable(self) -> bool:
        """False when a failed step left the pool deleted (donated, then the step raised) or
        poisoned (the computation that produced it failed on the device)."""
        try:
            leaves = jax.tree.leaves(self.kv_cache)
            if any(leaf.is_deleted() for leaf in leaves):
                return False
            jax.block_until_ready(leaves)  # raises if a failed computation produced them
            return True
        except Exception:
            return False

    def reset_kv_cache(self) -> None:
        """A zeroed pool of the same shape, dtype and scales in place of the current one."""
        self.kv_cache = self._new_kv_cache()

    def _new_kv_cache(self) -> KVCache:
        cache = KVCache.zeros(**self._kv_spec)
        if self._kv_scales is not None:
            cache = cache.with_scales(self._kv_scales.k, self._kv_scales.v)
        return cache

    def execute(self, scheduler_output: SchedulerOutput,
                grammar_bitmask: GrammarBitmaskFn | None = None) -> RunnerOutput:
        """Runs one step and waits for its sampled ids (``dispatch`` then ``fetch``)."""
        return self.fetch(self.dispatch(scheduler_output, grammar_bitmask))

    def dispatch(self, scheduler_output: SchedulerOutput,
                 grammar_bitmask: GrammarBitmaskFn | None = None) -> StepHandle:
        """Queues the model step and the sampler on the device; does not wait for them. Tokens
        of id -1 are read on the device from the previous dispatched step's samples.

        ``grammar_bitmask(sampled requests, pad_to)``: structured outputs' i32[pad_to, W] mask
        (None: no row has a grammar), called after the model step is queued, before the sampling
        tensors are built: the host fills it (and may apply the previous step's tokens first)
        while the device runs the model."""
        scheduled = scheduler_output.scheduled
        shape = self.ladder.shape_for(scheduler_output.total_num_scheduled_tokens, len(scheduled),
                                      decode_only=scheduler_output.max_query_len == 1)
        with host_phase("pack"):
            inputs = self._packer.pack(scheduled, shape, self._prev_rows)
        needs_prev = self._prev_sampled_ids is not None and (inputs.prev_source_rows >= 0).any()
        with host_phase("model"):
            logits, hidden = self._run_model(
                inputs, self._prev_sampled_ids if needs_prev else self._no_prev_ids)
        self.model_queued_at = time.perf_counter()  # read by the engine's beam gap timing
        pending = self._dispatch_prompt_logprobs(scheduled, hidden)  # None in nearly every step
        return self._dispatch_sample(scheduled, logits, shape.num_seqs, pending, grammar_bitmask)

    def fetch(self, handle: StepHandle) -> RunnerOutput:
        """Waits for a dispatched step and copies its results to the host."""
        pending = handle.prompt_logprobs
        prompt_logprobs = pending[0].split(pending[1]) if pending is not None else {}
        if handle.results is None:
            return RunnerOutput({}, {}, prompt_logprobs)
        waiting = time.perf_counter()
        with host_phase("wait"):
            token_ids, logprobs = unpack_results(np.asarray(handle.results))
        self.timings.device_wait_s += time.perf_counter() - waiting
        requests = handle.sampled
        sampled = dict(zip([r.req_id for r in requests], token_ids.tolist()))  # drops padding
        return RunnerOutput(sampled, _logprobs_by_request(requests, logprobs), prompt_logprobs)

    def _dispatch_sample(self, scheduled: list[ScheduledRequest], logits: jax.Array,
                         num_seqs: int, pending,
                         grammar_bitmask: GrammarBitmaskFn | None = None) -> StepHandle:
        """Queues sampling of the requests that need a token; remembers where their ids are for
        the next step."""
        sampled_rows = [i for i, r in enumerate(scheduled) if r.do_sample]
        if not sampled_rows:
            return StepHandle([], None, pending)
        requests = [scheduled[i] for i in sampled_rows]
        mask = None
        if grammar_bitmask is not None:
            with host_phase("grammar"):
                mask = grammar_bitmask(requests, num_seqs)
        with host_phase("sample"):
            tensors = self._sampling_tensors(requests, num_seqs)
            if mask is not None:
                tensors = dataclasses.replace(tensors, grammar_bitmask=mask)
            rows = np.zeros(num_seqs, np.int32)
            rows[:len(sampled_rows)] = sampled_rows
            results, padded_ids = self._run_sampler(logits, rows, tensors)
        self._num_steps += 1
        self._prev_sampled_ids = padded_ids
        self._prev_rows = {r.req_id: j for j, r in enumerate(requests)}
        results.copy_to_host_async()  # ids and logprobs: one transfer
        return StepHandle(requests, results, pending)

    def _dispatch_prompt_logprobs(self, scheduled: list[ScheduledRequest], hidden: jax.Array
                                  ) -> tuple[PromptLogprobsPlan, SampleLogprobs] | None:
        """Starts the prompt logprobs of the positions the scheduler asked for (None: none
        asked); the device results are fetched after the sampler has been dispatched."""
        plan = plan_prompt_logprobs(scheduled, self.config.vocab_size)
        if plan is None:
            return None
        rows, targets, num_top, chunk = plan.padded_inputs(self.config.vocab_size)
        return plan, prompt_logprobs_program(self.graphdef, self._state_treedef,
                                             self._state_leaves, hidden, rows, targets,
                                             num_top=num_top, chunk=chunk)

    def _sampling_tensors(self, requests: list[ScheduledRequest], pad_to: int) -> SamplingTensors:
        """Host (numpy) tensors: the jitted sampler's call moves them to the device. Generated
        counts include the placeholders of the step in flight (async scheduling)."""
        return self._sampling_builder.build(
            [r.req_id for r in requests], [r.sampling_params for r in requests],
            [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests],
            pad_to, self._step_keys(self._num_steps),
            num_generated=[r.num_output_tokens for r in requests], prev_rows=self._prev_rows)

    def _run_model(self, inputs: StepInputs, prev_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Queues the model step on ``inputs`` (numpy, padded to a step shape) with ``prev_ids``
        (device, i32[prev_width]: the previous step's samples, or zeros already on the device)
        -> (logits, hidden); the pool is updated in place."""
        packed, layout = bundle(inputs)
        logits, hidden, self.kv_cache = self._executable(layout, packed)(
            self._state_leaves, self.kv_cache, packed, prev_ids)
        return logits, hidden

    def _run_sampler(self, logits: jax.Array, rows: np.ndarray, tensors: SamplingTensors):
        """Queues sampling of ``logits[rows]`` -> (i32[B, K] results (``sample_results``), ids
        padded to prev_width)."""
        packed, layout = bundle((rows, tensors))
        prev_ids = (self._prev_sampled_ids if self._prev_sampled_ids is not None
                    else self._no_prev_ids)
        compiled = self._samplers.get((layout, logits.shape))
        if compiled is None:
            compiled = self._compile(
                "sample", lambda: _sample.lower(logits, packed, prev_ids, layout=layout,
                                                pad_to=self.prev_width),
                lambda: abstract_signature(logits, packed, prev_ids, layout, self.prev_width))
            self._samplers[(layout, logits.shape)] = compiled
        return compiled(logits, packed, prev_ids)

    def _executable(self, layout: BundleLayout, packed: np.ndarray) -> jax.stages.Compiled:
        """The compiled model step for inputs of ``layout`` (a step shape; compiled now if
        warm-up did not)."""
        compiled = self._executables.get(layout)
        if compiled is None:
            num_tokens = unbundle_shapes(layout).token_ids[0]
            compiled = self._compile(
                "model_step", lambda: _model_step.lower(self.graphdef, self._state_treedef, layout,
                                                        self._state_leaves, self.kv_cache, packed,
                                                        self._no_prev_ids),
                lambda: self._static_model_signature() + abstract_signature(
                    layout, self._state_leaves, self.kv_cache, packed, self._no_prev_ids),
                step_compiler_options(num_tokens, jax.default_backend()))
            self._executables[layout] = compiled
        return compiled

    def _compile(self, name: str, lower, signature,
                 compiler_options: dict | None = None) -> jax.stages.Compiled:
        """``lower().compile(compiler_options)``, or the executable cache's copy (keyed by
        ``signature()`` and the options)."""
        if self._executable_cache is None:
            return lower().compile(compiler_options or None)
        return self._executable_cache.get_or_compile(name, signature(), lower, compiler_options)

    def _static_model_signature(self) -> str:
        """The model's graph (config, attention implementation) and weight tree, described once
        (describing a large graph is the costly part of a signature)."""
        if self._model_signature is None:
            self._model_signature = abstract_signature(self.graphdef, self._state_treedef)
        return self._model_signature

    def executable_cache_summary(self) -> str:
        cache = self._executable_cache
        if cache is None or not cache.enabled:
            return "executable cache off"
        stats = cache.stats
        return (f"executable cache: {stats.hits} loaded in {stats.load_s:.1f} s, "
                f"{stats.misses} compiled in {stats.compile_s:.1f} s")

    def warmup(self, max_parallel_compiles: int | None = None,
               extra_sampling: tuple[SamplingParams, ...] = ()) -> float:
        """Compiles every step shape ahead of time, and greedy and random sampling (without and
        with token constraints, and ``extra_sampling``'s switches) for every batch size, several
        programs at once (XLA compiles release the GIL); returns the seconds taken."""
        start = time.perf_counter()
        shapes = self.ladder.all_shapes()
        samplers = [(batch, params, grammar) for batch in self.ladder.sampler_batch_sizes
                    for params, grammar in _WARMUP_SAMPLING
                    + tuple((params, False) for params in extra_sampling)]
        workers = max_parallel_compiles or min(len(shapes) + len(samplers), os.cpu_count() or 1)

        def compile_shape(shape: StepShape) -> None:
            inputs = pack_step([], shape, block_size=self.block_size,
                               table_width=self.ladder.table_width)
            packed, layout = bundle(inputs)
            self._executable(layout, packed)

        def compile_sampler(batch: int, params: SamplingParams, grammar: bool) -> None:
            # committed to the device like the model step's logits, so the same program is cached
            logits = jax.device_put(np.zeros((batch, self.config.vocab_size), np.float32),
                                    self._replicated or jax.devices()[0])
            tensors = build_sampling_tensors(
                [params] * batch, [[0]] * batch, [[]] * batch, self.eos_token_ids, batch,
                self.config.vocab_size, self._base_key, penalty_width=self.penalty_width)
            if grammar:  # structured outputs: the sampler variant with a bitmask input
                mask = np.full((batch, bitmask_width(self.config.vocab_size)), -1, np.int32)
                tensors = dataclasses.replace(tensors, grammar_bitmask=mask)
            results, _ = self._run_sampler(logits, np.arange(batch, dtype=np.int32), tensors)
            results.block_until_ready()

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(compile_shape, shape) for shape in shapes]
            futures += [pool.submit(compile_sampler, *sampler) for sampler in samplers]
            for future in futures:
                future.result()  # re-raises a failed compile
        return time.perf_counter() - start


# The two sampling modes nearly every workload uses, without and with token constraints
# (logit_bias / allowed_token_ids / bad words within the smallest constraint width: the bias below
# stands for any of them), and with a structured-outputs bitmask; other switches compile on first
# use. (params, with a grammar bitmask)
_WARMUP_SAMPLING = ((SamplingParams(temperature=0.0), False),
                    (SamplingParams(temperature=1.0), False),
                    (SamplingParams(temperature=0.0, logit_bias={0: 0.0}), False),
                    (SamplingParams(temperature=1.0, logit_bias={0: 0.0}), False),
                    (SamplingParams(temperature=0.0), True),
                    (SamplingParams(temperature=1.0), True))


def _logprobs_by_request(requests: list[ScheduledRequest],
                         logprobs: LogprobArrays | None) -> Mapping[str, TokenLogprobs]:
    """The step's logprobs (host arrays), each row's dict made on lookup."""
    if logprobs is None:
        return {}
    rows = {r.req_id: (j, r.sampling_params.logprobs) for j, r in enumerate(requests)
            if r.sampling_params.logprobs is not None}
    return StepLogprobs(logprobs, rows)
