"""The persistent executable cache: hits skip lowering, misses compile and store, and a broken
entry or cache never fails the caller."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import subprocess
import sys
import threading
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpaged.runner import executable_cache
from jaxpaged.runner.executable_cache import (
    ExecutableCache,
    abstract_signature,
    environment_fingerprint,
)

FINGERPRINT = "test-fingerprint"
REPO = pathlib.Path(__file__).resolve().parents[1]


@jax.jit
def _affine(x, y):
    return x @ y + 1.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """A registered dataclass with a static field, donated like the KV pool."""

    k: jax.Array  # f32[N, D]
    scale: float = dataclasses.field(metadata=dict(static=True))


@functools.partial(jax.jit, static_argnames=("graphdef", "offset"), donate_argnames=("pool",))
def _model_like(graphdef, state, pool: Pool, x: jax.Array, *, offset: int):
    """An nnx module applied to x f32[B, D]; writes its output into the pool's first rows."""
    y = nnx.merge(graphdef, state)(x) * pool.scale + offset  # [B, D]
    return y, dataclasses.replace(pool, k=pool.k.at[:x.shape[0]].set(y))


class CountingLower:
    """The ``lower`` callable handed to the cache; counts how often the cache needs it."""

    def __init__(self, fn, *args, **kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> jax.stages.Lowered:
        with self._lock:
            self.calls += 1
        return self.fn.lower(*self.args, **self.kwargs)

    @property
    def signature(self) -> str:
        return abstract_signature(*self.args, self.kwargs)


def _affine_lower(n: int = 4) -> CountingLower:
    x = np.arange(n * n, dtype=np.float32).reshape(n, n) / 10
    return CountingLower(_affine, x, np.eye(n, dtype=np.float32) * 2)


def _model_args(scale: float = 0.5):
    graphdef, state = nnx.split(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    pool = Pool(k=jnp.zeros((6, 8), jnp.float32), scale=scale)
    x = jnp.asarray(np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8))
    return graphdef, state, pool, x


def _entry_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(directory.rglob("*.jaxexec"))


def test_second_cache_loads_without_lowering_and_matches(tmp_path):
    lower = _affine_lower()
    first = ExecutableCache(tmp_path, FINGERPRINT)
    expected = np.asarray(first.get_or_compile("affine", lower.signature, lower)(*lower.args))
    assert lower.calls == 1
    assert (first.stats.hits, first.stats.misses) == (0, 1)
    assert len(_entry_files(tmp_path)) == 1

    second = ExecutableCache(tmp_path, FINGERPRINT)
    loaded = second.get_or_compile("affine", lower.signature, lower)
    assert lower.calls == 1  # not traced, lowered or compiled again
    assert (second.stats.hits, second.stats.misses) == (1, 0)
    np.testing.assert_array_equal(np.asarray(loaded(*lower.args)), expected)
    np.testing.assert_array_equal(expected, np.asarray(_affine(*lower.args)))


def test_loaded_executable_runs_on_the_devices_it_was_compiled_for(tmp_path):
    """On a host of several devices (conftest's fake CPU devices) an entry compiled for one
    device, or for a mesh of two, loads onto those devices, not onto all of them."""
    devices = jax.devices()
    assert len(devices) >= 4
    mesh = jax.sharding.Mesh(np.array(devices[2:4]), ("tp",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tp"))
    for name, placement in (("one", devices[1]), ("mesh", split)):
        x = jax.device_put(np.arange(8, dtype=np.float32), placement)
        lower = lambda: _affine.lower(x, x)  # noqa: E731
        ExecutableCache(tmp_path, FINGERPRINT).get_or_compile(name, name, lower)
        cache = ExecutableCache(tmp_path, FINGERPRINT)
        loaded = cache.get_or_compile(name, name, lower)
        assert cache.stats.hits == 1
        out = loaded(x, x)
        assert out.sharding.device_set == x.sharding.device_set
        np.testing.assert_array_equal(np.asarray(out), np.asarray(_affine(x, x)))


def test_loaded_executable_keeps_dataclass_trees_nnx_state_and_donation(tmp_path):
    graphdef, state, pool, x = _model_args()
    lower = CountingLower(_model_like, graphdef, state, pool, x, offset=3)
    compiled = ExecutableCache(tmp_path, FINGERPRINT).get_or_compile(
        "model_like", lower.signature, lower)
    want_y, want_pool = compiled(state, pool, x)
    assert pool.k.is_deleted()  # donated

    loaded = ExecutableCache(tmp_path, FINGERPRINT).get_or_compile(
        "model_like", lower.signature, lower)
    assert lower.calls == 1
    fresh_pool = Pool(k=jnp.zeros((6, 8), jnp.float32), scale=0.5)
    got_y, got_pool = loaded(state, fresh_pool, x)
    assert fresh_pool.k.is_deleted()  # the loaded executable still donates the pool
    assert isinstance(got_pool, Pool) and got_pool.scale == 0.5
    np.testing.assert_array_equal(np.asarray(got_y), np.asarray(want_y))
    np.testing.assert_array_equal(np.asarray(got_pool.k), np.asarray(want_pool.k))
    assert np.asarray(got_y).std() > 0  # a real computation, not zeros


def test_other_fingerprint_name_or_signature_misses(tmp_path):
    lower = _affine_lower()
    ExecutableCache(tmp_path, FINGERPRINT).get_or_compile("affine", lower.signature, lower)

    other_fingerprint = ExecutableCache(tmp_path, FINGERPRINT + "-2")
    other_fingerprint.get_or_compile("affine", lower.signature, lower)
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    cache.get_or_compile("affine-2", lower.signature, lower)
    larger = _affine_lower(8)
    assert larger.signature != lower.signature
    result = cache.get_or_compile("affine", larger.signature, larger)
    assert lower.calls == 3 and larger.calls == 1
    assert (other_fingerprint.stats.misses, cache.stats.misses, cache.stats.hits) == (1, 2, 0)
    assert result(*larger.args).shape == (8, 8)
    assert len(_entry_files(tmp_path)) == 4


def test_compiler_options_reach_the_compile_and_the_key(tmp_path):
    """Options are part of the key: the same program with other options is compiled anew."""
    lower = _affine_lower()
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    plain = cache.get_or_compile("affine", lower.signature, lower)
    tuned = cache.get_or_compile("affine", lower.signature, lower,
                                 {"xla_cpu_enable_fast_math": True})
    again = ExecutableCache(tmp_path, FINGERPRINT).get_or_compile(
        "affine", lower.signature, lower, {"xla_cpu_enable_fast_math": True})
    assert lower.calls == 2 and cache.stats.misses == 2
    assert len(_entry_files(tmp_path)) == 2
    for compiled in (plain, tuned, again):
        np.testing.assert_allclose(np.asarray(compiled(*lower.args)),
                                   np.asarray(plain(*lower.args)), rtol=1e-6)
    with pytest.raises(Exception, match="no_such_option"):
        cache.get_or_compile("affine", lower.signature, lower, {"xla_no_such_option": True})


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped_byte", "empty"])
def test_damaged_entry_is_recompiled_and_replaced(tmp_path, damage, caplog):
    lower = _affine_lower()
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    expected = np.asarray(cache.get_or_compile("affine", lower.signature, lower)(*lower.args))
    path = cache.path("affine", lower.signature)
    data = path.read_bytes()
    damaged = {"garbage": b"not an executable" * 10, "truncated": data[:len(data) // 2],
               "flipped_byte": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],
               "empty": b""}[damage]
    path.write_bytes(damaged)

    recovering = ExecutableCache(tmp_path, FINGERPRINT)
    result = recovering.get_or_compile("affine", lower.signature, lower)
    assert lower.calls == 2
    assert recovering.stats.load_failures == 1 and recovering.stats.misses == 1
    assert "cannot load" in caplog.text
    np.testing.assert_array_equal(np.asarray(result(*lower.args)), expected)
    assert path.read_bytes() != damaged  # replaced by a good entry

    ExecutableCache(tmp_path, FINGERPRINT).get_or_compile("affine", lower.signature, lower)
    assert lower.calls == 2


def test_entry_renamed_to_another_key_is_not_loaded(tmp_path):
    small, large = _affine_lower(4), _affine_lower(8)
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    cache.get_or_compile("affine", small.signature, small)
    cache.path("affine", small.signature).rename(cache.path("affine", large.signature))

    result = ExecutableCache(tmp_path, FINGERPRINT).get_or_compile("affine", large.signature,
                                                                   large)
    assert large.calls == 1
    assert result(*large.args).shape == (8, 8)


def test_disabled_cache_always_compiles(tmp_path):
    lower = _affine_lower()
    cache = ExecutableCache(None, FINGERPRINT)
    assert not cache.enabled and cache.path("affine", lower.signature) is None
    for _ in range(2):
        cache.get_or_compile("affine", lower.signature, lower)
    assert lower.calls == 2
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)


def test_uncreatable_directory_disables_the_cache(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    cache = ExecutableCache(blocker / "cache", FINGERPRINT)
    assert not cache.enabled
    lower = _affine_lower()
    assert cache.get_or_compile("affine", lower.signature, lower)(*lower.args).shape == (4, 4)
    assert "executable cache disabled" in caplog.text


def test_store_failure_still_returns_the_executable(tmp_path, monkeypatch, caplog):
    def refuse(compiled):
        raise NotImplementedError("serialize_executables with const_args")

    monkeypatch.setattr(executable_cache.serialize_executable, "serialize", refuse)
    lower = _affine_lower()
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    result = cache.get_or_compile("affine", lower.signature, lower)
    np.testing.assert_array_equal(np.asarray(result(*lower.args)),
                                  np.asarray(_affine(*lower.args)))
    assert cache.stats.store_failures == 1 and "cannot store" in caplog.text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no entry, no temporary file


def test_threads_asking_for_one_key_compile_it_once(tmp_path):
    lower = _affine_lower()
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    barrier = threading.Barrier(4)
    results = [None] * 4

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = np.asarray(cache.get_or_compile("affine", lower.signature, lower)(
            *lower.args))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lower.calls == 1
    assert (cache.stats.misses, cache.stats.hits) == (1, 3)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_concurrent_writers_of_one_entry_leave_a_loadable_file(tmp_path):
    """Separate cache objects (like two engine processes) race to write the same entry."""
    lower = _affine_lower()
    caches = [ExecutableCache(tmp_path, FINGERPRINT) for _ in range(3)]
    barrier = threading.Barrier(len(caches))

    def worker(cache: ExecutableCache) -> None:
        barrier.wait()
        cache.get_or_compile("affine", lower.signature, lower)

    threads = [threading.Thread(target=worker, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not list(tmp_path.rglob("*.tmp"))
    calls = lower.calls
    reader = ExecutableCache(tmp_path, FINGERPRINT)
    result = reader.get_or_compile("affine", lower.signature, lower)
    assert lower.calls == calls and reader.stats.hits == 1
    np.testing.assert_array_equal(np.asarray(result(*lower.args)),
                                  np.asarray(_affine(*lower.args)))


@pytest.mark.slow
def test_another_process_loads_the_entry(tmp_path):
    lower = _affine_lower()
    expected = np.asarray(ExecutableCache(tmp_path, FINGERPRINT).get_or_compile(
        "affine", lower.signature, lower)(*lower.args))
    np.save(tmp_path / "args.npy", np.stack(lower.args))
    child = f"""
import numpy as np
from jaxpaged.runner.executable_cache import ExecutableCache, abstract_signature
x, y = np.load({str(tmp_path / "args.npy")!r})
def lower():
    raise AssertionError("the entry should have been loaded")
cache = ExecutableCache({str(tmp_path)!r}, {FINGERPRINT!r})
out = cache.get_or_compile("affine", abstract_signature(x, y, {{}}), lower)(x, y)
np.save({str(tmp_path / "out.npy")!r}, np.asarray(out))
print(cache.stats.hits)
"""
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "1"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_args_signature_must_be_a_string(tmp_path):
    with pytest.raises(TypeError, match="args_signature"):
        ExecutableCache(tmp_path, FINGERPRINT).key("affine", ("not", "a", "string"))
    with pytest.raises(ValueError, match="fingerprint"):
        ExecutableCache(tmp_path, "")


# ----- abstract_signature -----


def test_signature_ignores_values_but_not_shapes_dtypes_or_statics():
    graphdef, state, pool, x = _model_args()
    base = abstract_signature(graphdef, state, pool, x, 3)
    assert abstract_signature(graphdef, state, pool, x * 2 + 1, 3) == base
    assert abstract_signature(graphdef, state, pool, np.asarray(x), 3) != base  # numpy vs device
    variants = [
        (graphdef, state, pool, x[:2], 3),  # shape
        (graphdef, state, pool, x.astype(jnp.bfloat16), 3),  # dtype
        (graphdef, state, Pool(k=pool.k, scale=0.25), x, 3),  # static dataclass field
        (graphdef, state, pool, x, 4),  # static scalar
        (graphdef, state, pool, x, 3.0),  # its type
        (graphdef, state, (pool,), x, 3),  # structure
        (*nnx.split(nnx.Linear(8, 8, use_bias=False, rngs=nnx.Rngs(0))), pool, x, 3),  # module
    ]
    signatures = {abstract_signature(*args) for args in variants}
    assert len(signatures) == len(variants) and base not in signatures


def test_signature_tells_weak_types_apart():
    assert abstract_signature(jnp.asarray(1.0)) != abstract_signature(jnp.asarray(1.0,
                                                                                  jnp.float32))


def test_signature_rejects_leaves_without_a_stable_description():
    class Opaque:
        pass

    with pytest.raises(ValueError, match="memory address"):
        abstract_signature(Opaque())


# ----- environment_fingerprint -----


def test_fingerprint_is_stable_and_follows_xla_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    base = environment_fingerprint()
    assert environment_fingerprint() == base
    assert environment_fingerprint(extra="bf16") != base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert environment_fingerprint() != base
    monkeypatch.delenv("XLA_FLAGS")
    assert environment_fingerprint() == base


def _in_fresh_thread(fn):
    """fn() on a new thread, which sees global config values, not this thread's contexts (the
    session runs under ``jax.default_matmul_precision``)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.parametrize("flag, values", [
    ("jax_default_matmul_precision", ("highest", "bfloat16")),
    ("jax_enable_x64", (False, True)),
    ("jax_numpy_rank_promotion", ("allow", "raise")),
])
def test_fingerprint_follows_lowering_config(flag, values):
    def fingerprint_with(value):
        previous = jax.config.values[flag]
        jax.config.update(flag, value)
        try:
            return _in_fresh_thread(environment_fingerprint)
        finally:
            jax.config.update(flag, previous)

    first, second = (fingerprint_with(v) for v in values)
    assert first != second
    assert fingerprint_with(values[0]) == first


def test_fingerprint_follows_the_matmul_precision_context():
    with jax.default_matmul_precision("float32"):
        inside = environment_fingerprint()
    with jax.default_matmul_precision("bfloat16"):
        assert environment_fingerprint() != inside


def test_source_digest_covers_every_python_file(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("A = 1\n")
    (package / "sub" / "b.py").write_text("B = 2\n")
    (package / "notes.txt").write_text("not code")
    roots = [("pkg", package)]
    base = executable_cache._source_digest(roots)
    (package / "notes.txt").write_text("still not code")
    assert executable_cache._source_digest(roots) == base
    (package / "sub" / "b.py").write_text("B = 3\n")
    assert executable_cache._source_digest(roots) != base


def test_fingerprint_hashes_every_installed_subpackage():
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("runs from a source checkout")
    packages = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"]
    covered = {name for name, _ in executable_cache._package_roots()}
    assert set(packages) <= covered
    roots = dict(executable_cache._package_roots())
    assert (roots["jaxpaged.pallas_kernels"] / "ragged_paged_attention.py").is_file()
