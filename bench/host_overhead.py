"""Host (Python) time of one steady decode step, part by part, with a fake runner (no model).

    .venv/bin/python bench/host_overhead.py --batches 64 256 --context 1024 --steps 50
    .venv/bin/python bench/host_overhead.py --profile 256   # cProfile of the timed steps
    .venv/bin/python bench/host_overhead.py --check         # cached paths == one-shot paths

B requests with ``context``-token prompts are prefilled through the real scheduler (a fake runner
hands back token ids), then ``--steps`` decode steps are timed. No request finishes while steps
are timed. Every step runs what the engine's host does around the model, each part timed on its
own:

  schedule         Scheduler.schedule()
  pack_step        BucketLadder.shape_for + StepPacker.pack (numpy), as ModelRunner.execute
  pack put         device transfer of the packed step inputs, as a jitted call taking them pays
  sampling build   the step's SamplingTensors on the host (SamplingTensorBuilder + StepKeys, as
                   ModelRunner._sampling_tensors)
  sampling put     their device transfer, likewise
  update           Scheduler.update_from_output(...)
  detokenize       IncrementalDetokenizer.update + get_next_output_text (tiny tokenizer)

Two sampling variants are timed: greedy (temperature 0) and temperature 0.6. The vocabulary is
``--vocab`` (Llama-3's 128256) for the sampling tensors; the fake runner samples ids the tiny
tokenizer knows. Numbers are microseconds per step (median over steps).

``--check`` also compares every step's packed inputs and sampling tensors with the one-shot
``pack_step`` and ``build_sampling_tensors`` (no state kept between steps), and fails on any
difference: the caches must not change what reaches the device.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import pstats
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.runner.buckets import BucketLadder
from jaxpaged.converters.tiny import tiny_model_dir
from jaxpaged.engine.detokenizer import IncrementalDetokenizer
from jaxpaged.core.request import Request
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.sample.tensor_builder import SamplingTensorBuilder, build_sampling_tensors
from jaxpaged.sample.tensors import SamplingTensors, StepKeys
from jaxpaged.core.scheduler import Scheduler, SchedulerConfig
from jaxpaged.core.scheduler_output import SchedulerOutput
from jaxpaged.runner.step_inputs import StepInputs, StepPacker, pack_step
from jaxpaged.engine.tokenizer import load_tokenizer

PARTS = ("schedule", "pack_step", "pack put", "sampling build", "sampling put", "update",
         "detokenize")
EOS_ID = 1  # never sampled by the fake runner
MAX_NUM_BATCHED_TOKENS = 8192


@functools.partial(jax.jit, keep_unused=True)
def _to_device(tree) -> jax.Array:
    """What a jitted step pays to take host arrays: their transfer (plus one tiny dispatch)."""
    return sum(_first(leaf) for leaf in jax.tree.leaves(tree))


def _first(leaf: jax.Array) -> jax.Array:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return leaf.ravel()[0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Setup:
    batch: int
    context: int
    block_size: int
    vocab: int
    temperature: float


class FakeHost:
    """An engine's host side with no model: scheduler, packing, sampling set-up, detokenizers."""

    def __init__(self, setup: Setup, tokenizer, steps: int, check: bool = False):
        self.setup, self.check = setup, check
        # Room for the tokens early requests sample while later ones prefill, then every step:
        # no request finishes while steps are timed.
        max_model_len = (setup.context + setup.batch * setup.context // MAX_NUM_BATCHED_TOKENS
                         + steps + 64)
        self.penalty_width = max_model_len
        self.ladder = BucketLadder.create(max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                                          max_num_seqs=setup.batch, max_model_len=max_model_len,
                                          block_size=setup.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(max_model_len=max_model_len, max_num_seqs=setup.batch,
                            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                            block_size=setup.block_size),
            num_blocks=setup.batch * self.ladder.table_width + 1)
        self.packer = StepPacker(block_size=setup.block_size, table_width=self.ladder.table_width)
        self.builder = SamplingTensorBuilder(setup.vocab, (EOS_ID,),
                                             penalty_width=self.penalty_width)
        self.step_keys = StepKeys(jax.random.key(0))
        self.num_steps = 0
        self.tokenizer = tokenizer
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.rng = np.random.default_rng(0)
        self._add_requests()

    def _add_requests(self) -> None:
        s = self.setup
        params = SamplingParams(temperature=s.temperature, ignore_eos=True, max_tokens=None)
        for i in range(s.batch):
            prompt = [(7 * i + j) % 400 + 10 for j in range(s.context)]
            request = Request(request_id=f"r{i}", prompt_token_ids=prompt,
                              sampling_params=params.clone(), eos_token_id=EOS_ID)
            self.scheduler.add_request(request)
            self.detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt, request.sampling_params)

    def fake_sample(self, output: SchedulerOutput) -> dict[str, int]:
        ids = self.rng.integers(10, 400, size=len(output.scheduled)).tolist()
        return {s.req_id: t for s, t in zip(output.scheduled, ids) if s.do_sample}

    def prefill(self) -> None:
        """Run steps (schedule + update only) until every request is decoding."""
        while True:
            output = self.scheduler.schedule()
            self.scheduler.update_from_output(output, self.fake_sample(output))
            if output.max_query_len <= 1 and self.scheduler.num_waiting == 0:
                return

    def pack(self, output: SchedulerOutput) -> StepInputs:
        """What ModelRunner.execute does before dispatching the model step."""
        shape = self.ladder.shape_for(output.total_num_scheduled_tokens, len(output.scheduled),
                                      decode_only=output.max_query_len == 1)
        inputs = self.packer.pack(output.scheduled, shape)
        if self.check:
            _assert_same("step inputs", inputs, pack_step(
                output.scheduled, shape, block_size=self.setup.block_size,
                table_width=self.ladder.table_width))
        return inputs

    def sampling_tensors(self, output: SchedulerOutput, pad_to: int) -> SamplingTensors:
        """What ModelRunner._sampling_tensors does for the rows that sample."""
        requests = [r for r in output.scheduled if r.do_sample]
        lists = ([r.sampling_params for r in requests], [r.prompt_token_ids for r in requests],
                 [r.output_token_ids for r in requests])
        step_key = self.step_keys(self.num_steps)
        tensors = self.builder.build([r.req_id for r in requests], *lists, pad_to, step_key)
        if self.check:
            _assert_same("sampling tensors", tensors, build_sampling_tensors(
                *lists, (EOS_ID,), pad_to, self.setup.vocab, step_key,
                penalty_width=self.penalty_width))
        self.num_steps += 1
        return tensors

    def step(self, times: dict[str, list[float]]) -> None:
        clock = time.perf_counter
        t0 = clock()
        output = self.scheduler.schedule()
        t1 = clock()
        inputs = self.pack(output)
        t2 = clock()
        _to_device(inputs).block_until_ready()
        t3 = clock()
        tensors = self.sampling_tensors(output, inputs.md.num_seqs)
        t4 = clock()
        _to_device(tensors).block_until_ready()
        t5 = clock()
        updates = self.scheduler.update_from_output(output, self.fake_sample(output))
        t6 = clock()
        for update in updates:
            detokenizer = self.detokenizers[update.request.request_id]
            detokenizer.update(update.new_token_ids)
            detokenizer.get_next_output_text(update.finished, delta=True)
        t7 = clock()
        marks = (t0, t1, t2, t3, t4, t5, t6, t7)
        for part, start, end in zip(PARTS, marks, marks[1:]):
            times[part].append(end - start)


