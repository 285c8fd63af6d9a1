"""Soak: thousands of requests, hostile and innocent mixed, against one in-process server; every
request must be accounted for and nothing may leak.

    python bench/soak.py --requests 10000                 # the tiny model, on the CPU is fine
    python bench/soak.py --model DIR --requests 10000 --out soak.json

A robustness count, not a speed number. The mix (seeded, so every run sends the same workload):
streamed and whole completions and chats, ``n`` > 1, long prompts, clients killed mid-request,
oversize bodies (413), hostile fields (huge numbers, lone surrogates, wrong types, text bodies:
4xx), and engine faults injected through the engine's step hook (``jaxpaged.engine.faults``:
the faulted request gets a 500, the others beside it finish). Afterwards:

- every request is accounted for: each ended as its kind expects (``unexpected`` must be 0);
- no request is left in the engine and every KV block is back in the pool;
- the process's RSS and open file descriptors are flat: the last window of ``--window`` requests
  may exceed the first by at most ``--rss-bound-mib`` MiB and ``--fd-bound`` descriptors.

Prints a JSON report (also to ``--out``); exits 1 when any check fails. ``run_soak`` is what the
CI test calls with a few hundred requests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import random
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx
import psutil

MODEL_NAME = "soak"
KINDS = ("stream", "whole", "chat", "chat_stream", "n_best", "long", "kill", "oversize",
         "hostile", "fault")
WEIGHTS = (20, 14, 10, 8, 8, 6, 10, 4, 16, 4)
HOSTILE_BODIES = [
    b'{"prompt": "x", "min_tokens": 9223372036854775808}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"prompt": "x", "stop": ' + json.dumps([f"s{i}" for i in range(5000)]).encode() + b'}',
    b'{"prompt": [[5]], "n": "many"}',
    b'{"prompt": ["a", [1]]}',
    b'{"prompt": "x", "temperature": 1e999}',
    b'{"prompt": "x", "seed": ' + b"9" * 5000 + b'}',
    b"[" * 5000 + b"]" * 5000,
    b'{"prompt": "x", "logit_bias": {"1": "big"}}',
    b'{"prompt": "x", "unknown": {"a": [null, {"b": NaN}]}}',
]


@dataclasses.dataclass
class SoakReport:
    requests: int
    outcomes: dict[str, int]  # "kind:ending" -> count
    unexpected: list[str]  # the first few surprises (kind, status, detail)
    unfinished_in_engine: int
    leaked_blocks: int
    rss_mib: list[float]  # after each window
    open_fds: list[int]
    rss_growth_mib: float
    fd_growth: int
    ok: bool


def _body(kind: str, rng: random.Random, max_model_len: int) -> dict:
    prompt_len = rng.randint(max_model_len // 2, max_model_len - 20) if kind == "long" else \
        rng.randint(1, 12)
    body = {"model": MODEL_NAME, "max_tokens": rng.randint(1, 12),
            "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 1000)}
    if kind.startswith("chat"):
        body["messages"] = [{"role": "user", "content": " ".join(
            rng.choice(["hi", "soak", "test", "words"]) for _ in range(prompt_len))}]
    else:
        body["prompt"] = [rng.randint(5, 250) for _ in range(prompt_len)]
    if kind in ("stream", "chat_stream", "kill"):
        body["stream"] = True
    if kind == "n_best":
        body["n"] = rng.randint(2, 4)
    if kind == "kill":
        body.update(max_tokens=min(60, max_model_len - prompt_len - 1), ignore_eos=True)
    return body


async def _one(c: httpx.AsyncClient, kind: str, index: int, rng: random.Random, faults,
               max_model_len: int, max_body_bytes: int) -> tuple[str, str | None]:
    """(ending, surprise or None) of one request."""
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    headers = {"content-type": "application/json", "x-request-id": f"soak-{index}"}
    if kind == "oversize":
        content = b'{"prompt": "' + b"x" * (max_body_bytes + 1) + b'"}'
        r = await c.post(path, content=content, headers=headers)
        return _expect(kind, r, {413})
    if kind == "hostile":
        content = rng.choice(HOSTILE_BODIES)
        if rng.random() < 0.2:
            headers["content-type"] = "text/plain"
        r = await c.post(path, content=content, headers=headers)
        return _expect(kind, r, set(range(400, 500)))
    body = _body(kind, rng, max_model_len)
    if kind == "fault":
        faults.fail_request(f"cmpl-soak-{index}-")  # armed before it exists: its first step
        r = await c.post(path, json=body, headers=headers)
        return _expect(kind, r, {500})
    if kind == "kill":
        task = asyncio.create_task(_read_stream(c, path, body, headers))
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "killed", None
        except httpx.HTTPError:
            return "killed", None
        return "finished before the kill", None
    if body.get("stream"):
        status, lines = await _read_stream(c, path, body, headers)
        if status != 200 or not lines or lines[-1] != "data: [DONE]" or any(
                '"error"' in line for line in lines):
            return "bad stream", f"{kind} {status} {lines[-2:]}"
        return "200", None
    r = await c.post(path, json=body, headers=headers)
    return _expect(kind, r, {200})


async def _read_stream(c, path, body, headers) -> tuple[int, list[str]]:
    async with c.stream("POST", path, json=body, headers=headers) as r:
        return r.status_code, [line async for line in r.aiter_lines() if line.startswith("data:")]


def _expect(kind: str, r: httpx.Response, statuses: set[int]) -> tuple[str, str | None]:
    if r.status_code not in statuses:
        return str(r.status_code), f"{kind} {r.status_code} {r.text[:200]}"
    if r.status_code >= 400:
        error = r.json().get("error") if r.headers.get("content-type", "").startswith(
            "application/json") else None
        if not (isinstance(error, dict) and error.get("message")):
            return str(r.status_code), f"{kind} {r.status_code}: no OpenAI error JSON"
    return str(r.status_code), None


async def _window(base_url: str, start: int, count: int, concurrency: int, seed: int, faults,
                  max_model_len: int, max_body_bytes: int, outcomes: Counter,
                  unexpected: list[str]) -> None:
    rng = random.Random(seed + start)
    semaphore = asyncio.Semaphore(concurrency)

    async def run(i: int, kind: str, request_rng: random.Random) -> None:
        async with semaphore:
            try:
                ending, surprise = await asyncio.wait_for(
                    _one(c, kind, i, request_rng, faults, max_model_len, max_body_bytes), 300)
            except Exception as e:  # a hang or a transport error: a surprise
                ending, surprise = "exception", f"{kind} {type(e).__name__}: {e}"
            outcomes[f"{kind}:{ending}"] += 1
            if surprise is not None and len(unexpected) < 1000:
                unexpected.append(surprise)

    async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:
        jobs = [(i, rng.choices(KINDS, WEIGHTS)[0], random.Random(rng.random()))
                for i in range(start, start + count)]
        await asyncio.gather(*(run(i, k, r) for i, k, r in jobs))


def _open_connections(process: psutil.Process) -> list:
    """This process's TCP connections that are not listening sockets."""
    return [c for c in process.net_connections(kind="tcp") if c.status != psutil.CONN_LISTEN]


