"""The ControlNet units in a real browser: the page served in-process over the fake engine.

Screenshots of the accordion at three window sizes go to /tmp/cn_shots/ (or $CN_SHOTS).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browsing import chromium, needs_chromium, open_ui, set_number
from PIL import Image, ImageDraw
from serving import free_port
from test_controlnet_tab import ControlEngine

from webui.app import build_ui

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("CN_SHOTS", "/tmp/cn_shots"))
SIZES = ((1280, 800), (1440, 1000), (390, 844))


@pytest.fixture
def served():
    """(url, engine): the UI over a fake engine with one control model, in this process."""
    engine = ControlEngine()
    blocks = build_ui(engine)
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                              quiet=True, **blocks.webui.launch_kwargs())
    try:
        yield url, engine
    finally:
        blocks.close()


def square_picture(path: Path) -> Path:
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).rectangle((24, 16, 72, 48), fill="black")
    image.save(path)
    return path


def pick(page, elem_id: str, choice: str) -> None:
    """Choose `choice` in a Gradio dropdown as a user does: open it, click the option."""
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=choice, exact=True).click()


def open_controlnet(page, mode: str = "txt2img") -> None:
    page.click(f"#{mode}_controlnet > button")
    page.wait_for_selector(f"#{mode}_controlnet_0_enabled", state="visible", timeout=10000)


def unit_tabs(page, mode: str = "txt2img") -> list[str]:
    """The unit tabs' labels: those in the tab bar, then those Gradio moved into its "More tabs" menu
    on a narrow screen (opened to read them, as a user does)."""
    units = page.locator(f"#{mode}_controlnet_units")
    labels = units.locator("[role=tablist] button[role=tab]").all_inner_texts()
    more = units.locator(".overflow-menu:not(.hide) button[aria-label='More tabs']")
    if more.count():
        more.click()
        labels += units.locator(".overflow-dropdown button").all_inner_texts()
    return [label.strip() for label in labels]


@needs_chromium
def test_units_look_right_at_three_sizes(served):
    url, _ = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        for width, height in SIZES:
            page = open_ui(browser, url, width=width, height=height)
            for mode in ("txt2img", "img2img"):
                page.get_by_role("tab", name=mode, exact=True).click()
                open_controlnet(page, mode)
                accordion = page.locator(f"#{mode}_controlnet")
                accordion.scroll_into_view_if_needed()
                page.wait_for_timeout(500)  # the unit tabs measure themselves once shown
                assert "not stored in the PNG" in accordion.inner_text()
                box = accordion.bounding_box()
                assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1  # nothing runs off the side
                accordion.screenshot(path=str(SHOTS / f"{mode}_{width}x{height}.png"))
                assert page.is_visible(f"#{mode}_controlnet_0_use_input") == (mode == "img2img")
                labels = unit_tabs(page, mode)
                assert labels == ["ControlNet Unit 0", "ControlNet Unit 1", "ControlNet Unit 2"], (mode, width)
            if width < 600:  # the units Gradio moved into its "More tabs" menu, shown
                accordion.screenshot(path=str(SHOTS / f"{mode}_{width}x{height}_more_tabs.png"))
            page.close()


@needs_chromium
def test_enable_a_unit_preview_and_generate(served, tmp_path):
    url, engine = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    picture = square_picture(tmp_path / "square.png")
    with chromium() as browser:
        page = open_ui(browser, url, width=1280, height=800)
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 64)
        set_number(page, "txt2img_steps", 2)
        open_controlnet(page)
        unit = "txt2img_controlnet_0"
        page.set_input_files(f"#{unit}_image input[type=file]", str(picture))
        page.wait_for_selector(f"#{unit}_image img", timeout=10000)
        pick(page, f"{unit}_module", "canny")
        page.wait_for_selector(f"#{unit}_threshold_a", state="visible", timeout=10000)
        assert "Canny Low Threshold" in page.inner_text(f"#{unit}_threshold_a")
        pick(page, f"{unit}_model", "control_canny [abcd1234]")
        page.check(f"#{unit}_enabled input")
        set_number(page, f"{unit}_weight", 0.6)
        set_number(page, f"{unit}_threshold_a", 50)
        page.get_by_label("Resize and Fill").first.check()

        page.click(f"#{unit}_preview_button")
        page.wait_for_selector(f"#{unit}_preview img", timeout=15000)
        assert engine.previews and engine.previews[-1][1:] == (64, 64)
        page.locator("#txt2img_controlnet").screenshot(path=str(SHOTS / "unit_with_preview.png"))

        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_gallery img", timeout=30000)
        (sent,) = engine.requests[-1].control_units
        assert (sent.enabled, sent.module, sent.model) == (True, "canny", "control_canny.safetensors")
        assert (sent.weight, sent.threshold_a, sent.threshold_b) == (0.6, 50, 200)
        assert sent.resize_mode == "Resize and Fill" and sent.image.size == (96, 64)

        # a bad value names the unit; the unit's other settings stay as they were
        set_number(page, f"{unit}_guidance_end", 0.2)
        set_number(page, f"{unit}_guidance_start", 0.5)
        requests = len(engine.requests)
        page.click("#txt2img_generate")
        toast = page.wait_for_selector(".toast-body", timeout=15000)
        assert "ControlNet Unit 0: Starting control step" in toast.inner_text()
        toast.screenshot(path=str(SHOTS / "error_toast.png"))
        page.locator("#txt2img_controlnet").screenshot(path=str(SHOTS / "unit_error.png"))
        assert len(engine.requests) == requests
        assert page.input_value(f"#{unit}_weight input[type=number]") == "0.6"
        assert page.input_value(f"#{unit}_module input") == "canny"
        assert page.is_checked(f"#{unit}_enabled input")
