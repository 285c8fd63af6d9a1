"""Start-up of the engine: resolving the config's defaults against the model and the backend
(context length, token budget, EOS ids, bucket ladder, KV pool size and dtype, the checkpoint's
fp8 KV scales), JAX's persistent compilation cache, the on-disk cache of compiled step programs,
the checkpoint's dtype, the start-up timings."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp

from jaxpaged.config import KV_CACHE_DTYPES, EngineConfig
from jaxpaged.converters.checkpoint import is_converted
from jaxpaged.converters.gguf_model import gguf_source, resolve_model_path
from jaxpaged.converters.kv_scales import KVScales, read_kv_scales
from jaxpaged.core.scheduler_config import SchedulerConfig
from jaxpaged.engine.tokenizer import load_tokenizer
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.loader import jax_dtype
from jaxpaged.models.tensor_parallel import TensorParallel
from jaxpaged.pallas_kernels.kv_quant import is_fp8
from jaxpaged.runner.buckets import BucketLadder
from jaxpaged.runner.executable_cache import ExecutableCache, environment_fingerprint
from jaxpaged.runner.kv_sizing import (KVPlan, activation_reserve_bytes, fit_max_model_len,
                                       plan_kv_cache)


@dataclasses.dataclass(frozen=True)
class StartupTimings:
    weights_s: float  # config, tokenizer and weights onto the device
    kv_alloc_s: float  # the KV pool
    compile_s: float  # warm-up: every step shape (the persistent cache makes a second start fast)


def enable_compilation_cache(directory: str | None) -> None:
    """Points JAX's persistent compilation cache at ``directory`` unless it is None or the
    application set a cache directory already."""
    if directory is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(directory).expanduser()))
    # Warm start should compile nothing: keep even the sub-second programs (sampler variants).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def open_executable_cache() -> ExecutableCache | None:
    """Compiled step programs kept on disk next to JAX's compilation cache (a warm start then
    neither traces nor lowers them); None when there is no compilation cache directory, and on
    the CPU backend: XLA:CPU executables loaded back into a process that compiled others fail at
    run time ("Function ... not found"), while GPU executables serialize as JAX's own cache
    stores them."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory or jax.default_backend() == "cpu":
        return None
    return ExecutableCache(pathlib.Path(directory) / "jaxpaged-executables",
                           environment_fingerprint())


def compiles_at_start(config: EngineConfig) -> bool:
    """Whether warm-up compiles every step shape at start-up (``compile_step_shapes``)."""
    if config.compile_step_shapes == "auto":
        return jax.default_backend() != "cpu"
    return config.compile_step_shapes == "start"


