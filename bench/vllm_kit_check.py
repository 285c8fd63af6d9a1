"""Static integrity check of the stripped vLLM kit (bench/vllm_kit.sh), run on the CPU machine.

    python bench/vllm_kit_check.py SITE_DIR [--lazy]

No torch here, so nothing of vLLM is imported: the check reads source. It passes when

- every ``.py`` file under SITE_DIR compiles with this Python (3.12, the GPU machine's), and
- every import that runs when a module is loaded (module level, outside ``if TYPE_CHECKING:`` and
  outside ``try: ... except ImportError``), followed transitively from the modules that
  ``vllm.LLM`` runs for a dense Llama on Hopper (``ROOTS``), resolves to a module in SITE_DIR, to a
  package of the GPU image (``GPU_IMAGE_MODULES``) or to the standard library.

Imports inside functions run only when called; ``--lazy`` lists those that resolve nowhere, to
read by hand (most belong to paths the benchmark never takes: MoE, quantization, other platforms).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from dataclasses import dataclass, field

# The modules vllm.LLM(...).generate(...) loads for LlamaForCausalLM on an H100/H200: the engine
# (in-process client and engine-core process), the v2 model runner that Llama uses by default,
# FlashAttention 3, torch.compile and CUDA graphs, the dummy loader and the sampler.
ROOTS = (
    "vllm",
    "vllm.entrypoints.llm",
    "vllm.engine.arg_utils",
    "vllm.platforms.cuda",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.model_runner",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.vllm_flash_attn",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.model_loader.dummy_loader",
    "vllm.compilation.backends",
    "vllm.compilation.wrapper",
    "vllm.compilation.cuda_graph",
    "vllm.compilation.piecewise_backend",
    "vllm.v1.sample.sampler",
    "vllm.v1.core.sched.scheduler",
)

# Import names of the packages the GPU image has (/work/.library/device/KINDS.md, "Python packages
# already there", read 2026-11-17); dist names mapped to what `import` uses.
GPU_IMAGE_MODULES = frozenset("""
absl accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attr attrs botorch
build certifi charset_normalizer chex click cloudpickle cmake colorama contourpy coverage cuda
cupy cycler cython Cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpc h11 h5py hf_xet httpcore httpx
huggingface_hub humanize hypothesis idna imageio iniconfig interface_meta jax jax_cuda13_pjrt
jax_cuda13_plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy_loader lightning
lightning_utilities linear_operator lineax llvmlite lxml markdown markdown_it markupsafe
matplotlib mdurl mesonbuild ml_dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy_extensions nanobind narwhals networkx ninja numba numpy numpyro nvidia pynvml onnx onnx_ir
onnxruntime onnxscript cv2 optax opt_einsum opt_einsum_fx optimistix orbax packaging pandas
pathspec patsy peft PIL pip pluggy portalocker prometheus_client propcache google psutil
pyarrow pybind11 cpuinfo pygments pyparsing pyproject_hooks pyre_extensions pytest _pytest
pytest_benchmark pytest_cov pytest_mock pytest_timeout xdist dateutil pytorch_lightning yaml
regex requests rich safetensors sacrebleu sklearn skimage scipy seaborn sentencepiece
sentence_transformers
setuptools pkg_resources _distutils_hack shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard_data_server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch_geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing_extensions typing_inspect urllib3
uvloop wadler_lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


LOAD, CONDITIONAL, LAZY = "load", "conditional", "lazy"


@dataclass(frozen=True)
class ImportSite:
    """One `import` statement: the module it names, where, and when it runs.

    ``when`` is LOAD (runs whenever its module is imported), CONDITIONAL (at load time, but under a
    module-level ``if``, e.g. ``if has_deep_ep():``) or LAZY (inside a function).
    """

    module: str
    source: pathlib.Path
    line: int
    when: str


@dataclass
class CheckResult:
    syntax_errors: list[str] = field(default_factory=list)
    unresolved: list[ImportSite] = field(default_factory=list)  # LOAD: fatal
    unresolved_conditional: list[ImportSite] = field(default_factory=list)  # read by hand
    unresolved_lazy: list[ImportSite] = field(default_factory=list)  # read by hand
    modules_walked: int = 0

    @property
    def ok(self) -> bool:
        return not self.syntax_errors and not self.unresolved


class Site:
    """A site-packages folder: module names -> files, without importing anything."""

    EXTENSION_SUFFIXES = (".abi3.so", ".cpython-312-x86_64-linux-gnu.so", ".so")

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.found: dict[str, pathlib.Path | None] = {}

    def find(self, module: str) -> pathlib.Path | None:
        """The file that `import module` loads from this folder, or None."""
        if module not in self.found:
            self.found[module] = self._find(module)
        return self.found[module]

    def _find(self, module: str) -> pathlib.Path | None:
        base = self.root.joinpath(*module.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.is_dir() and module.count(".") > 0:  # namespace package inside a package
            return base
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        for suffix in self.EXTENSION_SUFFIXES:
            candidate = base.parent / (base.name + suffix)
            if candidate.is_file():
                return candidate
        return None

    def resolves(self, module: str) -> bool:
        top = module.split(".")[0]
        if self.find(module) is not None:
            return True
        if self.find(top) is not None:
            return False  # the kit has the package but not this module of it
        return top in GPU_IMAGE_MODULES or top in sys.stdlib_module_names


def _guarded_by_import_error(handlers: list[ast.ExceptHandler]) -> bool:
    names = set()
    for handler in handlers:
        if handler.type is None:
            return True
        for node in ast.walk(handler.type):
            if isinstance(node, ast.Name):
                names.add(node.id)
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException",
                         "OSError", "RuntimeError", "AttributeError"})


