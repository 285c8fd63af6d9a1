"""The model runner: owns the weights and the KV pool on the device and runs one jitted step.

``execute(scheduler_output)`` packs the step (``step_inputs.pack_step``), runs the model with the
KV pool donated (updated in place), samples the sequences that need a token and returns their ids.
The model step and the sampler are two jitted programs, so the compile count is
(model buckets) + (sampler buckets x sampling switches), not their product.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.buckets import BucketLadder, StepShape
from jaxpaged.kv_cache import KVCache
from jaxpaged.models.llama import LlamaForCausalLM
from jaxpaged.sampler import SampleLogprobs, sample
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.sampling_tensors import (SamplingTensorBuilder, SamplingTensors, StepKeys,
                                       build_sampling_tensors)
from jaxpaged.scheduler_output import ScheduledRequest, SchedulerOutput
from jaxpaged.step_inputs import StepInputs, StepPacker, pack_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token (raw model distribution, vLLM's default)."""

    sampled_logprob: float
    sampled_rank: int
    top: dict[int, float]  # top-N token id -> logprob, most likely first


@dataclasses.dataclass
class StepTimings:
    """Where the wall time of steps goes: the host works while the device runs the step, then
    waits for the sampled ids. host_s = total_s - device_wait_s is time the device may sit idle."""

    steps: int = 0
    total_s: float = 0.0  # whole engine steps (schedule, run, update, detokenize)
    device_wait_s: float = 0.0  # blocked on the sampled ids after dispatching the step

    @property
    def host_s(self) -> float:
        return self.total_s - self.device_wait_s


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    sampled_token_ids: dict[str, int]  # req_id -> its new token (only do_sample requests)
    logprobs: dict[str, TokenLogprobs]  # req_id -> logprobs, for requests that asked for them


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("kv_cache",))
def _model_step(graphdef, state, kv_cache: KVCache, inputs: StepInputs):
    """-> logits f32[S, V] of each sequence's last new token, updated pool."""
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(inputs.token_ids, inputs.positions, kv_cache, inputs.md)
    return model.compute_logits(hidden[inputs.logits_indices]), kv_cache


@jax.jit
def _sample(logits: jax.Array, rows: jax.Array, tensors: SamplingTensors):
    """logits f32[S, V], rows i32[B] (which logits rows need a token) -> SamplerOutput [B]."""
    return sample(logits[rows], tensors)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, block_size: int,
                 kv_dtype, ladder: BucketLadder, eos_token_ids: tuple[int, ...], seed: int,
                 penalty_width: int):
        cfg = model.config
        self.config = cfg
        self.graphdef, self.state = nnx.split(model)
        self.block_size = block_size
        self.ladder = ladder
        self.eos_token_ids = eos_token_ids
        self.penalty_width = penalty_width
        self.kv_cache = KVCache.zeros(num_layers=cfg.num_layers, num_blocks=num_blocks,
                                      block_size=block_size, num_kv_heads=cfg.num_kv_heads,
                                      head_dim=cfg.head_dim, dtype=kv_dtype)
        self._base_key = jax.random.key(seed)
        self._num_steps = 0
        # Host-side per-step builders; they keep per-request work from one step to the next.
        self._packer = StepPacker(block_size=block_size, table_width=ladder.table_width)
        self._sampling_builder = SamplingTensorBuilder(cfg.vocab_size, eos_token_ids,
                                                       penalty_width=penalty_width)
        self._step_keys = StepKeys(self._base_key)
        self.timings = StepTimings()
        self._executables: dict[StepShape, jax.stages.Compiled] = {}

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        scheduled = scheduler_output.scheduled
        shape = self.ladder.shape_for(scheduler_output.total_num_scheduled_tokens, len(scheduled),
                                      decode_only=scheduler_output.max_query_len == 1)
        inputs = self._packer.pack(scheduled, shape)
        logits, self.kv_cache = self._executable(shape, inputs)(self.state, self.kv_cache, inputs)
        sampled_rows = [i for i, r in enumerate(scheduled) if r.do_sample]
        if not sampled_rows:
            return RunnerOutput({}, {})
        requests = [scheduled[i] for i in sampled_rows]
        tensors = self._sampling_tensors(requests, shape.num_seqs)
        rows = np.zeros(shape.num_seqs, np.int32)
        rows[:len(sampled_rows)] = sampled_rows
        out = _sample(logits, rows, tensors)
        self._num_steps += 1
        dispatched = time.perf_counter()
        token_ids = np.asarray(out.token_ids)
        self.timings.device_wait_s += time.perf_counter() - dispatched
        sampled = dict(zip([r.req_id for r in requests], token_ids.tolist()))  # drops padding
        logprobs = _logprobs_by_request(requests, out.logprobs)
        return RunnerOutput(sampled, logprobs)

    def _sampling_tensors(self, requests: list[ScheduledRequest], pad_to: int) -> SamplingTensors:
        """Host (numpy) tensors: the jitted sampler's call moves them to the device."""
        return self._sampling_builder.build(
            [r.req_id for r in requests], [r.sampling_params for r in requests],
            [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests],
            pad_to, self._step_keys(self._num_steps))

    def _executable(self, shape: StepShape, inputs: StepInputs) -> jax.stages.Compiled:
        """The compiled model step of ``shape`` (compiled now if warm-up did not)."""
        if shape not in self._executables:
            self._executables[shape] = _model_step.lower(self.graphdef, self.state, self.kv_cache,
                                                         inputs).compile()
        return self._executables[shape]

    def warmup(self, max_parallel_compiles: int | None = None) -> float:
        """Compiles every step shape ahead of time, several at once (XLA compiles release the
        GIL), then greedy and random sampling for every batch size; returns the seconds taken."""
        start = time.perf_counter()
        shapes = self.ladder.all_shapes()
        workers = max_parallel_compiles or min(len(shapes), os.cpu_count() or 1)

        def compile_shape(shape: StepShape) -> None:
            self._executable(shape, pack_step([], shape, block_size=self.block_size,
                                              table_width=self.ladder.table_width))

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(compile_shape, shapes))
        vocab = self.config.vocab_size
        for batch in self.ladder.sampler_batch_sizes:
            # committed to the device like the model step's logits, so the same program is cached
            logits = jax.device_put(np.zeros((batch, vocab), np.float32), jax.devices()[0])
            for params in _WARMUP_SAMPLING:
                tensors = build_sampling_tensors(
                    [params] * batch, [[0]] * batch, [[]] * batch, self.eos_token_ids, batch,
                    vocab, self._base_key, penalty_width=self.penalty_width)
                _sample(logits, np.arange(batch, dtype=np.int32), tensors).token_ids.block_until_ready()
        return time.perf_counter() - start


# The two sampling modes nearly every workload uses; other switches compile on first use.
_WARMUP_SAMPLING = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0))


def _logprobs_by_request(requests: list[ScheduledRequest],
                         logprobs: SampleLogprobs | None) -> dict[str, TokenLogprobs]:
    if logprobs is None:
        return {}
    host = jax.device_get(logprobs)
    out = {}
    for j, r in enumerate(requests):
        n = r.sampling_params.logprobs
        if n is None:
            continue
        n = host.top_ids.shape[1] if n < 0 else n
        top = {int(t): float(v) for t, v in zip(host.top_ids[j, :n], host.top_logprobs[j, :n])}
        out[r.req_id] = TokenLogprobs(float(host.sampled_logprob[j]),
                                      int(host.sampled_rank[j]), top)
    return out
