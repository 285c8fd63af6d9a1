"""Start-up helpers of the engine: JAX's persistent compilation cache, the on-disk cache of
compiled step programs, the model directory's JSON files and dtype, and the start-up timings."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from jaxpaged.executable_cache import ExecutableCache, environment_fingerprint


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