def run_soak(base_url: str, engine, faults, *, requests: int, window: int, concurrency: int,
             seed: int = 0, max_body_bytes: int, rss_bound_mib: float,
             fd_bound: int) -> SoakReport:
    """Sends ``requests`` requests in windows of ``window``; samples RSS and fds after each."""
    process = psutil.Process()
    outcomes: Counter = Counter()
    unexpected: list[str] = []
    rss, fds = [], []
    for start in range(0, requests, window):
        asyncio.run(_window(base_url, start, min(window, requests - start), concurrency, seed,
                            faults, engine.max_model_len, max_body_bytes, outcomes, unexpected))
        _wait(lambda: not engine.has_unfinished_requests(), 60)
        # the server closes the window's connections as their clients go: sample once it has
        # (else a sample counts sockets still closing, not leaked descriptors)
        _wait(lambda: not _open_connections(process), 15)
        rss.append(process.memory_info().rss / 2**20)
        fds.append(process.num_fds())
    block_manager = engine.scheduler.block_manager
    _wait(lambda: block_manager.num_free_blocks == block_manager.num_blocks - 1, 30)
    leaked = block_manager.num_blocks - 1 - block_manager.num_free_blocks
    rss_growth, fd_growth = rss[-1] - rss[0], fds[-1] - fds[0]
    accounted = sum(outcomes.values()) == requests
    ok = (not unexpected and accounted and leaked == 0
          and not engine.has_unfinished_requests()
          and rss_growth <= rss_bound_mib and fd_growth <= fd_bound)
    return SoakReport(requests=requests, outcomes=dict(sorted(outcomes.items())),
                      unexpected=unexpected[:20],
                      unfinished_in_engine=engine.get_num_unfinished_requests(),
                      leaked_blocks=leaked, rss_mib=[round(r, 1) for r in rss], open_fds=fds,
                      rss_growth_mib=round(rss_growth, 1), fd_growth=fd_growth, ok=ok)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def serve_in_process(model_dir: str, faults, max_body_bytes: int):
    """(base url, engine, uvicorn server, thread): the real app under uvicorn on loopback, with
    the serve command's connection guards."""
    import uvicorn

    from jaxpaged.config import EngineConfig
    from jaxpaged.engine.llm_engine import LLMEngine
    from jaxpaged.server.app import build_app
    from jaxpaged.server.http_protocol import timed_h11_protocol
    from jaxpaged.server.settings import ServerSettings

    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32", max_model_len=128,
                                    max_num_seqs=8, max_num_batched_tokens=64,
                                    num_gpu_blocks_override=64, seed=0, max_waiting=256),
                       step_hook=faults)
    app = build_app(engine, ServerSettings(served_model_names=(MODEL_NAME,),
                                           max_body_bytes=max_body_bytes,
                                           max_prompts_per_request=8))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                           lifespan="on", limit_concurrency=512,
                                           http=timed_h11_protocol(30.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if not _wait(lambda: server.started or not thread.is_alive(), 300) or not server.started:
        raise RuntimeError("the soak server did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", engine, server, thread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: a tiny model)")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--window", type=int, default=1000, help="requests between RSS/fd samples")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-body-bytes", type=int, default=256 * 1024)
    p.add_argument("--rss-bound-mib", type=float, default=64.0)
    p.add_argument("--fd-bound", type=int, default=16)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    from jaxpaged.engine.faults import FaultInjector

    model_dir = args.model
    if model_dir is None:
        from jaxpaged.converters.tiny import build_tiny_checkpoint
        model_dir = str(build_tiny_checkpoint("llama3-rope", pathlib.Path(
            tempfile.mkdtemp(prefix="soak-")) / "tiny", dtype="float32"))
    faults = FaultInjector()
    base_url, engine, server, thread = serve_in_process(model_dir, faults, args.max_body_bytes)
    try:
        report = run_soak(base_url, engine, faults, requests=args.requests, window=args.window,
                          concurrency=args.concurrency, seed=args.seed,
                          max_body_bytes=args.max_body_bytes, rss_bound_mib=args.rss_bound_mib,
                          fd_bound=args.fd_bound)
    finally:
        server.should_exit = True
        thread.join(60)
    text = json.dumps(dataclasses.asdict(report), indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
