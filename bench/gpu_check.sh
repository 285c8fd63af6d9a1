#!/usr/bin/env bash
# Everything the GPU machine checks and measures, in one call; a short table last.
#   bash bench/gpu_check.sh [stages...]   stages: env tests kernels engine throughput roofline
#   (fp8 KV: kernel-tests-fp8 kernels-fp8 kernels-fp8-e5m2; beam search: beam hf-beam
#    beam-steps (host ms per beam step; fails if the timed search compiles anything),
#    beam-steps-profile (the same with a cProfile of the timed search: beam-steps-profile.txt),
#    beam-steps-trace (then a traced search: GPU idle by host phase, beam/beam-kernels-w4.txt))
#   (quantized weights: quant-matmul quant-gemv decode-gemv quant-matmul-prefill kernel-tests-quant decode-fp8w
#    decode-int8w throughput-fp8w throughput-int8w throughput-fp8w-fp8kv start-70b-fp8;
#    above 16 tokens: quant-matmul-large quant-matmul-down kernel-tests-quant-xla, and
#    quant-matmul-kernels (the GPU kernels of one W8A8 call against the per-tensor pattern's);
#    nano vs bf16 in the same call: `throughput throughput-fp8w`)
#   (the page's live view, host only: live-view)
#   (tensor parallel, on a multi-GPU kind: tp-tests tp-allreduce tp-decode tp-nano; tp-tests
#    needs 8 GPUs for its TP=8 cases; TP_SIZES="2 4" narrows tp-decode and tp-nano)
#   (vLLM 0.24.0 in the same call, from the kit of `bash bench/vllm_kit.sh`: vllm-unpack keeps the
#    carried part(s) of .vllm-kit/ in /tmp/vllm-kit, vllm-nano unpacks the whole kit into
#    /tmp/vllm-site and runs bench/vllm_baseline.py on nano; `vllm-nano throughput`: vLLM, then us)
#   (data-parallel replicas on Ray, on a 2-GPU kind with ray installed: dp-serve)
# Needs the jaxpaged wheel in .whl/ (made here by `bash bench/make_wheels.sh`); logs go to $OUT.
# A stage named twice runs twice (the repeat logs under $OUT/STAGE-2, ...); STAGE-base runs the
# stage on the base wheel of an A/B (see below; logs under $OUT/STAGE-base).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jaxpaged-out}
mkdir -p "$OUT"
stages=${*:-env tests kernels engine throughput}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
# A/B runs: `bash bench/make_wheels.sh REV .whl-base` puts a base commit's wheel next to it, which
# STAGE-base runs (the executable cache keys on jaxpaged's sources, so they never mix).
if [ -d .whl-base ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-base .whl-base/jaxpaged-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export JAXPAGED_CACHE=/tmp/jaxpaged-cache
# Let XLA's allocator reach nearly the whole card (gpu_memory_utilization then applies to it), but
# grow on demand so that torch (the HF baselines, the copy-bandwidth check) can share the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 XLA_PYTHON_CLIENT_PREALLOCATE=false
summary=/tmp/jaxpaged-summary.txt
: > "$summary"

run() {  # run NAME TIMEOUT_S COMMAND...  (the summary names it $label: the stage as asked)
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  mkdir -p "$OUT"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-12s rc=%-3s %4ss  %s\n' "$label" "$rc" "$((SECONDS - start))" \
    "$(grep -E 'passed|failed|error' "$OUT/$name.log" | tail -1 | cut -c1-90)" >> "$summary"
}

root=$OUT
declare -A times_run=()
for label in $stages; do
  stage=${label%-base}
  count=$((${times_run[$label]:-0} + 1)); times_run[$label]=$count
  OUT=$root PYTHONPATH=/tmp/site
  if [ "$stage" != "$label" ]; then
    [ -d /tmp/site-base ] || { echo "$label: no .whl-base to run" >> "$summary"; continue; }
    OUT=$root/$label PYTHONPATH=/tmp/site-base
  fi
  if [ "$count" -gt 1 ]; then OUT=$root/$label-$count; fi
  case $stage in
    env) run env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
           python3 -c "import jax, flax, jaxlib; print(jax.__version__, flax.__version__, jax.devices())";
           git log -1 --format=%H 2>/dev/null || true;
           python3 -X importtime -c "import jaxpaged.llm, jaxpaged.server.app" 2>&1 | sort -t"|" -k2 -n | tail -12' ;;
    tests) run gpu-tests 420 python3 -m pytest -m gpu -q -x -p no:cacheprovider \
             tests/test_kernel_kv_write.py tests/test_kernel_rope_kv_write.py \
             tests/test_kernel_attention.py tests/test_gpu_engine.py ;;
    engine-tests) run gpu-engine-tests 200 python3 -m pytest -m gpu -q -x -p no:cacheprovider \
             tests/test_gpu_engine.py ;;
    decode) run decode 300 python3 bench/decode_steps.py --batches 1 64 256 --steps 10 \
             --kv-bytes 8 0 --dump-hlo --out "$OUT" ;;
    decode-dsf) XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true" run decode-dsf 300 \
             python3 bench/decode_steps.py --batches 1 64 256 --steps 10 --kv-bytes 8 --dump-hlo \
             --out "$OUT/dsf" ;;
    decode-plain) run decode 300 python3 bench/decode_steps.py --batches 1 16 64 256 --steps 10 \
             --kv-bytes 40 --no-async-scheduling --profile 64 256 --trace 1 256 --out "$OUT" ;;
    decode-cublas) XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run decode-cublas 300 \
             python3 bench/decode_steps.py --batches 1 64 256 --steps 10 --kv-bytes 40 \
             --out "$OUT/cublas" ;;
    throughput-cublas) XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run throughput-cublas 300 \
             python3 bench/throughput.py --workload nano --out "$OUT/cublas" ;;
    decode-ladder) run decode-ladder 300 python3 bench/decode_steps.py --batches 1 8 16 32 64 256 \
             --steps 10 --kv-bytes 40 --out "$OUT/ladder" ;;
    decode-async) run decode-async 300 python3 bench/decode_steps.py --batches 1 16 64 256 \
             --steps 10 --kv-bytes 40 --profile 256 --trace 1 256 --out "$OUT/async" ;;
    throughput-trace) run throughput-trace 540 python3 bench/throughput.py --workload nano --trace \
             --out "$OUT/nano" ;;
    throughput-sync) run throughput-sync 540 python3 bench/throughput.py --workload nano \
             --no-async-scheduling --out "$OUT/sync" ;;
    hf) run hf 400 python3 bench/hf_baseline.py --workload nano --num-requests 64 --out "$OUT" ;;
    hf-half1) run hf-half1 590 python3 bench/hf_baseline.py --workload nano --num-requests 128 \
             --out "$OUT/hf1" ;;
    hf-half2) run hf-half2 590 python3 bench/hf_baseline.py --workload nano --first-request 128 \
             --out "$OUT/hf2" ;;
    serve-16) run serve-16 300 env OUT="$OUT/s8192" bash bench/serve_bench.sh 16 ;;
    serve-1024) run serve-1024 300 env OUT="$OUT/s1024" SERVE_SERVER_ARGS="--max-num-batched-tokens 1024" \
             bash bench/serve_bench.sh 16 ;;
    serve-512) run serve-512 300 env OUT="$OUT/s512" SERVE_SERVER_ARGS="--max-num-batched-tokens 512" \
             bash bench/serve_bench.sh 16 ;;
    hf-cb) run hf-cb 420 python3 bench/hf_baseline.py --method generate_batch --workload nano \
             --num-requests 64 --time-limit 240 --out "$OUT" ;;
    hf-cb-graphs) run hf-cb-graphs 420 python3 bench/hf_baseline.py --method generate_batch \
             --cuda-graphs on --workload nano --num-requests 64 --time-limit 240 --out "$OUT/graphs" ;;
    serve) run serve 580 env OUT="$OUT" bash bench/serve_bench.sh 16 inf ;;
    serve-2048) run serve-2048 300 env OUT="$OUT/s2048" SERVE_SERVER_ARGS="--max-num-batched-tokens 2048" \
             bash bench/serve_bench.sh 16 ;;
    structured) run structured 600 python3 bench/structured.py --structured-fraction 0.5 \
             --num-requests 64 --max-num-seqs 64 --out "$OUT/structured" ;;
    nano64) run nano64 300 python3 bench/throughput.py --workload nano --num-requests 64 \
             --out "$OUT/nano64" ;;
    startup) run startup 400 python3 bench/startup.py --out "$OUT" ;;
    live-view) run live-view 120 python3 bench/live_view.py --blocks 16384 65536 262144 \
             --batch 256 --context 1024 --step-ms 10 --out "$OUT" ;;
    kernel-variants) run kernel-variants 330 python3 bench/kernels.py --variants-only \
             --decode-variants legacy,example_like,every,last,last_head_inner,hpp2_pps2 \
             --out "$OUT/var" ;;
    kernel-tests) run kernel-tests 200 python3 -m pytest -m gpu -q -x -p no:cacheprovider \
             tests/test_kernel_attention.py tests/test_kernel_kv_write.py tests/test_kernel_rope_kv_write.py ;;
    kernel-small) run kernel-small 200 python3 bench/kernels.py --variants-only \
             --decode-variants hpp2_pps2,hpp4_pps1,hpp2_pps2+pages_per_step=1,hpp2_pps2+num_warps=2 \
             --decode-shapes 1x4096,8x4096 --decode-splits 16,32,64,128 --out "$OUT/small" ;;
    diag-b1) run diag-b1 300 python3 bench/decode_steps.py --batches 1 --steps 10 --kv-bytes 8 \
             --dump-hlo --trace 1 --out "$OUT/b1" ;;
    kernel-1x4096) run kernel-1x4096 300 python3 bench/kernels.py --variants-only \
             --decode-variants hpp2_pps2,hpp2_pps2+pages_per_step=4,hpp2_pps2+num_stages=3,hpp2_pps2+num_warps=8,hpp4_pps1+pages_per_step=4,hpp2_pps2+pages_per_step=4+num_warps=8 \
             --decode-shapes 1x4096 --decode-splits 32,64,128 --out "$OUT/small" ;;
    kernel-64x2048) run kernel-64x2048 300 python3 bench/kernels.py --variants-only \
             --decode-variants default,default+num_warps=8,default+pages_per_step=8,default+num_stages=3,default+pages_per_step=2,default+launch_order=head_inner \
             --decode-shapes 64x2048 --out "$OUT/b64" ;;
    prefill) run prefill 240 python3 bench/prefill.py --trace --out "$OUT" ;;
    kernels) run kernels 300 python3 bench/kernels.py --check --out "$OUT" ;;
    kernels-quick) run kernels 200 python3 bench/kernels.py --check --no-sweep --out "$OUT" ;;
    kernels-fp8) run kernels-fp8 420 python3 bench/kernels.py --check --no-sweep --kv-dtype fp8 \
             --out "$OUT/fp8" ;;
    kernels-fp8-variants) run kernels-fp8-variants 420 python3 bench/kernels.py --no-sweep \
             --kv-dtype fp8 --fp8-decode-variants fp8_compute=query,pages_per_step=8 \
             --out "$OUT/fp8v" ;;
    kernels-fp8-sweep) run kernels-fp8-sweep 540 python3 bench/kernels.py --no-sweep \
             --kv-dtype fp8 --fp8-decode-variants \
             num_stages=3,num_stages=4,num_warps=8,pages_per_step=16,pages_per_step=16+num_warps=8,pages_per_step=16+num_stages=3 \
             --out "$OUT/fp8s" ;;
    kernels-fp8-e5m2) run kernels-fp8-e5m2 420 python3 bench/kernels.py --check --no-sweep \
             --kv-dtype fp8_e5m2 --out "$OUT/fp8-e5m2" ;;
    kernel-tests-fp8) run kernel-tests-fp8 200 python3 -m pytest -m gpu -q -p no:cacheprovider \
             -k fp8 tests/test_kernel_attention.py tests/test_kernel_kv_write.py \
             tests/test_kernel_rope_kv_write.py ;;
    engine) run engine 300 python3 bench/throughput.py --workload fixed --num-requests 64 --out "$OUT" ;;
    decode-large) run decode-large 300 python3 bench/decode_steps.py --batches 32 64 256 \
             --steps 10 --kv-bytes 40 --out "$OUT/large" ;;
    throughput) run throughput 540 python3 bench/throughput.py --workload nano --kv-waste --out "$OUT" ;;
    throughput-fp8kv) run throughput-fp8kv 540 python3 bench/throughput.py --workload nano \
             --kv-cache-dtype fp8 --out "$OUT/fp8kv" ;;
    roofline) run roofline 120 python3 bench/roofline.py --out "$OUT" ;;
    beam) run beam 420 python3 bench/beam_search.py --beam-widths 4 8 --out "$OUT/beam" ;;
    beam-steps) run beam-steps 420 python3 bench/beam_steps.py --model bench/configs/llama3-8b \
             --load-format dummy --dtype bfloat16 --prompt-len 128 --max-tokens 128 \
             --max-model-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192 \
             --out "$OUT/beam" ;;
    beam-steps-trace) run beam-steps-trace 420 python3 bench/beam_steps.py \
             --model bench/configs/llama3-8b --load-format dummy --dtype bfloat16 \
             --prompt-len 128 --max-tokens 128 --max-model-len 1024 --max-num-seqs 256 \
             --max-num-batched-tokens 8192 --trace "$OUT/beam" ;;
    beam-steps-profile) run beam-steps-profile 420 python3 bench/beam_steps.py \
             --model bench/configs/llama3-8b --load-format dummy --dtype bfloat16 \
             --prompt-len 128 --max-tokens 128 --max-model-len 1024 --max-num-seqs 256 \
             --max-num-batched-tokens 8192 --profile "$OUT/beam/beam-steps-profile.txt" ;;
    hf-beam) run hf-beam 540 python3 bench/hf_beam_baseline.py --beam-widths 4 8 \
             --out "$OUT/beam" ;;
    quant-matmul) run quant-matmul 590 python3 bench/quant_matmul.py --m 1 16 64 \
             --out "$OUT/quant-matmul" ;;
    quant-gemv) run quant-gemv 590 bash -c "python3 bench/quant_matmul.py --m 1 \
             --tiles 16x128x128/2/4/4 16x64x256/4/4/3 --out $OUT/gemv-m1 &&
           python3 bench/quant_matmul.py --m 4 8 --tiles 16x128x128/2/4/4 \
             --gemv-tiles 32x256/0/4/2 16x256/0/4/2 32x128/0/4/2 --out $OUT/gemv-m48" ;;
    quant-gemv-tiles) run quant-gemv-tiles 590 python3 bench/quant_matmul.py --m 1 2 --tiles 16x128x128/2/4/4 \
             --gemv-tiles 32x256/0/8/2 32x256/0/8/2/1056 32x256/0/8/3/1056 16x512/0/8/2/1056 \
             64x256/0/8/2 64x256/0/8/2/1056 32x512/0/8/2 32x256/0/8/1/1056 64x512/0/16/2 \
             32x256/0/4/2/1056 --out "$OUT/gemv-tiles" ;;
    decode-gemv) run decode-gemv-bf16 420 python3 bench/decode_steps.py --batches 1 4 --steps 10 \
             --kv-bytes 40 --out "$OUT/gemv-bf16"
           run decode-fp8w-auto 420 python3 bench/decode_steps.py --batches 1 4 --steps 10 \
             --kv-bytes 40 --quantization fp8 --out "$OUT/auto-fp8w"
           run decode-gemv 420 python3 bench/decode_steps.py --batches 1 4 --steps 10 \
             --kv-bytes 40 --quantization fp8 --quant-matmul-kernel w8a16_gemv --out "$OUT/gemv-fp8w" ;;
    quant-matmul-prefill) run quant-matmul-prefill 590 python3 bench/quant_matmul.py \
             --m 256 1024 2048 --out "$OUT/quant-matmul-prefill" ;;
    quant-matmul-large) run quant-matmul-large 590 python3 bench/quant_matmul.py --m 256 2048 \
             --step-options --kn --no-tiles --out "$OUT/quant-matmul-large" ;;
    quant-matmul-down) run quant-matmul-down 400 python3 bench/quant_matmul.py --m 256 2048 \
             --shapes down --step-options --tiles 64x64x128/1/4/3 128x128x64/1/8/3 \
             128x64x64/1/4/4 --out "$OUT/quant-matmul-down" ;;
    quant-matmul-kernels) run quant-matmul-kernels 400 python3 bench/quant_matmul.py \
             --m 256 2048 --shapes down gate_up --step-options --no-tiles \
             --kernel-tables w8a8_xla fp8_pertensor_xla fp8_pertensor_dynamic_xla \
             --out "$OUT/quant-matmul-kernels" ;;
    kernel-tests-quant-xla) run kernel-tests-quant-xla 200 python3 -m pytest -m gpu -q \
             -p no:cacheprovider tests/test_kernel_quant_matmul.py -k "w8a8_xla or auto" ;;
    kernels-fp8-stages) run kernels-fp8-stages 300 python3 bench/kernels.py --no-sweep \
             --kv-dtype fp8 --fp8-decode-variants \
             pages_per_step=8+num_stages=3,pages_per_step=8+num_stages=4 --out "$OUT/fp8st" ;;
    kernel-tests-quant) run kernel-tests-quant 300 python3 -m pytest -m gpu -q \
             -p no:cacheprovider tests/test_kernel_quant_matmul.py ;;
    decode-fp8w) run decode-fp8w-bf16 420 python3 bench/decode_steps.py --batches 1 16 64 256 \
             --steps 10 --kv-bytes 40 --out "$OUT/fp8w-bf16"
           run decode-fp8w 420 python3 bench/decode_steps.py --batches 1 16 64 256 --steps 10 \
             --kv-bytes 40 --quantization fp8 --out "$OUT/fp8w" ;;
    decode-int8w) run decode-int8w 420 python3 bench/decode_steps.py --batches 1 16 64 256 \
             --steps 10 --kv-bytes 40 --quantization int8 --out "$OUT/int8w" ;;
    throughput-fp8w) run throughput-fp8w 540 python3 bench/throughput.py --workload nano \
             --quantization fp8 --out "$OUT/fp8w" ;;
    throughput-int8w) run throughput-int8w 540 python3 bench/throughput.py --workload nano \
             --quantization int8 --out "$OUT/int8w" ;;
    throughput-fp8w-fp8kv) run throughput-fp8w-fp8kv 540 python3 bench/throughput.py \
             --workload nano --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/fp8w-fp8kv" ;;
    start-70b-fp8) run start-70b-fp8 590 python3 bench/throughput.py \
             --model bench/configs/llama3-70b --workload nano --quantization fp8 \
             --out "$OUT/70b-fp8" ;;
    # Tensor parallel (multi-GPU kinds): each TP degree up to the GPUs present, one after another.
    tp-tests) run tp-tests 500 python3 -m pytest -q -x -p no:cacheprovider \
             tests/test_tensor_parallel.py tests/test_tensor_parallel_engine.py ;;
    tp-allreduce) run tp-allreduce 300 python3 bench/all_reduce.py --sizes 2 4 8 --out "$OUT/tp" ;;
    tp-decode) run tp-decode 590 bash -c 'n=$(nvidia-smi -L | wc -l); for tp in ${TP_SIZES:-1 2 4 8}; do
             [ "$tp" -le "$n" ] || continue; python3 bench/decode_steps.py --batches 1 64 256 \
             --steps 10 --kv-bytes 8 --tensor-parallel-size "$tp" --out "$0/tp" || exit 1; done' \
             "$OUT" ;;
    tp-nano) run tp-nano 590 bash -c 'n=$(nvidia-smi -L | wc -l); for tp in ${TP_SIZES:-1 2 4 8}; do
             [ "$tp" -le "$n" ] || continue; python3 bench/throughput.py --workload nano \
             --tensor-parallel-size "$tp" --out "$0/tp$tp" || exit 1; done' "$OUT" ;;
    # vLLM from the kit (its own PYTHONPATH: the kit's pydantic, starlette... not jaxpaged's)
    vllm-unpack) run vllm-unpack 120 bash bench/vllm_kit_install.sh gather
           tail -1 "$OUT/vllm-unpack.log" >> "$summary" ;;
    vllm-nano) run vllm-install 120 bash bench/vllm_kit_install.sh install
           tail -1 "$OUT/vllm-install.log" >> "$summary"
           if grep -qE "^vllm kit: (already )?unpacked" "$OUT/vllm-install.log"; then
             PYTHONPATH=/tmp/vllm-site run vllm-nano 400 python3 bench/vllm_baseline.py \
               --workload nano --out "$OUT"
           else echo "vllm-nano: not run (no complete kit)" >> "$summary"; fi ;;
    # Data-parallel replicas on Ray (a 2-GPU kind): the serving workload over two replicas of one
    # GPU each, behind one server; `serve dp-serve` in one call compares it with one engine.
    dp-serve) if python3 -c "import ray" 2>/dev/null; then
             run dp-serve 590 env OUT="$OUT/dp" SERVE_SERVER_ARGS="--data-parallel-size 2" \
               bash bench/serve_bench.sh 16 inf
           else echo "dp-serve: ray is not installed on this machine (pip install \"jaxpaged[ray]\")" \
               >> "$summary"; fi ;;
    *) echo "unknown stage $label" >> "$summary" ;;
  esac
done
OUT=$root PYTHONPATH=/tmp/site
for f in "$OUT"/*.json "$OUT"/*/*.json "$OUT"/*/*/*.json; do [ -f "$f" ] && echo "== $(basename "$f")" && head -c 1500 "$f" && echo; done
# Everything in one archive: the device tool brings back at most 8 files.
tar czf /tmp/logs.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/logs.tgz "$OUT/"
cp "$summary" "$OUT/" 2>/dev/null || true
echo "== summary"; cat "$summary"
