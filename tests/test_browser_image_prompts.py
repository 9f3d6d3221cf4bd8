"""Image prompts and regional prompts in a real browser: the page served in-process over the fake
engine. A user opens both accordions, adds an image prompt and draws two regions (a box and a painted
mask), sees the layout preview, and generates; the engine gets the units and the regions.

Screenshots of both accordions at three window sizes go to /tmp/shots/ui19/ (or $UI19_SHOTS).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from browsing import chromium, needs_chromium, open_ui, set_number
from PIL import Image, ImageDraw
from test_image_prompts_ui import ADAPTER, PromptEngine, needs_wiring

from webui.app import build_ui

pytestmark = [pytest.mark.browser, needs_wiring]

SHOTS = Path(os.environ.get("UI19_SHOTS", "/tmp/shots/ui19"))
SIZES = ((1280, 800), (1440, 1000), (390, 844))
PORTS = range(7900, 7910)  # this suite's own ports


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError(f"no free port in {PORTS}")


@pytest.fixture
def served():
    """(url, engine): the UI over a fake engine with two IP-Adapters, in this process."""
    engine = PromptEngine()
    blocks = build_ui(engine)
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                              quiet=True, **blocks.webui.launch_kwargs())
    try:
        yield url, engine
    finally:
        blocks.close()


def flower(path: Path) -> Path:
    image = Image.new("RGB", (80, 64), (30, 90, 200))
    ImageDraw.Draw(image).ellipse((20, 12, 60, 52), fill=(250, 210, 30))
    image.save(path)
    return path


def open_accordions(page, mode: str = "txt2img") -> None:
    for accordion, ready in (("image_prompts", "image_prompt_0_model"), ("regions", "region_0_prompt")):
        page.click(f"#{mode}_{accordion} > button")
        page.wait_for_selector(f"#{mode}_{ready}", state="visible", timeout=10000)


def paint(page, elem_id: str) -> None:
    """Pick the brush and drag it down the middle of a sketch canvas, as a user paints (the drawing
    area sits centred inside the editor's canvas element)."""
    canvas = page.locator(f"#{elem_id} canvas").first
    canvas.scroll_into_view_if_needed()
    page.click(f"#{elem_id} button[aria-label='Brush']")
    page.wait_for_timeout(300)
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.42, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.7, steps=12)
    page.mouse.up()


def inside(box: dict, width: int) -> bool:
    return box["x"] >= 0 and box["x"] + box["width"] <= width + 1


@needs_chromium
def test_both_accordions_look_right_at_three_sizes(served):
    url, _ = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        for width, height in SIZES:
            page = open_ui(browser, url, width=width, height=height)
            open_accordions(page)
            for name in ("image_prompts", "regions"):
                accordion = page.locator(f"#txt2img_{name}")
                accordion.scroll_into_view_if_needed()
                page.wait_for_timeout(400)  # the tabs measure themselves once shown
                assert inside(accordion.bounding_box(), width), (name, width)
                accordion.screenshot(path=str(SHOTS / f"{name}_{width}x{height}.png"))
            text = page.inner_text("#txt2img_image_prompts")
            assert "count as ControlNet units" in text and "No image encoder" in text
            assert "ADDCOL" in page.inner_text("#txt2img_regions_hint")
            for elem_id in ("txt2img_region_0_left", "txt2img_region_0_right", "txt2img_image_prompt_0_weight"):
                assert inside(page.locator(f"#{elem_id}").bounding_box(), width), (elem_id, width)
            page.close()


@needs_chromium
def test_add_an_image_prompt_and_regions_then_generate(served, tmp_path):
    url, engine = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        page = open_ui(browser, url, width=1280, height=800)
        set_number(page, "txt2img_width", 96)
        set_number(page, "txt2img_height", 64)
        set_number(page, "txt2img_steps", 2)
        open_accordions(page)

        p = "txt2img_image_prompt_0"
        page.set_input_files(f"#{p}_image input[type=file]", str(flower(tmp_path / "flower.png")))
        page.wait_for_selector(f"#{p}_image img", timeout=10000)
        set_number(page, f"{p}_weight", 0.7)
        set_number(page, f"{p}_end", 0.8)

        page.fill("#txt2img_region_0_prompt textarea", "a red kite")
        set_number(page, "txt2img_region_0_left", 10)
        set_number(page, "txt2img_region_0_right", 40)
        page.wait_for_selector("#txt2img_regions_preview img", timeout=15000)
        page.get_by_role("tab", name="Region 2", exact=True).click()
        page.fill("#txt2img_region_1_prompt textarea", "a blue lake")
        page.wait_for_selector("#txt2img_region_1_mask canvas", state="visible", timeout=10000)
        paint(page, "txt2img_region_1_mask")
        page.wait_for_function("document.querySelector('#txt2img_region_1_shape input[value=Mask]').checked",
                               timeout=10000)  # painting picked the mask
        page.wait_for_timeout(2000)  # the preview follows
        page.locator("#txt2img_regions").screenshot(path=str(SHOTS / "regions_drawn.png"))
        page.locator("#txt2img_image_prompts").screenshot(path=str(SHOTS / "image_prompt_added.png"))

        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_gallery img", timeout=30000)
        sent = engine.requests[-1]
        (unit,) = sent.control_units
        assert (unit.module, unit.model, unit.weight, unit.guidance_end) == ("ip-adapter-auto", ADAPTER.name, 0.7, 0.8)
        assert unit.image.size == (80, 64)
        kite, lake = sent.regions
        assert (kite.prompt, kite.box) == ("a red kite", (0.1, 0.0, 0.4, 1.0))
        assert lake.prompt == "a blue lake" and lake.mask.size == (96, 64) and lake.mask.getbbox() is not None
