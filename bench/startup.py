"""Start-up time (BENCHMARKS.md "startup"): process start to ready, split into weights, KV pool
allocation and compilation; cold (empty persistent compilation cache) then warm (same cache).

    python bench/startup.py --model bench/configs/llama3-8b --out OUT
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import emit  # noqa: E402

CHILD = """
import json, sys, time
start = time.perf_counter()
from jaxpaged import LLM
import jax
imported = time.perf_counter()
jax.devices()
backend = time.perf_counter()
llm = LLM(sys.argv[1], load_format="dummy", dtype="bfloat16", max_model_len=int(sys.argv[2]),
          compilation_cache_dir=sys.argv[3])
s = llm.llm_engine.startup
print("STARTUP " + json.dumps({"import_s": imported - start, "backend_init_s": backend - imported,
                              "weights_s": s.weights_s, "kv_alloc_s": s.kv_alloc_s,
                              "compile_s": s.compile_s}), flush=True)
"""


def start_once(model: str, max_model_len: int, cache_dir: str) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(max_model_len), cache_dir],
                          capture_output=True, text=True, check=True)
    ready = time.perf_counter() - start
    line = next(l for l in proc.stdout.splitlines() if l.startswith("STARTUP "))
    log = [l for l in proc.stderr.splitlines() if "engine ready" in l]
    return {"process_to_ready_s": ready, **json.loads(line[len("STARTUP "):]),
            "engine_log": log[-1] if log else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench/configs/llama3-8b")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        result = {"cold": start_once(args.model, args.max_model_len, cache_dir),
                  "warm": start_once(args.model, args.max_model_len, cache_dir)}
    emit(result, args.out, "startup.json")


if __name__ == "__main__":
    main()
