"""Host (Python) time of one steady decode step, part by part, with a fake runner (no model).

    .venv/bin/python bench/host_overhead.py --batches 64 256 --context 1024 --steps 50
    .venv/bin/python bench/host_overhead.py --profile 256   # cProfile of the timed steps

B requests with ``context``-token prompts are prefilled through the real scheduler (a fake runner
hands back token ids), then ``--steps`` decode steps are timed. Every step runs what the engine's
host does around the model, each part timed on its own:

  schedule         Scheduler.schedule()
  pack_step        BucketLadder.shape_for + step_inputs.pack_step (numpy)
  pack put         device transfer of the packed step inputs (until ready)
  sampling build   the sampling tensors of the step on the host (numpy)
  sampling put     their device transfer (until ready)
  update           Scheduler.update_from_output(...)
  detokenize       IncrementalDetokenizer.update + get_next_output_text (tiny tokenizer)

Two sampling variants are timed: greedy (temperature 0) and temperature 0.6. The vocabulary is
``--vocab`` (Llama-3's 128256) for the sampling tensors; the fake runner samples ids the tiny
tokenizer knows. Numbers are microseconds per step (median over steps).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import time

import jax
import numpy as np

from jaxpaged.buckets import BucketLadder
from jaxpaged.converters.tiny import tiny_model_dir
from jaxpaged.detokenizer import IncrementalDetokenizer
from jaxpaged.request import Request
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.sampling_tensors import SamplingTensorBuilder
from jaxpaged.scheduler import Scheduler, SchedulerConfig
from jaxpaged.scheduler_output import SchedulerOutput
from jaxpaged.step_inputs import pack_step
from jaxpaged.tokenizer import load_tokenizer

PARTS = ("schedule", "pack_step", "pack put", "sampling build", "sampling put", "update",
         "detokenize")
EOS_ID = 1  # never sampled by the fake runner


@dataclasses.dataclass
class Setup:
    batch: int
    context: int
    block_size: int
    vocab: int
    temperature: float


class FakeHost:
    """The host side of an engine with no model: scheduler, packing, sampling set-up, detokenizers."""

    def __init__(self, setup: Setup, tokenizer, steps: int):
        self.setup = setup
        max_model_len = setup.context + steps + 64
        max_tokens = 8192
        self.ladder = BucketLadder.create(max_num_batched_tokens=max_tokens,
                                          max_num_seqs=setup.batch, max_model_len=max_model_len,
                                          block_size=setup.block_size)
        blocks_per_seq = -(-max_model_len // setup.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(max_model_len=max_model_len, max_num_seqs=setup.batch,
                            max_num_batched_tokens=max_tokens, block_size=setup.block_size),
            num_blocks=setup.batch * blocks_per_seq + 1)
        self.builder = SamplingTensorBuilder(vocab_size=setup.vocab, eos_ids=(EOS_ID,),
                                             penalty_width=max_model_len)
        self.tokenizer = tokenizer
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.rng = np.random.default_rng(0)
        self.step_key = jax.random.key(0)
        self._add_requests(steps)

    def _add_requests(self, steps: int) -> None:
        s = self.setup
        params = SamplingParams(temperature=s.temperature, ignore_eos=True, max_tokens=steps + 16)
        for i in range(s.batch):
            prompt = [(7 * i + j) % 400 + 10 for j in range(s.context)]
            request = Request(request_id=f"r{i}", prompt_token_ids=prompt,
                              sampling_params=params.clone(), eos_token_id=EOS_ID)
            self.scheduler.add_request(request)
            self.detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt, request.sampling_params)

    def fake_sample(self, output: SchedulerOutput) -> dict[str, int]:
        ids = self.rng.integers(10, 400, size=len(output.scheduled))
        return {s.req_id: int(t) for s, t in zip(output.scheduled, ids) if s.do_sample}

    def prefill(self) -> None:
        """Run steps (schedule + update only) until every request is decoding."""
        while True:
            output = self.scheduler.schedule()
            if output.max_query_len <= 1 and self.scheduler.num_waiting == 0:
                self.scheduler.update_from_output(output, self.fake_sample(output))
                return
            self.scheduler.update_from_output(output, self.fake_sample(output))

    def step(self, times: dict[str, list[float]]) -> None:
        clock = time.perf_counter
        t0 = clock()
        output = self.scheduler.schedule()
        t1 = clock()
        scheduled = output.scheduled
        shape = self.ladder.shape_for(output.total_num_scheduled_tokens, len(scheduled),
                                      decode_only=output.max_query_len == 1)
        inputs = pack_step(scheduled, shape, block_size=self.setup.block_size,
                           table_width=self.ladder.table_width)
        t2 = clock()
        jax.block_until_ready(jax.device_put(inputs))
        t3 = clock()
        host_tensors = self.builder.build(scheduled, shape.num_seqs, self.step_key)
        t4 = clock()
        jax.block_until_ready(jax.device_put(host_tensors))
        t5 = clock()
        updates = self.scheduler.update_from_output(output, self.fake_sample(output))
        t6 = clock()
        for update in updates:
            detokenizer = self.detokenizers[update.request.request_id]
            detokenizer.update(update.new_token_ids)
            detokenizer.get_next_output_text(update.finished, delta=True)
        t7 = clock()
        for part, (a, b) in zip(PARTS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5),
                                        (t5, t6), (t6, t7))):
            times[part].append(b - a)


def run(setup: Setup, tokenizer, steps: int, profile: bool) -> dict[str, float]:
    host = FakeHost(setup, tokenizer, steps)
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
    args = parser.parse_args()
    tokenizer = load_tokenizer(tiny_model_dir())
    columns: dict[str, dict[str, float]] = {}
    for batch in args.batches:
        for temperature in (0.0, 0.6):
            setup = Setup(batch, args.context, args.block_size, args.vocab, temperature)
            name = f"B={batch} {'greedy' if temperature == 0 else f't={temperature}'}"
            columns[name] = run(setup, tokenizer, args.steps, batch in args.profile)
    print(f"\nhost time per decode step, us (median of {args.steps} steps, "
          f"context {args.context}, vocab {args.vocab}, {jax.default_backend()})")
    print(f"{'part':<16}" + "".join(f"{name:>16}" for name in columns))
    for part in (*PARTS, "total"):
        print(f"{part:<16}" + "".join(f"{col[part]:>16.0f}" for col in columns.values()))


if __name__ == "__main__":
    main()