def _assert_same(what: str, got, expected) -> None:
    got_leaves, got_def = jax.tree.flatten(got)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    if got_def != expected_def:
        raise AssertionError(f"{what}: structure {got_def} != {expected_def}")
    for i, (a, b) in enumerate(zip(got_leaves, expected_leaves)):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
            raise AssertionError(
                f"{what}: leaf {i} differs ({a.dtype}{a.shape} vs {b.dtype}{b.shape})")


def run(setup: Setup, tokenizer, steps: int, profile: bool, check: bool) -> dict[str, float]:
    host = FakeHost(setup, tokenizer, steps, check)
    host.prefill()
    warm = {part: [] for part in PARTS}
    for _ in range(3):
        host.step(warm)
    times = {part: [] for part in PARTS}
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    for _ in range(steps):
        host.step(times)
    if profiler:
        profiler.disable()
        print(f"\n--- cProfile: B={setup.batch} temperature={setup.temperature} ---")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    result = {part: statistics.median(v) * 1e6 for part, v in times.items()}
    result["total"] = sum(result.values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--profile", type=int, nargs="*", default=[],
                        help="batch sizes to run under cProfile (printed after the table)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the one-shot pack_step / build_sampling_tensors")
    args = parser.parse_args()
    tokenizer = load_tokenizer(tiny_model_dir())
    columns: dict[str, dict[str, float]] = {}
    for batch in args.batches:
        for temperature in (0.0, 0.6):
            setup = Setup(batch, args.context, args.block_size, args.vocab, temperature)
            name = f"B={batch} {'greedy' if temperature == 0 else f't={temperature}'}"
            columns[name] = run(setup, tokenizer, args.steps, batch in args.profile, args.check)
    note = " (timings include --check)" if args.check else ""
    print(f"\nhost time per decode step, us (median of {args.steps} steps, context "
          f"{args.context}, vocab {args.vocab}, {jax.default_backend()}){note}")
    print(f"{'part':<16}" + "".join(f"{name:>16}" for name in columns))
    for part in (*PARTS, "total"):
        print(f"{part:<16}" + "".join(f"{col[part]:>16.0f}" for col in columns.values()))
    if args.check:
        print("check: every step's inputs and sampling tensors equal the one-shot builders'")


if __name__ == "__main__":
    main()
