"""Online serving benchmark (BENCHMARKS.md, workload **serve**) against a running server.

    jaxpaged serve --model DIR ... &            # or any OpenAI-compatible server
    python bench/serving.py --base-url http://127.0.0.1:8000 --rates 4 16 64 inf --out serve.json

512 requests (``--num-requests``) with random token-id prompts of 100-1024 tokens and 100-512
output tokens (``ignore_eos``), seeded so every run sends the same workload; streamed
``/v1/completions``. Arrivals are Poisson at each rate in ``--rates`` (requests/s), ``inf`` meaning
all at once. Reported per rate: TTFT, TPOT = (latency - TTFT) / (output tokens - 1), ITL (gaps
between streamed chunks) and end-to-end latency at mean/p50/p99, output tokens/s, goodput
(requests with TTFT <= 1 s and TPOT <= 50 ms, per second), and failed requests with reasons.

The server needs ``--max-model-len`` >= 1536 for the default lengths (1024 + 512), and both
processes need file descriptors for one connection per request (``ulimit -n`` above 1024 when
``--num-requests`` is large). Only the standard library and httpx: it runs on the GPU machine,
which has no ``openai`` package. Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from collections import Counter

import httpx


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclasses.dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # perf_counter when sent
    ttft: float | None = None  # seconds to the first streamed token chunk
    latency: float | None = None  # seconds to [DONE]
    chunk_gaps: list[float] = dataclasses.field(default_factory=list)  # ITL samples
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  max_token_id: int, seed: int) -> list[BenchRequest]:
    """First every prompt, then every output length (nano's order), from one seeded stream."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_token_id) for _ in range(rng.randint(*prompt_len))]
               for _ in range(num_requests)]
    return [BenchRequest(p, rng.randint(*output_len)) for p in prompts]


def arrival_offsets(num_requests: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: Poisson arrivals at ``rate``/s, or all at 0."""
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed + 1)
    t, offsets = 0.0, []
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def send_one(client: httpx.AsyncClient, model: str, request: BenchRequest,
                   temperature: float) -> RequestResult:
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
            "temperature": temperature, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result = RequestResult(start=time.perf_counter())
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                data = line[len("data: "):]
                if data == "[DONE]":
                    result.latency = now - result.start
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {event['error'].get('code')}"
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if event.get("choices"):
                    if result.ttft is None:
                        result.ttft = now - result.start
                    else:
                        result.chunk_gaps.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        result.error = type(e).__name__
        return result
    if result.latency is None or result.ttft is None:
        result.error = "stream ended early"
    elif result.output_tokens != request.max_tokens:
        result.error = "wrong output length"
    else:
        result.ok = True
    return result


async def run_rate(base_url: str, model: str, workload: list[BenchRequest], rate: float,
                   args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    offsets = arrival_offsets(len(workload), rate, args.seed)
    limits = httpx.Limits(max_connections=len(workload), max_keepalive_connections=len(workload))
    timeout = httpx.Timeout(args.timeout, connect=60.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout,
                                 headers=_auth(args)) as client:
        start = time.perf_counter()

        async def delayed(offset: float, request: BenchRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await send_one(client, model, request, args.temperature)

        results = await asyncio.gather(*(delayed(o, r) for o, r in zip(offsets, workload)))
        return list(results), time.perf_counter() - start


def _auth(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean / p50 / p99 (in ms by default) of ``values``; None when empty."""
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:  # linear interpolation between closest ranks
        position = q * (len(ordered) - 1)
        low, high = math.floor(position), math.ceil(position)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"mean": scale * sum(ordered) / len(ordered), "p50": scale * pick(0.5),
            "p99": scale * pick(0.99)}


def summarize(results: list[RequestResult], duration: float, rate: float,
              args: argparse.Namespace) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    good = [r for r in done if r.ttft <= args.goodput_ttft and (r.tpot or 0.0) <= args.goodput_tpot]
    return {
        "rate": "inf" if math.isinf(rate) else rate,
        "num_requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "failure_reasons": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tok_s": output_tokens / duration,
        "total_tok_s": (output_tokens + sum(r.prompt_tokens for r in done)) / duration,
        "goodput_req_s": len(good) / duration,
        "goodput_fraction": len(good) / len(results) if results else 0.0,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": percentiles([g for r in done for g in r.chunk_gaps]),
        "e2e_ms": percentiles([r.latency for r in done]),
    }


def print_summary(summary: dict) -> None:
    def fmt(stats: dict) -> str:
        return "/".join("-" if stats[k] is None else f"{stats[k]:.1f}" for k in ("p50", "p99"))

    print(f"rate {summary['rate']:>5} req/s: {summary['completed']}/{summary['num_requests']} ok, "
          f"{summary['failed']} failed {summary['failure_reasons'] or ''}| "
          f"{summary['output_tok_s']:.1f} out tok/s, goodput {summary['goodput_req_s']:.2f} req/s"
          f" ({100 * summary['goodput_fraction']:.0f}%) | p50/p99 ms: TTFT {fmt(summary['ttft_ms'])}"
          f", TPOT {fmt(summary['tpot_ms'])}, ITL {fmt(summary['itl_ms'])}, "
          f"e2e {fmt(summary['e2e_ms'])}", flush=True)


def served_model(base_url: str, args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    response = httpx.get(f"{base_url}/v1/models", headers=_auth(args), timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def warm_up(base_url: str, model: str, args: argparse.Namespace) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=args.timeout,
                                 headers=_auth(args)) as client:
        result = await send_one(client, model, BenchRequest([1, 2, 3, 4], 4), args.temperature)
    if not result.ok:
        raise SystemExit(f"warm-up request failed: {result.error}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, 64.0, math.inf],
                   help="requests/s of the Poisson arrivals; inf = all at once")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[100, 512], metavar=("MIN", "MAX"))
    p.add_argument("--max-token-id", type=int, default=10000,
                   help="prompt token ids are drawn from [0, MAX] (keep it below the vocab size)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput-ttft", type=float, default=1.0, help="seconds")
    p.add_argument("--goodput-tpot", type=float, default=0.05, help="seconds")
    p.add_argument("--timeout", type=float, default=1800.0, help="per request, seconds")
    p.add_argument("--out", default=None, help="write the summaries as JSON here")
    args = p.parse_args(argv)
    for name in ("prompt_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            p.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {low} {high}")
    if args.num_requests < 1 or any(not r > 0 for r in args.rates):
        p.error("--num-requests and every rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_url = args.base_url.rstrip("/")
    model = served_model(base_url, args)
    workload = make_workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len),
                             args.max_token_id, args.seed)
    asyncio.run(warm_up(base_url, model, args))
    summaries = []
    for rate in args.rates:
        results, duration = asyncio.run(run_rate(base_url, model, workload, rate, args))
        summaries.append(summarize(results, duration, rate, args))
        print_summary(summaries[-1])
    report = {"base_url": base_url, "model": model, "num_requests": args.num_requests,
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "temperature": args.temperature, "seed": args.seed, "results": summaries}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if any(s["failed"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
