#!/usr/bin/env bash
# BENCHMARKS.md "serve" in one command: start a jaxpaged server on loopback, wait for its ready
# line (which names the URL) and a 200 from its /health, run bench/serving.py at each rate, then
# stop the server with SIGTERM.
#   bash bench/serve_bench.sh [RATE...]     rates in requests/s, inf = all at once (default: 16 inf)
# Writes $OUT/serve.json (the summaries) and $OUT/server.log. Exit status: serving.py's (1 when a
# request failed), else 1 when the server did not start or did not stop cleanly.
# Overrides (environment): PYTHON, OUT, SERVE_MODEL, SERVE_LOAD_FORMAT, SERVE_MAX_MODEL_LEN,
# SERVE_PORT, SERVE_NUM_REQUESTS, SERVE_PROMPT_LEN ("MIN MAX"), SERVE_OUTPUT_LEN ("MIN MAX"),
# SERVE_MAX_TOKEN_ID, SERVE_READY_TIMEOUT and SERVE_STOP_TIMEOUT (seconds), and extra flags:
# SERVE_SERVER_ARGS for the server, SERVE_BENCH_ARGS for serving.py.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/jaxpaged-out}
MODEL=${SERVE_MODEL:-bench/configs/llama3-8b}
LOAD_FORMAT=${SERVE_LOAD_FORMAT:-dummy}
MAX_MODEL_LEN=${SERVE_MAX_MODEL_LEN:-4096}
PORT=${SERVE_PORT:-0}  # 0: a free port, read from the server's ready line
NUM_REQUESTS=${SERVE_NUM_REQUESTS:-512}
PROMPT_LEN=${SERVE_PROMPT_LEN:-100 1024}
OUTPUT_LEN=${SERVE_OUTPUT_LEN:-100 512}
MAX_TOKEN_ID=${SERVE_MAX_TOKEN_ID:-10000}
READY_TIMEOUT=${SERVE_READY_TIMEOUT:-900}
STOP_TIMEOUT=${SERVE_STOP_TIMEOUT:-120}
if [ $# -gt 0 ]; then RATES=("$@"); else RATES=(16 inf); fi
mkdir -p "$OUT"
# One connection per request, in both processes.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

base_url=
server_pid=
server_rc=
bench_pid=

ready_url() {  # the URL of this server's "jaxpaged server ready at URL ..." log line, if any
  sed -n 's/.*jaxpaged server ready at \(http[^ ]*\).*/\1/p' "$OUT/server.log" | tail -n 1
}

healthy() {  # healthy URL: exit status 0 when GET URL/health answers 200
  "$PYTHON" - "$1/health" <<'EOF' 2>/dev/null
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

stop_server() {  # SIGTERM, wait up to STOP_TIMEOUT s, then SIGKILL; sets server_rc
  [ -n "$server_pid" ] || return 0
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null
    local waited=0
    while kill -0 "$server_pid" 2>/dev/null && [ "$waited" -lt "$STOP_TIMEOUT" ]; do
      sleep 1; waited=$((waited + 1))
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      echo "serve_bench: the server did not stop within ${STOP_TIMEOUT}s of SIGTERM; killing it" >&2
      kill -KILL "$server_pid" 2>/dev/null
    fi
  fi
  wait "$server_pid" 2>/dev/null
  server_rc=$?
  server_pid=
}
cleanup() {
  [ -n "$bench_pid" ] && kill -TERM "$bench_pid" 2>/dev/null
  stop_server
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "serve_bench: $*" >&2
  echo "serve_bench: last lines of $OUT/server.log:" >&2
  tail -n 30 "$OUT/server.log" >&2
  exit 1
}

: > "$OUT/server.log"
# shellcheck disable=SC2086  # SERVE_SERVER_ARGS is a list of flags
"$PYTHON" -m jaxpaged.server --model "$MODEL" --load-format "$LOAD_FORMAT" \
  --max-model-len "$MAX_MODEL_LEN" --host 127.0.0.1 --port "$PORT" --disable-access-log \
  ${SERVE_SERVER_ARGS:-} > "$OUT/server.log" 2>&1 &
server_pid=$!
start=$SECONDS
while :; do
  base_url=$(ready_url)
  [ -n "$base_url" ] && healthy "$base_url" && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    wait "$server_pid"; rc=$?; server_pid=
    fail "the server exited with status $rc before it was ready"
  fi
  [ $((SECONDS - start)) -ge "$READY_TIMEOUT" ] && \
    fail "the server was not ready (its ready line and GET /health == 200) within ${READY_TIMEOUT}s"
  sleep 1
done
echo "serve_bench: server ready at $base_url after $((SECONDS - start))s; rates: ${RATES[*]}"

# shellcheck disable=SC2086  # the length pairs and SERVE_BENCH_ARGS are word lists
"$PYTHON" bench/serving.py --base-url "$base_url" --rates "${RATES[@]}" \
  --num-requests "$NUM_REQUESTS" --prompt-len $PROMPT_LEN --output-len $OUTPUT_LEN \
  --max-token-id "$MAX_TOKEN_ID" --out "$OUT/serve.json" ${SERVE_BENCH_ARGS:-} &
bench_pid=$!  # waited on in the background so that a signal reaches the traps at once
wait "$bench_pid"
bench_rc=$?
bench_pid=

stop_server
echo "serve_bench: serving.py exit status $bench_rc, server exit status $server_rc"
[ "$bench_rc" -ne 0 ] && exit "$bench_rc"
[ "$server_rc" -ne 0 ] && exit 1
exit 0
