"""A persistent cache of compiled XLA executables: a warm start loads each program from disk
instead of tracing, lowering and compiling it.

JAX's own persistent compilation cache keys a program by a hash of its lowered module, so it must
trace and lower every program before it can answer; for a model whose layers are unrolled that
alone costs seconds per step shape. This cache keys an executable by what is known before tracing:

  - a fingerprint of everything that could change the compiled program
    (``environment_fingerprint``: jaxpaged's sources, library versions, backend and devices,
    XLA_FLAGS, the jax config values that change tracing/lowering);
  - the program's name and a description of its arguments (``abstract_signature``: pytree
    structure, static values, shapes, dtypes, shardings).

Layout: ``directory/<fingerprint[:16]>/<name>-<key>.jaxexec``. Any change of fingerprint (a source
edit, another jax, other flags) starts a new sub-directory, so stale ones can be deleted whole.

Entry file: a magic tag, the sha256 of the body, the entry's key, then the body: a pickle of
(serialized executable, input PyTreeDef, output PyTreeDef, ids of the devices it runs on, in
its device assignment's order: without them XLA would load it onto every device of the host,
which breaks single-device programs on a multi-device host). The checksum and key are checked
before anything is unpickled or handed to XLA, so a torn or corrupted file is recompiled and
replaced rather than loaded. Writers write a temporary file in the same directory and rename it
over the entry (atomic on POSIX), so the warm-up's parallel compile threads and several engines
sharing one directory never leave a partial entry. There is no fsync: a file torn by a crash
fails its checksum and is rebuilt.

Tree definitions: a ``jax.stages.Compiled`` needs the PyTreeDefs of its inputs and outputs. They
pickle, including registered dataclasses (``StepInputs``, ``AttentionMetadata``, ``KVCache``,
``SamplingTensors``) and flax nnx ``State``, whose classes are found by import when loading, so
they are stored with the executable and a hit needs no tracing at all.

Trust: loading an entry unpickles it and loads machine code, much like importing a module. The
directory must be as trusted as the code itself (it is created with mode 0o700); never point it
at files written by someone else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import pickle
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable

logger = logging.getLogger(__name__)

_MAGIC = b"JAXPAGED-XEXEC-2\n"  # file format tag; bump the digit when the layout changes
_DIGEST_BYTES = 32  # sha256
_SUFFIX = ".jaxexec"

# jaxpaged's subpackages; some are installed from folders outside jaxpaged/ (pyproject's
# package-dir), so each is located through the import system rather than under jaxpaged/.
_SUBPACKAGES = ("core", "engine", "runner", "sample", "models", "utils", "structured",
                "distributed", "pallas_kernels", "converters", "server", "server.tool_parsers")

# jax config values that change the traced or compiled program. jax's own trace context (every
# value its jit cache is keyed by) is added to these where this jax version exposes it.
_COMPILE_CONFIG = (
    "jax_default_matmul_precision", "jax_enable_x64", "jax_numpy_rank_promotion",
    "jax_numpy_dtype_promotion", "jax_default_prng_impl", "jax_threefry_partitionable",
    "jax_use_shardy_partitioner", "jax_disable_most_optimizations", "jax_optimization_level",
    "jax_exec_time_optimization_effort", "jax_memory_fitting_effort",
    "jax_compiler_enable_remat_pass", "jax_enable_pgle", "jax_xla_profile_version",
    "jax_ragged_dot_use_gpu_pallas_triton_lowering", "jax_pallas_enable_debug_checks",
)

# Environment variables read by the compiler.
_COMPILE_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")

# Installed distributions whose code runs while tracing or compiling, or ships the compiler and
# the libraries executables link against (CUDA, cuDNN, ptxas wheels). Not jaxpaged itself: its
# sources are hashed, and its metadata may be seen twice (an egg-info in the working directory).
_VERSIONED_DISTRIBUTIONS = re.compile(
    r"^(jax(?!paged).*|flax|numpy|ml[-_]dtypes|libtpu.*|nvidia[-_].*)$")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_FUNCTION = re.compile(r"<function (\S+) at 0x[0-9a-fA-F]+>")  # e.g. nnx.Linear's dot_general


@dataclasses.dataclass
class ExecutableCacheStats:
    """What an ``ExecutableCache`` did (a snapshot; see ``ExecutableCache.stats``)."""

    hits: int = 0  # executables loaded from disk
    misses: int = 0  # executables compiled (no usable entry, or the cache is disabled)
    load_failures: int = 0  # entries that could not be loaded (deleted, then compiled)
    store_failures: int = 0  # compiled executables that could not be written
    load_s: float = 0.0  # seconds spent loading hits
    compile_s: float = 0.0  # seconds spent lowering and compiling misses


class ExecutableCache:
    """Compiled executables on disk, keyed by (fingerprint, name, argument signature).

    ``directory=None`` disables the cache: every ``get_or_compile`` compiles. Thread-safe; one
    key is compiled by at most one thread of a process at a time (the others then load it).
    """

    def __init__(self, directory: pathlib.Path | str | None, fingerprint: str):
        if not fingerprint:
            raise ValueError("fingerprint must be a non-empty string")
        self.fingerprint = fingerprint
        self.directory = _open_directory(directory, fingerprint)
        self._stats = ExecutableCacheStats()
        self._lock = threading.Lock()  # guards _stats and _key_locks
        self._key_locks: dict[str, threading.Lock] = {}

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    @property
    def stats(self) -> ExecutableCacheStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def key(self, name: str, args_signature: str) -> str:
        """sha256 hex of (fingerprint, name, args_signature)."""
        if not isinstance(args_signature, str):
            raise TypeError("args_signature must be a str (e.g. from abstract_signature); other "
                            f"objects have no description stable across processes, got "
                            f"{type(args_signature).__name__}")
        digest = hashlib.sha256()
        for part in (self.fingerprint, name, args_signature):
            encoded = part.encode()
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
        return digest.hexdigest()

    def path(self, name: str, args_signature: str,
             compiler_options: dict[str, Any] | None = None) -> pathlib.Path | None:
        """The entry file of (name, args_signature, compiler_options); None when disabled."""
        if self.directory is None:
            return None
        return self._entry_path(name, self.key(name, _with_options(args_signature,
                                                                   compiler_options)))

    def _entry_path(self, name: str, key: str) -> pathlib.Path:
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]  # readable listings
        return self.directory / f"{safe_name}-{key}{_SUFFIX}"

    def get_or_compile(self, name: str, args_signature: str,
                       lower: Callable[[], jax.stages.Lowered],
                       compiler_options: dict[str, Any] | None = None) -> jax.stages.Compiled:
        """The executable of (name, args_signature): loaded from disk when an entry exists,
        else ``lower().compile()`` (then stored). ``args_signature`` must describe everything
        the program depends on besides the fingerprint, static arguments included (use
        ``abstract_signature`` over all the arguments given to ``lower``). Never fails because of
        the cache: unreadable entries are recompiled and unwritable ones only logged.
        ``compiler_options`` go to ``Lowered.compile`` and into the key."""
        options = dict(compiler_options or {})
        key = self.key(name, _with_options(args_signature, options))
        if self.directory is None:
            return self._compile(lower, options)
        path = self._entry_path(name, key)
        with self._key_lock(key):
            compiled = self._load(path, key)
            if compiled is not None:
                return compiled
            compiled = self._compile(lower, options)
            self._store(path, key, compiled)
            return compiled

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _compile(self, lower: Callable[[], jax.stages.Lowered],
                 compiler_options: dict[str, Any]) -> jax.stages.Compiled:
        start = time.perf_counter()
        compiled = lower().compile(compiler_options or None)
        with self._lock:
            self._stats.misses += 1
            self._stats.compile_s += time.perf_counter() - start
        return compiled

    def _load(self, path: pathlib.Path, key: str) -> jax.stages.Compiled | None:
        """The entry's executable; None when there is none or it cannot be used (then the file
        is deleted so that the compiled replacement can take its place)."""
        start = time.perf_counter()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._load_failed(path, f"unreadable: {e}")
        try:
            payload, in_tree, out_tree, device_ids = pickle.loads(_unwrap(data, key))
            by_id = {d.id: d for d in jax.devices()}
            compiled = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
        except Exception as e:  # corrupt, truncated, or written by an incompatible jax: recompile
            return self._load_failed(path, f"{type(e).__name__}: {e}")
        with self._lock:
            self._stats.hits += 1
            self._stats.load_s += time.perf_counter() - start
        logger.debug("loaded executable %s in %.3f s", path.name, time.perf_counter() - start)
        return compiled

    def _load_failed(self, path: pathlib.Path, why: str) -> None:
        """Logs and counts an unusable entry and deletes it; returns None (no executable)."""
        logger.warning("executable cache: cannot load %s (%s); compiling it instead", path, why)
        with self._lock:
            self._stats.load_failures += 1
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # the replacement's rename still overwrites it, if the directory allows
        return None

    def _store(self, path: pathlib.Path, key: str, compiled: jax.stages.Compiled) -> None:
        try:
            payload, in_tree, out_tree = serialize_executable.serialize(compiled)
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            body = pickle.dumps((payload, in_tree, out_tree, device_ids),
                                protocol=pickle.HIGHEST_PROTOCOL)
            _write_atomically(path, _wrap(body, key))
        except Exception as e:  # e.g. programs with closed-over constants do not serialize
            logger.warning("executable cache: cannot store %s (%s: %s); it will be compiled "
                           "again next time", path, type(e).__name__, e)
            with self._lock:
                self._stats.store_failures += 1


def _with_options(args_signature: str, compiler_options: dict[str, Any] | None) -> str:
    """The signature a key is made of: no options leave it as it is (entries stay valid)."""
    if not compiler_options:
        return args_signature
    return f"{args_signature}|compiler_options={sorted(compiler_options.items())}"


def _open_directory(directory: pathlib.Path | str | None,
                    fingerprint: str) -> pathlib.Path | None:
    """``directory/<fingerprint[:16]>``, created (0o700) if needed; None (cache disabled, with a
    warning) when it cannot be created."""
    if directory is None:
        return None
    path = pathlib.Path(directory).expanduser() / fingerprint[:16]
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        logger.warning("executable cache disabled: cannot create %s (%s)", path, e)
        return None
    return path


def _wrap(body: bytes, key: str) -> bytes:
    return _MAGIC + hashlib.sha256(body).digest() + bytes.fromhex(key) + body


def _unwrap(data: bytes, key: str) -> bytes:
    """The body of an entry file, after checking its tag, key and checksum (ValueError)."""
    head = len(_MAGIC)
    if data[:head] != _MAGIC:
        raise ValueError("not an executable cache entry of this format")
    digest = data[head:head + _DIGEST_BYTES]
    stored_key = data[head + _DIGEST_BYTES:head + 2 * _DIGEST_BYTES]
    body = data[head + 2 * _DIGEST_BYTES:]
    if stored_key != bytes.fromhex(key):
        raise ValueError("entry belongs to another key")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    return body


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Writes a temporary file next to ``path`` and renames it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


# ----- keys -----


def abstract_signature(*args: Any) -> str:
    """A description of ``args`` that keys a compiled program: the pytree structure (static
    fields of registered dataclasses included), then one line per leaf: shape, dtype, weak type
    and sharding of arrays; type and repr of anything else. No tracing.

    Non-array leaves are static arguments (graphdefs, layouts, ``pad_to``...) or Python scalars:
    their value is part of the description, so a scalar passed as a traced argument only makes
    more keys, never a wrong hit. Functions inside static values are described by their
    qualified name (module-level functions such as flax's ``dot_general``; the values a closure
    captures are not seen). Any other repr holding a memory address raises ValueError: it would
    change every process (the cache would never hit) and says nothing of the object's state.

    Cost: reprs of large static objects (a many-layer nnx GraphDef) dominate the array leaves, so
    describe arguments shared by every call once and join the strings."""
    leaves, treedef = jax.tree.flatten(args)
    memo: dict[Any, str] = {}
    lines = [_no_address(str(treedef), "the pytree structure")]
    lines.extend(_describe_leaf(leaf, memo) for leaf in leaves)
    return "\n".join(lines)


def _describe_leaf(leaf: Any, memo: dict[Any, str]) -> str:
    """One leaf's line; equal avals/shardings are formatted once (``memo``)."""
    if isinstance(leaf, jax.Array):
        key = (leaf.aval, leaf.sharding)  # aval holds shape, dtype and weak type
        if key not in memo:
            memo[key] = f"{leaf.aval} {leaf.sharding!r}"
        return memo[key]
    if isinstance(leaf, np.ndarray | np.generic):
        key = (leaf.shape, leaf.dtype)
        if key not in memo:
            memo[key] = f"{leaf.dtype}{list(leaf.shape)} numpy"
        return memo[key]
    if isinstance(leaf, jax.ShapeDtypeStruct):
        weak = "~" if leaf.weak_type else ""
        return f"{weak}{np.dtype(leaf.dtype)}{list(leaf.shape)} {leaf.sharding!r}"
    return _no_address(f"{type(leaf).__qualname__}:{leaf!r}", f"a {type(leaf).__name__} leaf")


