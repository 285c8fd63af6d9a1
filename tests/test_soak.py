"""The soak benchmark (bench/soak.py), bounded: a few hundred mixed requests (streams, n > 1,
long prompts, killed clients, oversize bodies, hostile fields, injected engine faults) against
the tiny model; every request accounted for, no block leaked, RSS and fds flat."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_accounts_for_every_request_and_leaks_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--model",
         str(tiny_checkpoint("llama3-rope")), "--requests", "300", "--window", "100",
         "--concurrency", "16", "--rss-bound-mib", "128", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text()) if out.exists() else None
    assert result.returncode == 0, (report, result.stderr[-3000:])
    assert report["unexpected"] == [] and sum(report["outcomes"].values()) == 300
    assert report["leaked_blocks"] == 0 and report["unfinished_in_engine"] == 0
    kinds = {key.partition(":")[0] for key in report["outcomes"]}
    assert {"fault", "kill", "hostile", "oversize", "n_best", "long"} <= kinds
    assert report["outcomes"].get("fault:500", 0) >= 1
