"""bench/quant_matmul.py on the CPU: its XLA candidates (the dynamic per-tensor yardstick
included) agree with their references, and ``--kernel-tables`` writes a table per candidate.
The times mean nothing here; the GPU stages (bench/gpu_check.sh) take them."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from quant_matmul import bench_shape  # noqa: E402


def test_xla_candidates_are_right_and_their_kernel_tables_are_written(tmp_path):
    rows = bench_shape(32, 256, 128, tiles=[], gemv_tiles=[],
                       kernel_tables=("w8a8_xla", "fp8_pertensor_dynamic_xla"),
                       tables_dir=tmp_path)
    by_kernel = {(r["kernel"], r["format"]): r for r in rows}
    for key in [("bf16_xla", "bf16"), ("dequant_xla", "fp8"), ("dequant_xla", "int8"),
                ("w8a8_xla", "fp8"), ("fp8_pertensor_xla", "fp8/tensor"),
                ("fp8_pertensor_dynamic_xla", "fp8/tensor")]:
        row = by_kernel[key]
        assert row["ok"] and row["us"] > 0, row
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kernels_fp8_pertensor_dynamic_xla_32_256x128.txt", "kernels_w8a8_xla-fp8_32_256x128.txt"]
    # no GPU here: the table says so rather than being empty
    assert "no GPU kernels" in (tmp_path / "kernels_w8a8_xla-fp8_32_256x128.txt").read_text()