def _no_address(text: str, what: str) -> str:
    """``text`` with function addresses dropped; ValueError if any other address is left."""
    text = _FUNCTION.sub(r"<function \1>", text)
    if _ADDRESS.search(text):
        raise ValueError(f"{what} has no stable description (its repr holds a memory address): "
                         f"{text[:200]}")
    return text


def environment_fingerprint(extra: str = "") -> str:
    """sha256 hex of everything besides the arguments that could change a compiled program:
    every jaxpaged source file, the versions of jax, jaxlib, their plugins and the libraries they
    compile with, the backend (platform, version, device kinds and counts), the compiler's
    environment variables (XLA_FLAGS), the jax config values that change tracing and lowering,
    and ``extra``. Takes tens of milliseconds: compute it once per engine."""
    digest = hashlib.sha256()
    for name, value in _environment_description(extra):
        digest.update(f"{name}={value}\n".encode())
    return digest.hexdigest()


def _environment_description(extra: str) -> list[tuple[str, str]]:
    return ([("python", sys.version), ("jaxpaged_sources", _source_digest(_package_roots()))]
            + _distribution_versions() + _backend_description() + _config_description()
            + [(name, os.environ.get(name, "")) for name in _COMPILE_ENV] + [("extra", extra)])


def _package_roots() -> list[tuple[str, pathlib.Path]]:
    """(dotted name, directory) of jaxpaged and of each subpackage installed from elsewhere."""
    import jaxpaged  # the installed package this module belongs to

    roots = [("jaxpaged", pathlib.Path(p)) for p in jaxpaged.__path__]
    for sub in _SUBPACKAGES:
        spec = importlib.util.find_spec(f"jaxpaged.{sub}")  # locates; does not import it
        for location in (spec.submodule_search_locations or []) if spec else []:
            roots.append((f"jaxpaged.{sub}", pathlib.Path(location)))
    return roots


