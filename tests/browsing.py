"""Headless Chromium for the browser tests: the system's chromium (Debian package), driven by
Playwright (its own browser download does not work offline)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")


@contextlib.contextmanager
def chromium():
    """A launched browser, closed afterwards whatever happened."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_ui(browser, url: str, width: int = 1400, height: int = 1000, ready: str = "#txt2img_prompt textarea"):
    """A new page on the app, returned once the UI has rendered (`ready` is on the page)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.wait_for_selector(ready, timeout=30000)
    return page


def set_number(page, elem_id: str, value) -> None:
    """Type into a Gradio Number/Slider box and commit it (Enter), as a user does."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
