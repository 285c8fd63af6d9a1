"""`jaxpaged serve` as users run it: a subprocess that says where it listens, serves, and on
SIGTERM finishes the requests in flight and exits with status 0."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading

import httpx
import jax

from server_testing import MODEL, MODEL_NAME
from test_serve_args import LAUNCH_LINE, make_hub_cache

BIN = pathlib.Path(sys.executable).parent
READY = re.compile(r"jaxpaged server ready at (http://127\.0\.0\.1:\d+)")
# Bounds on waits that take seconds (start-up, the first step compiling its shapes), generous for
# a CI machine busy with other tests: they only bound how long a failure takes to show.
READY_TIMEOUT_S = 300
STREAM_TIMEOUT_S = 300


def start_serve(model_dir: pathlib.Path, model_args: list[str] | None = None,
                env: dict[str, str] | None = None, extra: list[str] = ()
                ) -> tuple[subprocess.Popen, str, list[str]]:
    """Starts `jaxpaged serve --port 0` (``model_args``: how the model is named, default
    ``--model DIR --served-model-name tiny``; ``extra``: more flags, later ones win); returns
    the process, its URL and its growing log."""
    if model_args is None:
        model_args = ["--model", str(model_dir), "--served-model-name", MODEL_NAME]
    command = [str(BIN / "jaxpaged"), "serve", *model_args, "--port", "0",
               "--dtype", "float32", "--max-model-len", "128",
               "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
               "--num-gpu-blocks-override", "64", "--disable-access-log",
               # the test session's cache: the same step shapes compile once
               "--compilation-cache-dir", jax.config.jax_compilation_cache_dir or "", *extra]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, env=env)
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read_log():
        for line in process.stderr:
            log.append(line)
            match = READY.search(line)
            if match and not found.is_set():
                url.append(match.group(1))
                found.set()
        found.set()  # the process ended

    threading.Thread(target=read_log, daemon=True).start()
    if not found.wait(timeout=READY_TIMEOUT_S) or not url:
        process.kill()
        raise AssertionError("jaxpaged serve did not get ready:\n" + "".join(log))
    return process, url[0], log


# What a client may see when its request reaches a draining server: uvicorn stops listening and
# closes its idle connections on the exit signal, so a request it still reads gets 503, and one that
# raced the closing is refused or closed unanswered. Each means "not run": retry elsewhere.
NOT_SERVED_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.WriteError,
                     httpx.RemoteProtocolError)


def late_request_outcome(url: str) -> str:
    """"503", "not served" (a transport error that says the request was never answered), or
    what else happened (a 200, a timeout: the caller's check fails on it)."""
    try:
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"model": MODEL_NAME, "prompt": "late", "max_tokens": 2})
    except httpx.HTTPError as e:
        unanswered = isinstance(e, NOT_SERVED_ERRORS) and not (
            isinstance(e, httpx.RemoteProtocolError) and "without sending a response" not in str(e))
        return "not served" if unanswered else f"{type(e).__name__}: {e}"
    if response.status_code == 503 and response.json()["error"]["code"] == "unavailable":
        return "503"
    return f"{response.status_code}: {response.text[:200]}"


def test_sigterm_drains_requests_in_flight_and_exits_0(tiny_checkpoint):
    process, url, log = start_serve(tiny_checkpoint(MODEL))
    try:
        streams_started = threading.Barrier(4)
        results: list[tuple[int, str]] = []

        def stream_one():
            body = {"model": MODEL_NAME, "prompt": "Drain me", "max_tokens": 120,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body,
                              timeout=STREAM_TIMEOUT_S) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                streams_started.wait(timeout=STREAM_TIMEOUT_S)
                rest = [line for line in lines if line.startswith("data: ")]
                results.append((r.status_code, ([first] + rest)[-1]))

        clients = [threading.Thread(target=stream_one) for _ in range(3)]
        for c in clients:
            c.start()
        streams_started.wait(timeout=STREAM_TIMEOUT_S)  # every request is mid-stream
        process.send_signal(signal.SIGTERM)
        late = late_request_outcome(url)  # checked after the streams: a failure here must not
        for c in clients:                 # kill the server under them
            c.join(timeout=STREAM_TIMEOUT_S)
        assert results == [(200, "data: [DONE]")] * 3, (results, late, "".join(log))
        assert late in ("503", "not served"), late
        assert process.wait(timeout=60) == 0, "".join(log)
        text = "".join(log)
        assert "Shutting down" in text and "Traceback" not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_streams_past_the_graceful_shutdown_time_end_with_an_error_event(tiny_checkpoint):
    """Issue #22 case 8: a stream still running when --timeout-graceful-shutdown is over is
    ended by the engine with an error event and [DONE], not cut."""
    process, url, log = start_serve(tiny_checkpoint(MODEL), [
        "--model", str(tiny_checkpoint(MODEL)), "--served-model-name", MODEL_NAME,
        "--timeout-graceful-shutdown", "0.5"])
    try:
        started = threading.Barrier(3)
        results: list[list[str]] = []

        def stream_one():
            body = {"model": MODEL_NAME, "prompt": [5], "max_tokens": 120, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body,
                              timeout=STREAM_TIMEOUT_S) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                started.wait(timeout=STREAM_TIMEOUT_S)
                results.append([first] + [line for line in lines if line.startswith("data: ")])

        clients = [threading.Thread(target=stream_one) for _ in range(2)]
        for c in clients:
            c.start()
        started.wait(timeout=STREAM_TIMEOUT_S)
        process.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(timeout=STREAM_TIMEOUT_S)
        assert len(results) == 2 and all(lines[-1] == "data: [DONE]" for lines in results)
        assert process.wait(timeout=60) == 0, "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_module_entry_point_takes_the_same_arguments():
    result = subprocess.run([sys.executable, "-m", "jaxpaged.server", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--api-key", "--served-model-name", "--max-model-len", "--max-waiting",
                 "--gpu-memory-utilization", "--no-enable-prefix-caching"):
        assert flag in result.stdout


def test_a_vllm_launch_line_with_a_hub_id_serves_from_the_local_cache(tiny_checkpoint, tmp_path):
    """`jaxpaged serve org/name -tp 1 --enforce-eager ...` as vLLM users type it, offline."""
    hub = tmp_path / "hub"
    make_hub_cache(hub, "org/tiny-llama", sorted(tiny_checkpoint(MODEL).iterdir()))
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    process, url, log = start_serve(tiny_checkpoint(MODEL), ["org/tiny-llama", *LAUNCH_LINE],
                                    env=env)
    try:
        assert httpx.get(f"{url}/v1/models/org/tiny-llama", timeout=30).json()["id"] == \
            "org/tiny-llama"
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "org/tiny-llama", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, "".join(log)