def read_json(path: pathlib.Path) -> dict:
    """The file's JSON object; {} when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_dtype(dtype: str, model_dir: pathlib.Path) -> str:
    """``EngineConfig.dtype`` as a model-loader dtype ("bf16", "fp32", ...); "auto" follows the
    checkpoint's config.json (float32 stays fp32, anything else runs as bf16)."""
    if dtype != "auto":
        return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
    config = read_json(model_dir / "config.json")
    saved = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return "fp32" if saved == "float32" else "bf16"


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """The engine's sizes once every default is resolved against the model and the backend."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int


def resolve_limits(config: EngineConfig, model_config: ModelConfig, *, on_cpu: bool) -> EngineLimits:
    """``max_model_len``, ``max_num_seqs`` and the step's token budget from the config's values or
    their defaults; a ValueError names the setting that cannot work."""
    limit = model_config.max_position_embeddings
    max_model_len = config.max_model_len or limit
    if max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                         f"max_position_embeddings={limit}")
    max_num_seqs = config.max_num_seqs or (16 if on_cpu else 256)
    return EngineLimits(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=_token_budget(config, max_model_len, max_num_seqs,
                                                             on_cpu=on_cpu))


def _token_budget(config: EngineConfig, max_model_len: int, max_num_seqs: int, *,
                  on_cpu: bool) -> int:
    chunked = config.enable_chunked_prefill
    if config.max_num_batched_tokens is not None:
        value = config.max_num_batched_tokens
    else:
        value = max(512 if on_cpu else 8192, max_num_seqs)
        if not chunked:
            value = max(value, max_model_len)
    if value < max_num_seqs:
        raise ValueError(f"max_num_batched_tokens ({value}) must be >= max_num_seqs "
                         f"({max_num_seqs})")
    if not chunked and value < max_model_len:
        raise ValueError(f"without chunked prefill max_num_batched_tokens ({value}) must be "
                         f">= max_model_len ({max_model_len})")
    return value


def eos_token_ids(model_config: ModelConfig, generation_config: dict,
                  tokenizer) -> tuple[int | None, tuple[int, ...]]:
    """(the EOS id a request stops at by default, every id that ends a sequence: the model's,
    generation_config.json's and the tokenizer's, sorted)."""
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        primary = tokenizer.eos_token_id
    else:
        primary = model_config.eos_token_ids[0] if model_config.eos_token_ids else None
    ids = set(model_config.eos_token_ids)
    extra = generation_config.get("eos_token_id")
    ids.update([extra] if isinstance(extra, int) else extra or [])
    if primary is not None:
        ids.add(primary)
    return primary, tuple(sorted(ids))


def scheduler_config(config: EngineConfig, limits: EngineLimits) -> SchedulerConfig:
    return SchedulerConfig(max_model_len=limits.max_model_len, max_num_seqs=limits.max_num_seqs,
                           max_num_batched_tokens=limits.max_num_batched_tokens,
                           enable_chunked_prefill=config.enable_chunked_prefill,
                           block_size=config.block_size,
                           enable_prefix_caching=config.enable_prefix_caching,
                           policy=config.scheduling_policy, max_waiting=config.max_waiting,
                           async_scheduling=config.async_scheduling)


def bucket_ladder(config: EngineConfig, limits: EngineLimits) -> BucketLadder:
    return BucketLadder.create(max_num_batched_tokens=limits.max_num_batched_tokens,
                               max_num_seqs=limits.max_num_seqs,
                               max_model_len=limits.max_model_len, block_size=config.block_size)


def plan_kv(config: EngineConfig, model_config: ModelConfig, limits: EngineLimits,
            pool_dtype: jnp.dtype, tensor_parallel: TensorParallel | None = None) -> KVPlan:
    """The pool's size; under tensor parallelism from one device's memory and its KV heads."""
    per_device = {}
    if tensor_parallel is not None:
        per_device = dict(num_devices=tensor_parallel.size,
                          kv_heads_per_device=tensor_parallel.kv_heads_per_device(model_config))
    return plan_kv_cache(
        model_config, dtype=pool_dtype, block_size=config.block_size, **per_device,
        max_model_len=limits.max_model_len, max_num_seqs=limits.max_num_seqs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        activation_bytes=activation_reserve_bytes(model_config, limits.max_num_batched_tokens,
                                                  limits.max_num_seqs),
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        num_blocks_override=config.num_gpu_blocks_override)


def fit_limits_to_pool(config: EngineConfig, limits: EngineLimits, plan: KVPlan) -> EngineLimits:
    """``limits`` with max_model_len lowered to the pool when the user did not set it."""
    max_model_len = fit_max_model_len(plan, limits.max_model_len,
                                      may_lower=config.max_model_len is None)
    return dataclasses.replace(limits, max_model_len=max_model_len)


def load_engine_tokenizer(config: EngineConfig, model_dir: pathlib.Path):
    """The tokenizer (``config.tokenizer`` or the model's), or None when the engine runs on token
    ids alone (``skip_tokenizer_init``, or dummy weights in a directory without tokenizer files)."""
    tokenizer_dir = resolve_model_path(config.tokenizer) if config.tokenizer else model_dir
    has_files = any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if config.skip_tokenizer_init or (config.load_format == "dummy" and not has_files):
        return None
    return load_tokenizer(tokenizer_dir)


def kv_pool_dtype(config: EngineConfig, model_dtype: str) -> jnp.dtype:
    """The KV pool's dtype: ``kv_cache_dtype``, or the model's for "auto". A pool that is not fp8
    must have the model's dtype (the attention kernels read it with the model's queries)."""
    name = KV_CACHE_DTYPES[config.kv_cache_dtype]
    model = jax_dtype(model_dtype)
    pool = jnp.dtype(name) if name is not None else model
    if not is_fp8(pool) and pool != model:
        raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} needs a {pool.name} model, "
                         f"this one runs in {model.name}: use 'auto' or an fp8 kv_cache_dtype")
    return pool


def checkpoint_kv_scales(config: EngineConfig, model_dir: pathlib.Path, model_config: ModelConfig,
                         pool_dtype: jnp.dtype) -> KVScales | None:
    """The checkpoint's fp8 KV scales when the pool is fp8 and they are not to be calibrated
    (other pools never read them: a second pass over a checkpoint costs its load time)."""
    if (not is_fp8(pool_dtype) or config.load_format == "dummy" or config.calculate_kv_scales
            or gguf_source(model_dir) is not None):  # a GGUF file carries no KV-cache scales
        return None
    return read_kv_scales(model_dir, model_config.num_layers, converted=is_converted(model_dir))
