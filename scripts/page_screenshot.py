"""The README's screenshot of the page (docs/page.png): a server on the default model (SmolLM2-135M-
Instruct, from the cache or PyPI) and headless Chromium asking it a question with n=3, caught while
the answers stream and the pool holds their blocks.

    .venv/bin/python scripts/page_screenshot.py [--out docs/page.png]

Needs Debian's chromium and chromium-driver (scripts/system_packages.sh) and the dev extra.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser_testing import headless_chromium, missing_browser  # noqa: E402
from server_testing import engine_config, start_server, wait_until  # noqa: E402

QUESTION = "Explain in a few sentences why a paged KV cache helps an LLM server."
ENGINE_ARGS = dict(dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=128,
                   num_gpu_blocks_override=160, block_size=16, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "page.png")
    args = parser.parse_args()
    if (reason := missing_browser()) is not None:
        sys.exit(reason)
    from jaxpaged.converters.default_model import default_model_dir

    server = start_server(engine_config(default_model_dir(), **ENGINE_ARGS),
                          served_model_names=("SmolLM2-135M-Instruct",))
    warm_up(server.base_url)
    browser = headless_chromium(1400, 1060)
    try:
        shoot(server, browser, args.out)
    finally:
        browser.quit()
        server.stop()
    print(args.out)


def warm_up(base_url: str) -> None:
    """Compile the step shapes the page will use, then let the compile-time steps leave the
    page's one-minute step-time chart."""
    import httpx

    for question in ("What is the capital of France?", QUESTION):
        httpx.post(f"{base_url}/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": question}], "n": 3, "max_tokens": 200})
    time.sleep(62)


def shoot(server, browser, out: pathlib.Path) -> None:
    from selenium.webdriver.common.by import By

    def element(element_id):
        return browser.find_element(By.ID, element_id)

    browser.get(f"{server.base_url}/")
    wait_until(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"),
               timeout=30)
    for field, value in (("max_tokens", "200"), ("n", "3"), ("temperature", "0.8")):
        element(field).clear()
        element(field).send_keys(value)
    # A first exchange, so that the screenshot shows a finished answer with its timings.
    element("prompt").send_keys("What is the capital of France?")
    element("send").click()
    wait_until(lambda: browser.find_elements(
        By.CSS_SELECTOR, ".message.assistant[data-state=done]"), timeout=300)
    element("prompt").send_keys(QUESTION)
    element("send").click()

    def streaming_with_text():
        answers = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
        return (len(answers) == 2 and answers[-1].get_attribute("data-state") == "streaming"
                and len(answers[-1].text) > 300)

    if not wait_until(streaming_with_text, timeout=300, interval=0.05):
        raise RuntimeError("the second answer never streamed 300 characters")
    out.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(out))
    wait_until(lambda: len(browser.find_elements(
        By.CSS_SELECTOR, ".message.assistant[data-state=done]")) == 2, timeout=300)


if __name__ == "__main__":
    main()
