"""bench/plots.py draws its figures from the committed logs (the README shows them)."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plots():
    """bench/plots.py as a module (bench/ is no package); its dataclasses need it registered."""
    spec = importlib.util.spec_from_file_location("bench_plots", ROOT / "bench" / "plots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_figure_is_drawn_from_the_logs(plots, tmp_path):
    for figure in (plots.throughput_figure, plots.decode_figure, plots.serve_figure):
        path = figure(tmp_path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert (ROOT / "bench" / "plots" / "throughput.png").exists()  # the README's copy


def test_a_missing_log_is_named(plots, monkeypatch, tmp_path):
    monkeypatch.setattr(plots, "LOGS", tmp_path)
    with pytest.raises(FileNotFoundError, match="throughput-nano"):
        plots.throughput_figure(tmp_path)


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the bars are not drawn here
def test_hf_baseline_is_the_tokens_over_the_seconds_of_its_parts(plots, monkeypatch, tmp_path):
    """Two halves of the workload run one after the other: 300 tokens in 3 s is 100 tok/s."""
    for name, tokens, seconds in (("hf-a.json", 100, 2.0), ("hf-b.json", 200, 1.0)):
        (tmp_path / name).write_text(json.dumps({"output_tokens": tokens, "seconds": seconds}))
    (tmp_path / "ours.json").write_text(json.dumps(
        {"output_tok_s": 5000.0, "output_tokens": 1000, "floor": {"floor_s": 0.1}}))
    monkeypatch.setattr(plots, "LOGS", tmp_path)
    monkeypatch.setattr(plots, "THROUGHPUT_RUNS", (plots.ThroughputRun("x", "ours.json",
                                                                       "hf-*.json"),))
    drawn = {}
    monkeypatch.setattr(plots, "_bars", lambda ax, values, **kw: drawn.setdefault(
        kw["label"], values), raising=False)
    plots.throughput_figure(tmp_path)
    assert drawn == {"HF transformers": [100.0], "jaxpaged": [5000.0], "floor": [10000.0]}
