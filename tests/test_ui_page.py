"""The browser page (GET /) on a real server behind --api-key: served offline-ready without the key,
and driven by headless Chromium (Debian's chromium + chromium-driver, through Selenium, no browser
download): it asks for the key, streams an answer, and its block view fills while the request runs
and returns to free afterwards.

One server for the module; every step of the engine sleeps a little (``step_hook``) so that a
request stays in the pool across several polls of the page. On a failure the browser test saves a
screenshot and the page's console log under ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import time

import httpx
import pytest

from browser_testing import headless_chromium, missing_browser
from server_testing import API_KEY, MODEL, engine_config, start_server, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
STEP_DELAY_S = 0.04  # per engine step: 24 tokens stay in the pool ~1 s
STATIC = ("/static/main.js", "/static/api.js", "/static/chat.js", "/static/engine_view.js",
          "/static/style.css")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = start_server(engine_config(tiny_checkpoint(MODEL)), api_keys=(API_KEY,),
                           step_hook=lambda _: time.sleep(STEP_DELAY_S))
    yield running
    running.stop()


def test_page_and_its_files_are_served_without_the_key_and_load_nothing_from_elsewhere(server):
    page = httpx.get(f"{server.base_url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in STATIC:
        response = httpx.get(f"{server.base_url}{path}")
        assert response.status_code == 200, path
        assert not re.search(r"https?://", response.text), f"{path} refers to another site"
    assert not re.search(r"(src|href)=\"https?://", page.text)
    assert httpx.get(f"{server.base_url}/static/nothing.js").status_code == 404


def test_engine_state_needs_the_key_and_describes_the_pool(server):
    assert httpx.get(f"{server.base_url}/engine/state").status_code == 401
    state = httpx.get(f"{server.base_url}/engine/state",
                      headers={"Authorization": f"Bearer {API_KEY}"}).json()
    manager = server.engine.scheduler.block_manager
    assert state["num_blocks"] == manager.num_blocks - 1
    assert len(state["cells"]) == state["num_blocks"] and state["blocks_per_cell"] == 1
    assert sum(state["counts"].values()) == state["num_blocks"]
    assert state["num_running"] == 0 and state["num_waiting"] == 0


@pytest.fixture(scope="module")
def browser():
    reason = missing_browser()
    if reason is not None:
        pytest.skip(reason)
    driver = headless_chromium()
    yield driver
    driver.quit()


@pytest.mark.parametrize("host,origin,status", [
    ("box.example:8000", "http://box.example:8000", 200),  # the page's own calls
    ("box.example:8000", "http://box.example:9000", 403),
    ("box.example:8000", "http://other.example:8000", 403),
])
def test_any_host_server_takes_same_origin_calls_only(server, host, origin, status):
    """With every host allowed (no --allowed-hosts) the page's calls carry an Origin equal to the
    Host, and pass; other origins are still refused."""
    from jaxpaged.server.app import build_app
    from jaxpaged.server.settings import ServerSettings

    app = build_app(server.engine, ServerSettings(served_model_names=("tiny",),
                                                  api_keys=(API_KEY,)))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
            return await c.get("/v1/models", headers={
                "origin": origin, "authorization": f"Bearer {API_KEY}"})

    assert asyncio.run(scenario()).status_code == status


def _save_artifacts(browser, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    logs = "\n".join(str(entry) for entry in browser.get_log("browser"))
    (ARTIFACTS / f"{name}.console.txt").write_text(logs)


def _busy_blocks(cells: str | None) -> int:
    return sum(c in "23" for c in cells or "")


@pytest.mark.slow
def test_browser_asks_for_the_key_streams_an_answer_and_shows_the_pool(server, browser):
    try:
        _chat_in_the_browser(server, browser)
    except BaseException:
        _save_artifacts(browser, "test_ui_page")
        raise


def _chat_in_the_browser(server, browser) -> None:
    from selenium.webdriver.common.by import By

    def element(element_id):
        return browser.find_element(By.ID, element_id)

    def poll(predicate, timeout=20.0):
        assert wait_until(predicate, timeout=timeout, interval=0.02), predicate.__doc__

    browser.get(f"{server.base_url}/")
    poll(lambda: element("key-form").is_displayed())
    element("key-input").send_keys(API_KEY)
    element("key-form").submit()
    poll(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    poll(lambda: element("pool").get_attribute("data-cells"))
    num_blocks = server.engine.scheduler.block_manager.num_blocks - 1
    assert len(element("pool").get_attribute("data-cells")) == num_blocks
    assert _busy_blocks(element("pool").get_attribute("data-cells")) == 0

    for field, value in (("max_tokens", "24"), ("n", "2"), ("temperature", "1")):
        element(field).clear()
        element(field).send_keys(value)
    # A prompt longer than a block, so the two samples share its full blocks.
    element("prompt").send_keys("please tell me a long story about paged attention " * 3)
    element("send").click()

    seen = {"streamed": [], "busy": 0, "shared": 0}

    def answer_done():
        """the answer finished while the test watched its text and the pool"""
        answers = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
        if not answers:
            return False
        state = answers[-1].get_attribute("data-state")
        if state == "streaming" and answers[-1].text and not seen["streamed"]:
            seen["streamed"] = [c.text for c in
                                answers[-1].find_elements(By.CSS_SELECTOR, ".choice")]
        cells = element("pool").get_attribute("data-cells")
        seen["busy"] = max(seen["busy"], _busy_blocks(cells))
        seen["shared"] = max(seen["shared"], (cells or "").count("3"))
        return state in ("done", "error")

    poll(answer_done, timeout=60)
    answer = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    assert answer.get_attribute("data-state") == "done", answer.text
    assert seen["streamed"], "no text appeared before the answer finished"
    choices = [c.text for c in answer.find_elements(By.CSS_SELECTOR, ".choice")]
    assert len(choices) == 2 and all(choices)
    # the first text seen while streaming is where each final answer starts
    assert all(final.startswith(part) for final, part in zip(choices, seen["streamed"]))
    assert choices != seen["streamed"], "the answers did not grow after the text appeared"
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · 48 tokens", stats), stats
    assert seen["busy"] > 0, "the block view never showed a block in use"
    assert seen["shared"] > 0, "the block view never showed the samples' shared prompt blocks"

    def pool_is_free():
        """the block view returned to free (cached blocks stay reusable)"""
        cells = element("pool").get_attribute("data-cells")
        return _busy_blocks(cells) == 0 and element("count-in_use").text == "0"

    poll(pool_is_free)
    assert server.pool_is_full()
    assert int(element("count-free").text) + int(element("count-cached").text) == num_blocks

    # A value the server refuses: the answer shows the server's message naming the field.
    element("n").clear()
    element("n").send_keys("0")
    element("prompt").send_keys("again")
    element("send").click()
    poll(lambda: browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
         .get_attribute("data-state") == "error")
    assert "'n' must be in [1, " in browser.find_elements(
        By.CSS_SELECTOR, ".message.assistant")[-1].text
    assert element("send").is_enabled()
