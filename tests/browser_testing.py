"""Headless Chromium from Debian's ``chromium`` and ``chromium-driver`` packages, through Selenium
(no browser download): for the page's browser test and scripts/page_screenshot.py."""

from __future__ import annotations

import shutil


def missing_browser() -> str | None:
    """Why no headless Chromium can start here (None when it can)."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed: scripts/system_packages.sh installs "
                "Debian's chromium and chromium-driver (it needs apt and root)")
    return None


def headless_chromium(width: int = 1280, height: int = 860):
    """A Selenium Chrome driver on Debian's Chromium, its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--disable-extensions",
                     "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
