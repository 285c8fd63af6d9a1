"""The built wheel installs every package under `jaxpaged.` and nothing at the top level."""

import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBPACKAGES = ("jaxpaged.pallas_kernels", "jaxpaged.converters", "jaxpaged.server",
               "jaxpaged.models", "jaxpaged.distributed")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("jaxpaged-*.whl")
    return wheel


def test_wheel_has_only_the_jaxpaged_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"jaxpaged"}
    for package in SUBPACKAGES:
        assert package.replace(".", "/") + "/__init__.py" in names
    assert "jaxpaged/converters/tiny.py" in names
    assert "jaxpaged/pallas_kernels/ragged_paged_attention.py" in names
    for page_file in ("index.html", "main.js", "api.js", "chat.js", "engine_view.js", "style.css"):
        assert f"jaxpaged/server/static/{page_file}" in names  # GET / works from the wheel


def test_wheel_installs_and_imports_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    # Dependencies (jax, flax, ...) come from this test's environment, appended after the
    # fresh venv's own site-packages, so jaxpaged itself must come from the installed wheel.
    fresh_site = pathlib.Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib, jaxpaged; "
            f"mods = [importlib.import_module(m) for m in {SUBPACKAGES!r}]; "
            "import jaxpaged.cli, jaxpaged.models.loader, jaxpaged.converters.tiny; "
            "import jaxpaged.converters.default_model, jaxpaged.converters.gguf_model; "
            "import jaxpaged.server.ui as ui; "
            "assert (ui.STATIC_DIR / 'index.html').is_file(), ui.STATIC_DIR; "
            "print(jaxpaged.__file__); print(*[m.__file__ for m in mods], sep='\\n')")
    out = subprocess.check_output([str(python), "-c", code], cwd=tmp_path, text=True,
                                  env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    for line in out.strip().splitlines():
        assert line.startswith(str(fresh_site / "jaxpaged")), line
    assert subprocess.run([str(env_dir / "bin" / "jaxpaged"), "--help"], capture_output=True,
                          cwd=tmp_path).returncode == 0
