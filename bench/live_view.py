"""Host cost of the page's live view (server/live_view.py) on the engine thread, with no model.

    .venv/bin/python bench/live_view.py                       # pools of 16k, 64k and 256k blocks
    .venv/bin/python bench/live_view.py --blocks 200000 --batch 256 --context 1024 --out DIR

B requests of ``context`` prompt tokens are scheduled through the real scheduler (their blocks
allocated, half of them sharing a prefix-cache hit), then timed:

  record_step   LiveView.record_step, paid by every engine step
  block_states  live_view.block_states (numpy over the pool's ref-count mirrors)
  snapshot      LiveView.snapshot: block_states + the cells + counts + the running requests
  per step      what a step pays on average: record_step + snapshot * step_s / interval_s (a
                snapshot is built at most once per interval_s; --step-ms gives step_s)

Numbers are microseconds (median of --repeats).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

from jaxpaged.core.request import Request
from jaxpaged.core.scheduler import Scheduler, SchedulerConfig
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.server.live_view import LiveView, block_states

BLOCK_SIZE = 16


def filled_scheduler(num_blocks: int, batch: int, context: int) -> Scheduler:
    """A scheduler whose ``batch`` running requests hold their prompts' blocks; odd requests
    repeat the previous one's prompt, so they share its blocks through the prefix cache."""
    config = SchedulerConfig(max_model_len=context + 16, max_num_seqs=batch,
                             max_num_batched_tokens=batch * context, block_size=BLOCK_SIZE)
    scheduler = Scheduler(config, num_blocks)
    for i in range(batch):
        base = (i // 2) * context
        tokens = list(range(base, base + context))
        scheduler.add_request(Request(f"r{i}", tokens, SamplingParams(max_tokens=16)))
        scheduler.schedule()
        # the prompt's K/V are now "computed": its full blocks enter the prefix cache
        for request in scheduler.running:
            request.num_computed_tokens = request.num_tokens - 1
            scheduler.block_manager.cache_full_blocks(request)
    return scheduler


def _median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def measure(num_blocks: int, batch: int, context: int, step_ms: float, repeats: int) -> dict:
    scheduler = filled_scheduler(num_blocks, batch, context)
    view = LiveView()
    now = time.time()
    for second in range(60):  # a full minute of history
        view.record_step(now - 60 + second, step_ms / 1e3, batch)
    row = {"num_blocks": num_blocks, "batch": batch, "context": context, "step_ms": step_ms,
           "blocks_in_use": num_blocks - 1 - scheduler.block_manager.num_free_blocks,
           "record_step": _median_us(lambda: view.record_step(now, step_ms / 1e3, batch),
                                     repeats),
           "block_states": _median_us(lambda: block_states(scheduler.block_manager.pool),
                                     repeats),
           "snapshot": _median_us(lambda: view.snapshot(scheduler, now), repeats)}
    row["snapshot_json_bytes"] = len(json.dumps(view.snapshot(scheduler, now)))
    row["per_step"] = row["record_step"] + row["snapshot"] * min(
        1.0, step_ms / 1e3 / view.interval_s)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--step-ms", type=float, default=10.0,
                        help="the engine's step time, for the per-step average")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=pathlib.Path, help="also write live_view.json here")
    args = parser.parse_args()
    rows = [measure(n, args.batch, args.context, args.step_ms, args.repeats)
            for n in args.blocks]
    print(f"{'blocks':>8} {'in use':>7} {'record_step':>12} {'block_states':>13} "
          f"{'snapshot':>9} {'per step':>9}   (us; step {args.step_ms} ms, batch {args.batch})")
    for r in rows:
        print(f"{r['num_blocks']:>8} {r['blocks_in_use']:>7} {r['record_step']:>12.2f} "
              f"{r['block_states']:>13.1f} {r['snapshot']:>9.1f} {r['per_step']:>9.2f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "live_view.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