def _source_digest(roots: Iterable[tuple[str, pathlib.Path]]) -> str:
    """sha256 over every .py file under the roots (recursively), by package-relative path."""
    files: dict[pathlib.Path, str] = {}
    for package, root in roots:
        for path in root.rglob("*.py"):
            if "__pycache__" not in path.parts:
                files.setdefault(path.resolve(), f"{package}/{path.relative_to(root).as_posix()}")
    digest = hashlib.sha256()
    for path, name in sorted(files.items(), key=lambda item: item[1]):
        content = path.read_bytes()
        digest.update(f"{name}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


def _distribution_versions() -> list[tuple[str, str]]:
    versions = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if _VERSIONED_DISTRIBUTIONS.match(name.lower()):
            versions.add((f"dist:{name.lower()}", dist.version))
    return sorted(versions)


def _backend_description() -> list[tuple[str, str]]:
    devices = jax.devices()
    kinds = sorted({(d.device_kind, str(getattr(d, "compute_capability", "")))
                    for d in devices})
    return [("backend", jax.default_backend()),
            ("platform_version", devices[0].client.platform_version),
            ("device_kinds", repr(kinds)), ("device_count", str(len(devices))),
            ("local_device_count", str(jax.local_device_count())),
            ("process_count", str(jax.process_count()))]


def _config_description() -> list[tuple[str, str]]:
    """Named compile-relevant config values, then jax's trace context (thread-local overrides
    such as ``jax.default_matmul_precision(...)`` included)."""
    described = [(name, repr(getattr(jax.config, name, None))) for name in _COMPILE_CONFIG]
    try:
        from jax._src import config as jax_config_internals

        names = jax_config_internals.trace_context_names()
        values = jax_config_internals.trace_context()
    except (ImportError, AttributeError):  # another jax version: the named values remain
        return described
    described += [(f"trace:{name}", _ADDRESS.sub("", repr(value)))
                  for name, value in zip(names, values)]
    return described
