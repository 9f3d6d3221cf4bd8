""""Use recommended settings" in a real browser: the page served in-process over the fake engine.
The button sits beside the sampler, fills sampler, schedule type, steps and CFG, and a toast says
why (or that nothing was recognised). Screenshots at three window sizes go to
/tmp/shots/speed21/ (or $RECOMMENDED_SHOTS)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from browsing import chromium, needs_chromium, open_ui
from test_webui import FakeEngine

from webui.app import build_ui

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("RECOMMENDED_SHOTS", "/tmp/shots/speed21"))
SIZES = ((1280, 800), (1440, 1000), (390, 844))
PORTS = range(7910, 7920)  # this test's own range


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def served():
    engine = FakeEngine()
    blocks = build_ui(engine)
    port = next(p for p in PORTS if port_free(p))
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                              **blocks.webui.launch_kwargs())
    try:
        yield url, engine
    finally:
        blocks.close()


def field(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


@needs_chromium
def test_the_button_fills_the_sampling_settings_and_says_why(served):
    url, engine = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        for width, height in SIZES:
            page = open_ui(browser, url, width=width, height=height)
            button = page.locator("#txt2img_recommended")
            sampler = page.locator("#txt2img_sampler")
            assert button.inner_text().strip() == "Use recommended settings"
            # beside the sampler: in its row (or just under it when the window is narrow)
            box, beside = button.bounding_box(), sampler.bounding_box()
            assert 0 <= box["x"] and box["x"] + box["width"] <= width + 1
            assert abs(box["y"] - beside["y"]) < 160

            page.click("#txt2img_prompt textarea")
            page.fill("#txt2img_prompt textarea", "a cat")
            button.click()
            toast = page.wait_for_selector(".toast-body", timeout=15000)
            assert "No few-step or guidance-distilled model recognised" in toast.inner_text()
            assert field(page, "txt2img_sampler") != "DDIM"
            page.locator(".toast-body .toast-close, .toast-close").first.click()

            page.fill("#txt2img_prompt textarea", "a cat <lora:fast8:1>")
            button.click()
            page.wait_for_function("() => document.querySelector('#txt2img_steps input[type=number]').value === '8'",
                                   timeout=15000)
            toast = page.locator(".toast-body", has_text="Fast 8-step").first
            toast.wait_for(timeout=15000)
            assert "fast8.safetensors (LoRA in the prompt)" in toast.inner_text()
            assert field(page, "txt2img_sampler") == "Euler"
            assert field(page, "txt2img_schedule") == "Karras"  # kept when the sampler's change re-lists them
            assert page.locator("#txt2img_cfg_scale input[type=number]").input_value() == "1"
            assert engine.recommended[-1] == ("sd15", "a cat <lora:fast8:1>")
            sampler.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            page.screenshot(path=str(SHOTS / f"txt2img_{width}x{height}.png"))
            page.close()
