"""The CPU side of the vLLM-in-the-same-call kit (bench/vllm_kit*.{sh,py}, bench/vllm_baseline.py).

vLLM itself needs a GPU and is not installed here: these tests cover our code around it (the
model folder and requests that vLLM gets, the fatbin pruning, the import check, the carried parts'
gathering and unpacking on the GPU machine).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import struct
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def bench_module(name: str):
    """Imports bench/NAME.py with bench/ on sys.path only while importing (bench/kernels.py must
    not shadow the `kernels` package for the rest of the test session)."""
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


# --- what vLLM is given --------------------------------------------------------------------------

@pytest.mark.slow  # imports transformers (about 7 s on its own)
def test_model_dir_is_our_config_under_transformers_keys(tmp_path):
    from transformers import AutoConfig

    baseline = bench_module("vllm_baseline")
    ours = json.loads((BENCH / "configs/llama3-8b/config.json").read_text())
    model_dir = baseline.write_model_dir(BENCH / "configs/llama3-8b", tmp_path / "model")
    written = json.loads((model_dir / "config.json").read_text())
    assert "torch_dtype" not in written and written["dtype"] == "bfloat16"
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps"):
        assert getattr(config, key) == ours[key], key


def test_model_dir_refuses_a_config_without_architectures(tmp_path):
    baseline = bench_module("vllm_baseline")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="architectures"):
        baseline.write_model_dir(tmp_path, tmp_path / "model")


@pytest.mark.slow  # imports jax and jaxpaged through bench/throughput.py (about 7 s on its own)
@pytest.mark.parametrize("workload,num_requests", [("nano", None), ("nano", 64), ("fixed", 16)])
def test_vllm_gets_the_requests_that_throughput_py_runs(workload, num_requests):
    throughput = bench_module("throughput")
    baseline = bench_module("vllm_baseline")
    prompts, params, outputs = throughput.build_requests(workload, num_requests)
    requests = baseline.throughput_requests(workload, num_requests)
    assert requests.prompts == [p["prompt_token_ids"] for p in prompts]
    kwargs = baseline.sampling_kwargs(requests)
    assert [(k["temperature"], k["ignore_eos"], k["max_tokens"]) for k in kwargs] == \
        [(p.temperature, p.ignore_eos, p.max_tokens) for p in params]
    assert [k["max_tokens"] for k in kwargs] == outputs
    assert all(k["detokenize"] is False for k in kwargs)  # no tokenizer in either run


def test_unknown_workload_is_refused():
    workloads = bench_module("workloads")
    with pytest.raises(ValueError, match="serve"):
        workloads.throughput_requests("serve")


# --- fatbin pruning ------------------------------------------------------------------------------

ELF, PTX = 2, 1


def fatbin_entry(kind: int, arch: int, payload: bytes) -> bytes:
    """An entry as nvcc writes it: a 64-byte header (kind, version, header size, payload size,
    ..., arch at byte 28) and its payload."""
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def fatbin_container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_prune_keeps_the_hopper_images_of_each_container_in_place():
    strip = bench_module("vllm_kit_strip")
    sm90 = fatbin_entry(ELF, 90, b"H" * 40)
    containers = [
        fatbin_container(fatbin_entry(ELF, 80, b"a" * 64), sm90, fatbin_entry(ELF, 100, b"b" * 32),
                         fatbin_entry(PTX, 90, b"p" * 48)),
        fatbin_container(fatbin_entry(ELF, 80, b"c" * 16), fatbin_entry(PTX, 80, b"q" * 24),
                         fatbin_entry(PTX, 100, b"r" * 24)),  # no sm_90 cubin: PTX <= 9.0
        fatbin_container(fatbin_entry(ELF, 120, b"d" * 80), fatbin_entry(ELF, 100, b"e" * 8)),
    ]
    prefix = b"\x7fELF" + bytes(12)
    data = bytearray(prefix + b"".join(containers) + bytes(8))
    size = len(data)
    starts = [len(prefix)]
    for c in containers[:-1]:
        starts.append(starts[-1] + len(c))

    before, kept = strip.prune_section(data, len(prefix), size - 8)

    assert len(data) == size and data[:len(prefix)] == prefix  # no offset moves
    kept_entries = []
    for start, original in zip(starts, containers):
        _, payload, entries = strip.container_entries(data, start)
        kept_entries.append([(e.kind, e.arch) for e in entries])
        freed = len(original) - 16 - payload
        assert data[start + 16 + payload:start + len(original)] == bytes(freed)
    assert kept_entries == [[(ELF, 90)], [(PTX, 80)], [(ELF, 100)]]
    _, _, first = strip.container_entries(data, starts[0])
    assert bytes(data[first[0].start:first[0].start + first[0].size]) == sm90
    assert kept == len(sm90) + (64 + 24) + (64 + 8)
    assert before == sum(len(c) - 16 for c in containers)


# --- the import check ----------------------------------------------------------------------------

def write_package(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_import_check_tells_load_time_from_conditional_and_lazy_imports(tmp_path):
    check = bench_module("vllm_kit_check")
    write_package(tmp_path, {
        "pkg/__init__.py": "import json\n",
        "pkg/main.py": (
            "from typing import TYPE_CHECKING\n"
            "import numpy\n"
            "from . import helper\n"
            "from pkg.gone import thing\n"  # missing at load
            "if TYPE_CHECKING:\n    import never_there\n"
            "try:\n    import optional_extra\nexcept ImportError:\n    optional_extra = None\n"
            "def later():\n    import lazy_missing\n    from pkg import heavy\n"),
        "pkg/helper.py": "import os\nclass A:\n    import absent_in_class\n",
        "pkg/heavy.py": "import flashinfer_like\n",
        "pkg/bad.py": "def broken(:\n",
    })
    result = check.check_kit(tmp_path, roots=("pkg.main",))
    assert not result.ok
    assert sorted(i.module for i in result.unresolved) == ["absent_in_class", "pkg.gone"]
    assert [i.module for i in result.unresolved_conditional] == ["optional_extra"]
    assert sorted(i.module for i in result.unresolved_lazy) == [
        "lazy_missing", "pkg.heavy (needs flashinfer_like)"]
    assert [e.split(":")[0] for e in result.syntax_errors] == ["pkg/bad.py"]


def test_import_check_passes_a_complete_tree(tmp_path):
    check = bench_module("vllm_kit_check")
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import torch\nfrom .b import f\n",
                             "pkg/b.py": "import collections\ndef f():\n    pass\n"})
    result = check.check_kit(tmp_path, roots=("pkg.a",))
    assert result.ok and result.modules_walked == 3  # pkg, pkg.a, pkg.b


# --- gathering the carried parts on the GPU machine ----------------------------------------------

def make_kit(tmp_path: pathlib.Path, name: str, parts: int) -> pathlib.Path:
    """A kit as bench/vllm_kit.sh packs it: one tar.xz cut into PARTS pieces, with SHA256SUMS."""
    site = tmp_path / f"{name}-site"
    write_package(site, {"vllm/__init__.py": f"KIT = {name!r}\n", "dep/data.txt": "x" * 5000})
    archive = tmp_path / f"{name}.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(site, arcname=".")
    blob, folder = archive.read_bytes(), tmp_path / f"{name}-parts"
    folder.mkdir()
    step = -(-len(blob) // parts)
    for k in range(parts):
        (folder / f"vllm-kit.tar.xz.{k + 1}-of-{parts}").write_bytes(blob[k * step:(k + 1) * step])
    subprocess.run("sha256sum vllm-kit.tar.xz.* > SHA256SUMS", shell=True, cwd=folder, check=True)
    return folder


def carry(repo: pathlib.Path, parts: pathlib.Path, *names: str) -> None:
    carried = repo / ".vllm-kit"
    if carried.exists():
        for old in carried.iterdir():
            old.unlink()
    carried.mkdir(exist_ok=True)
    for name in names:
        (carried / name).write_bytes((parts / name).read_bytes())


def test_parts_carried_over_calls_are_gathered_then_unpacked(tmp_path):
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench/vllm_kit_install.sh").write_text((BENCH / "vllm_kit_install.sh").read_text())
    env = {"PATH": os.environ["PATH"], "VLLM_KIT_STORE": str(tmp_path / "store"),
           "VLLM_KIT_SITE": str(tmp_path / "site")}

    def install(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "bench/vllm_kit_install.sh", mode], cwd=repo, env=env,
                              capture_output=True, text=True)

    parts = make_kit(tmp_path, "one", 3)
    carry(repo, parts, "SHA256SUMS", "vllm-kit.tar.xz.2-of-3")
    gathered = install("gather")
    assert gathered.returncode == 0 and "1 of 3 parts" in gathered.stdout
    assert "missing: 1 3" in gathered.stdout
    assert install("install").returncode != 0 and not (tmp_path / "site").exists()

    carry(repo, parts, "vllm-kit.tar.xz.1-of-3")  # no SHA256SUMS this time: the kept one checks
    assert "2 of 3 parts" in install("gather").stdout
    (repo / ".vllm-kit/vllm-kit.tar.xz.3-of-3").write_bytes(b"cut short")
    refused = install("gather")
    assert refused.returncode != 0 and "does not match" in refused.stderr

    carry(repo, parts, "SHA256SUMS", "vllm-kit.tar.xz.3-of-3")
    done = install("install")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site/vllm/__init__.py").read_text() == "KIT = 'one'\n"
    assert "already unpacked" in install("install").stdout

    other = make_kit(tmp_path, "two", 1)  # a new kit replaces the old one
    carry(repo, other, "SHA256SUMS", "vllm-kit.tar.xz.1-of-1")
    assert install("install").returncode == 0
    assert (tmp_path / "site/vllm/__init__.py").read_text() == "KIT = 'two'\n"
