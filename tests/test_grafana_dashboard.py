"""deploy/grafana/jaxpaged.json against a real Prometheus (Debian's ``prometheus``) scraping a real
jaxpaged server: after some traffic, every panel's query returns data.

Grafana's variables are replaced as Grafana would: ``$model_name`` by the served name (a regex
matcher), ``$__rate_interval`` by a window that holds the whole test's traffic.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import socket
import subprocess
import time

import httpx
import openai
import pytest

from server_testing import MODEL, MODEL_NAME, engine_config, start_server, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "jaxpaged.json"
RATE_WINDOW = "2m"
# Panels whose query must be above 0 after the traffic below (the others may read 0).
NONZERO = {"Token throughput", "Finished requests", "Time to first token",
           "Time per output token", "Inter-token latency", "End-to-end request latency",
           "Prefix cache hit rate"}


def _targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A Prometheus scraping the server every second; yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed: scripts/system_packages.sh installs Debian's "
                    "prometheus (it needs apt and root)")
    root = tmp_path_factory.mktemp("prometheus")
    target = server.base_url.removeprefix("http://")
    (root / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: jaxpaged, static_configs: [{{targets: ['{target}']}}]}}]\n")
    port = _free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(root / "prometheus.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _ready(url), timeout=30), (root / "prometheus.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _query(url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _traffic(server) -> None:
    """Streamed chats (TTFT, ITL, TPOT), the same long prompt again (prefix-cache hits)."""
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as c:
        prompt = "the block pool fills, shares and frees blocks as requests come and go " * 2
        for _ in range(3):
            stream = c.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": prompt}],
                max_tokens=12, temperature=0, stream=True)
            assert sum(1 for _ in stream) > 1


def test_dashboard_is_grafana_json_over_served_metrics(server):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    served = httpx.get(f"{server.base_url}/metrics").text
    for title, expr in _targets():
        for name in {w for w in expr.replace("(", " ").replace("{", " ").split()
                     if w.startswith(("vllm:", "jaxpaged:"))}:
            assert f"\n{name}{{" in served, f"{title}: {name} is not served"


@pytest.mark.slow
def test_every_panel_query_returns_data_from_a_real_prometheus(server, prometheus):
    # A scrape before the traffic, so that the counters' increase falls inside the window.
    assert wait_until(lambda: _query(prometheus, "vllm:prompt_tokens_total"), timeout=30)
    _traffic(server)
    tokens = server.app.state.context.metrics.generation_tokens._value.get()
    # Wait for a scrape that saw all the traffic, then one more (rate needs two samples).
    assert wait_until(lambda: any(float(s["value"][1]) >= tokens for s in _query(
        prometheus, f'vllm:generation_tokens_total{{model_name="{MODEL_NAME}"}}')), timeout=30)
    time.sleep(1.5)
    names = httpx.get(f"{prometheus}/api/v1/label/model_name/values").json()["data"]
    assert MODEL_NAME in names  # the dashboard's $model_name variable
    for title, expr in _targets():
        expr = expr.replace("$model_name", MODEL_NAME).replace("$__rate_interval", RATE_WINDOW)
        result = _query(prometheus, expr)
        assert result, f"{title}: {expr} returned no data"
        values = [float(sample["value"][1]) for sample in result]
        assert all(math.isfinite(v) for v in values), (title, expr, values)
        if title in NONZERO:
            assert max(values) > 0, (title, expr, values)
