"""Command-line arguments of ``jaxpaged serve`` / ``python -m jaxpaged.server``: the server's own
(``--host``, ``--port``, ``--api-key``, ``--served-model-name`` ...) plus the engine's, spelled as
vLLM spells them (``--max-model-len``, ``--gpu-memory-utilization`` ...)."""

from __future__ import annotations

import argparse
import os
import pathlib

from jaxpaged.config import EngineConfig

from jaxpaged.server.settings import ServerSettings

API_KEY_ENV = "JAXPAGED_API_KEY"


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (HF or converted); default: the built-in "
                                   "tiny model, built on first use")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; default: --model as given")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--disable-access-log", action="store_true", help="no line per request")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM/SIGINT wait at most this long for in-flight requests "
                        "(default: until they finish)")
    _add_engine_arguments(p.add_argument_group("engine"))


def _add_engine_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of config.json's shapes, made on the device")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="no tokenizer: token-id prompts only, no text in outputs")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "bfloat16", "bf16", "float32", "fp32"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True)
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument("--max-waiting", type=int, default=None,
                   help="most queued requests; more are answered 503 (default: unbounded)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-logprobs", type=int, default=20)
    g.add_argument("--attention-impl", default="auto", choices=["auto", "pallas", "reference"])
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap scheduling and detokenizing with the device step (default on)")
    g.add_argument("--compilation-cache-dir", default="~/.cache/jaxpaged/xla",
                   help="JAX's persistent compilation cache ('' disables it)")


def resolve_model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from jaxpaged.converters.tiny import default_model_dir
    return str(default_model_dir())


def engine_config_from_args(args: argparse.Namespace, model_dir: str) -> EngineConfig:
    return EngineConfig(
        model=model_dir, load_format=args.load_format, tokenizer=args.tokenizer, skip_tokenizer_init=args.skip_tokenizer_init,
        dtype=args.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        num_gpu_blocks_override=args.num_gpu_blocks_override, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        scheduling_policy=args.scheduling_policy, max_waiting=args.max_waiting, seed=args.seed,
        max_logprobs=args.max_logprobs, attention_impl=args.attention_impl,
        async_scheduling=args.async_scheduling,
        compilation_cache_dir=args.compilation_cache_dir or None)


def server_settings_from_args(args: argparse.Namespace, model_dir: str) -> ServerSettings:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.served_model_name:
        names = tuple(args.served_model_name)
    else:  # vLLM's rule: the --model string; the built-in model goes by its directory name
        names = (args.model or pathlib.Path(model_dir).name,)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return ServerSettings(served_model_names=names, api_key=api_key)
