"""Figures of bench/RESULTS.md's runs, drawn from their logs (bench/logs/*.json) with matplotlib.

    .venv/bin/python bench/plots.py                  # writes bench/plots/*.png
    .venv/bin/python bench/plots.py --out /tmp/plots

- ``throughput.png``: nano (llama3-8b, 256 requests) output tokens/s: ours, HF transformers'
  static generate on the same requests and card, and the floor (the card's bandwidth and matmul
  rate, ``bench/roofline.py``), per run below.
- ``decode_steps.png``: a decode step's time against the batch (1024-token contexts), with the
  floor of each batch.
- ``serve_latency.png``: TTFT and TPOT (p50, p99) of ``bench/serve_bench.sh`` at its request
  rates, per run.

Which logs make a figure is listed below (a run = its logs' glob); the numbers all come from the
logs. matplotlib is in the ``dev`` extra, not a dependency of jaxpaged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parent
LOGS = BENCH / "logs"


@dataclasses.dataclass(frozen=True)
class ThroughputRun:
    label: str
    ours: str  # glob of bench/throughput.py logs (the median of them is drawn)
    hf: str | None  # glob of bench/hf_baseline.py logs covering the same requests together


THROUGHPUT_RUNS = (
    ThroughputRun("H100, 2026-11-26 (5bdfd90)", "2026-11-26-h100-throughput-nano-5bdfd90-*.json",
                  "2026-11-26-h100-hf-nano-half*-5bdfd90.json"),
    ThroughputRun("H200, 2026-12-03 (2361e11)", "2026-12-03b-h200-throughput-nano-2361e11.json",
                  None),
    ThroughputRun("H200, fp8 KV (2361e11)", "2026-12-03b-h200-throughput-nano-fp8kv-2361e11.json",
                  None),
)
DECODE_RUNS = (  # label, a bench/decode_steps.py log
    ("H100 (b1f9fbe)", "2026-11-26-h100-decode-ladder-b1f9fbe.json"),
    ("H200 (90364da)", "2026-12-03b-h200-decode-bf16-90364da.json"),
)
SERVE_LOGS = "2026-11-26-h100-serve-*.json"  # bench/serving.py logs


def _load(pattern: str) -> list[dict]:
    paths = sorted(LOGS.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no log matches bench/logs/{pattern}")
    return [json.loads(p.read_text()) for p in paths]


def throughput_figure(out: pathlib.Path) -> pathlib.Path:
    labels, ours, hf, floor = [], [], [], []
    for run in THROUGHPUT_RUNS:
        logs = _load(run.ours)
        labels.append(run.label)
        ours.append(statistics.median(log["output_tok_s"] for log in logs))
        floor.append(statistics.median(log["output_tokens"] / log["floor"]["floor_s"]
                                       for log in logs))
        if run.hf is None:
            hf.append(float("nan"))
        else:  # the parts of the workload, run one after the other: tokens / seconds
            parts = _load(run.hf)
            hf.append(sum(p["output_tokens"] for p in parts) / sum(p["seconds"] for p in parts))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = range(len(labels))
    width = 0.27
    for offset, values, name, color in ((-width, hf, "HF transformers", "#adb5bd"),
                                        (0, ours, "jaxpaged", "#2f9e44"),
                                        (width, floor, "floor", "#1c7ed6")):
        _bars(ax, values, positions=[i + offset for i in x], width=width, label=name,
              color=color)
    ax.set_yscale("log")
    ax.set_ylim(100, 60000)
    ax.set_ylabel("output tokens / s (log scale)")
    ax.set_xticks(list(x), labels, fontsize=9)
    ax.set_title("Offline throughput, nano workload (llama3-8b, 256 requests)")
    ax.legend(loc="upper left", fontsize=9, ncols=3)
    ax.text(0.99, 0.97, "HF measured on the H100 only", transform=ax.transAxes, ha="right",
            va="top", fontsize=8, color="#6b7480")
    return _save(fig, out / "throughput.png")


def _bars(ax, values: list[float], **kwargs) -> None:
    """Bars labelled with their values (none for NaN: not measured)."""
    bars = ax.bar(kwargs.pop("positions"), values, kwargs.pop("width"), **kwargs)
    ax.bar_label(bars, labels=["" if v != v else f"{v:,.0f}" for v in values], fontsize=8)


def decode_figure(out: pathlib.Path) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (label, pattern), color in zip(DECODE_RUNS, ("#2f9e44", "#e8590c")):
        (log,) = _load(pattern)
        rows = sorted(log["rows"], key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        ax.plot(batches, [r["step_ms"] for r in rows], "o-", color=color, label=f"{label} step")
        ax.plot(batches, [r["floor_ms"] for r in rows], "--", color=color,
                label=f"{label} floor")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch"] for _, p in DECODE_RUNS for r in _load(p)[0]["rows"]}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch (sequences of 1024 tokens of context)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title("Decode step against the batch, llama3-8b bf16")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, out / "decode_steps.png")


def serve_figure(out: pathlib.Path) -> pathlib.Path:
    paths = sorted(LOGS.glob(SERVE_LOGS))
    rows = []  # (label, result)
    for path in paths:
        run = path.stem.removeprefix("2026-11-26-h100-serve-")
        for result in json.loads(path.read_text())["results"]:
            rate = result["rate"]
            rows.append((f"{run}, {rate:g} req/s" if rate != "inf" else f"{run}, all at once",
                         result))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, metric, title, scale in ((axes[0], "ttft_ms", "Time to first token", "log"),
                                     (axes[1], "tpot_ms", "Time per output token", "linear")):
        x = range(len(rows))
        for offset, stat, color in ((-0.2, "p50", "#74c0fc"), (0.2, "p99", "#1c7ed6")):
            ax.bar([i + offset for i in x], [r[metric][stat] for _, r in rows], 0.4,
                   label=stat, color=color)
        ax.set_xticks(list(x), [label for label, _ in rows], fontsize=7, rotation=35,
                      ha="right")
        ax.set_ylabel("ms")
        ax.set_yscale(scale)
        ax.set_title(f"{title} (H100, llama3-8b, 512 requests)")
        ax.legend(fontsize=9)
    return _save(fig, out / "serve_latency.png")


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version: stable bytes
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=BENCH / "plots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for figure in (throughput_figure, decode_figure, serve_figure):
        print(figure(args.out))


if __name__ == "__main__":
    main()