def _weaker(when: str | None, than: str) -> str | None:
    order = (LOAD, CONDITIONAL, LAZY)
    return None if when is None else order[max(order.index(when), order.index(than))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def imports_of(module: str, path: pathlib.Path, site: Site) -> list[ImportSite]:
    """Every import in a module's source, each with when it runs (LOAD, CONDITIONAL, LAZY)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = _package_of(module, path)
    found: list[ImportSite] = []

    def visit(nodes: list[ast.stmt], when: str | None) -> None:  # None: never runs
        for node in nodes:
            if isinstance(node, ast.Import) and when:
                found.extend(ImportSite(a.name, path, node.lineno, when) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and when:
                target = _absolute(node, package)
                found.append(ImportSite(target, path, node.lineno, when))
                for alias in node.names:  # `from pkg import submodule`
                    if site.find(f"{target}.{alias.name}") is not None:
                        found.append(ImportSite(f"{target}.{alias.name}", path, node.lineno, when))
            elif isinstance(node, ast.If):
                branch = None if _is_type_checking(node.test) else _weaker(when, CONDITIONAL)
                visit(node.body, branch)
                visit(node.orelse, _weaker(when, CONDITIONAL))
            elif isinstance(node, ast.Try):
                guarded = _guarded_by_import_error(node.handlers)
                visit(node.body, _weaker(when, CONDITIONAL) if guarded else when)
                for handler in node.handlers:
                    visit(handler.body, _weaker(when, CONDITIONAL))
                visit(node.orelse, when)
                visit(node.finalbody, when)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, _weaker(when, LAZY))
            elif isinstance(node, (ast.ClassDef, ast.With, ast.For, ast.While)):
                visit(node.body, when)

    visit(tree.body, LOAD)
    return found


def check_syntax(root: pathlib.Path) -> list[str]:
    errors = []
    for path in sorted(root.rglob("*.py")):
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as error:
            errors.append(f"{path.relative_to(root)}: {error}")
    return errors


class Walker:
    """Follows load-time imports through the kit, remembering what each module needs."""

    def __init__(self, site: Site):
        self.site = site
        self.imports: dict[str, list[ImportSite]] = {}
        self.first_missing: dict[str, str | None] = {}

    def imports_at(self, module: str) -> list[ImportSite]:
        if module not in self.imports:
            path = self.site.find(module)
            self.imports[module] = (imports_of(module, path, self.site)
                                    if path is not None and path.suffix == ".py" else [])
        return self.imports[module]

    def load_closure(self, roots: list[str]) -> tuple[set[str], list[ImportSite]]:
        """(modules that importing `roots` runs, load-time imports among them that resolve
        nowhere). Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
        seen: set[str] = set()
        missing: list[ImportSite] = []
        queue = list(roots)
        while queue:
            module = queue.pop()
            if module in seen:
                continue
            seen.add(module)
            parts = module.split(".")
            queue.extend(".".join(parts[:i]) for i in range(1, len(parts)))
            for imp in self.imports_at(module):
                if imp.when != LOAD:
                    continue
                if not self.site.resolves(imp.module):
                    missing.append(imp)
                elif self.site.find(imp.module) is not None:
                    queue.append(imp.module)
        return seen, missing

    def first_missing_when_loading(self, module: str) -> str | None:
        if module not in self.first_missing:
            _, missing = self.load_closure([module])
            self.first_missing[module] = missing[0].module if missing else None
        return self.first_missing[module]


def check_kit(root: pathlib.Path, roots: tuple[str, ...] = ROOTS) -> CheckResult:
    site = Site(root)
    walker = Walker(site)
    result = CheckResult(syntax_errors=check_syntax(root))
    walked, result.unresolved = walker.load_closure(list(roots))
    result.unresolved += [ImportSite(m, root, 0, LOAD) for m in roots if not site.resolves(m)]
    result.modules_walked = len(walked)
    # Imports that may run later: missing ones, and kit modules that would fail to load (a
    # function-level `from vllm.x import y` whose module imports a package the kit lacks).
    for module in sorted(walked):
        for imp in walker.imports_at(module):
            if imp.when == LOAD:
                continue
            bucket = (result.unresolved_conditional if imp.when == CONDITIONAL
                      else result.unresolved_lazy)
            if not site.resolves(imp.module):
                bucket.append(imp)
            elif site.find(imp.module) is not None and imp.module not in walked:
                needs = walker.first_missing_when_loading(imp.module)
                if needs:
                    bucket.append(ImportSite(f"{imp.module} (needs {needs})", imp.source,
                                             imp.line, imp.when))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", type=pathlib.Path)
    parser.add_argument("--lazy", action="store_true",
                        help="also list unresolved imports inside functions of walked modules")
    args = parser.parse_args()
    result = check_kit(args.site)
    for error in result.syntax_errors:
        print(f"syntax: {error}")
    for imp in result.unresolved:
        print(f"missing at load: {imp.module}  ({imp.source.relative_to(args.site)}:{imp.line})")
    for imp in sorted(result.unresolved_conditional, key=lambda i: i.module):
        print(f"missing if taken: {imp.module}  ({imp.source.relative_to(args.site)}:{imp.line})")
    if args.lazy:
        for imp in sorted(result.unresolved_lazy, key=lambda i: i.module):
            print(f"missing if called: {imp.module}  "
                  f"({imp.source.relative_to(args.site)}:{imp.line})")
    print(f"{result.modules_walked} modules walked, {len(result.syntax_errors)} syntax errors, "
          f"{len(result.unresolved)} imports missing at load, "
          f"{len(result.unresolved_conditional)} under an if or try, "
          f"{len(result.unresolved_lazy)} inside functions")
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
