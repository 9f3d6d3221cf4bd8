"""Issue 23 in headless Chromium on the real `launch.py --api` with the shipped demo model
(64x64 in about a second): what a newcomer trips over, each checked as the user sees it.

Screenshots go to $POLISH_SHOTS when set (else the test's tmp folder)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from browsing import chromium, needs_chromium, open_ui, set_number
from PIL import Image
from serving import REPO, free_port, stop, wait_for_url

pytestmark = pytest.mark.browser

VIEWPORTS = ((1280, 800), (1440, 1000), (1920, 1080), (390, 844))
PROMPT = "a red circle on a blue background"
# the gallery scrolled to the middle of the window: each <img>'s box lies inside the gallery's
# box and inside the window (what the user sees of it)
IMAGE_INSIDE_GALLERY = """id => {
  const element = document.getElementById(id);
  element.scrollIntoView({block: 'center', inline: 'center'});
  const gallery = element.getBoundingClientRect();
  const seen = {left: Math.max(gallery.left, 0), top: Math.max(gallery.top, 0),
                right: Math.min(gallery.right, window.innerWidth),
                bottom: Math.min(gallery.bottom, window.innerHeight)};
  return [...element.querySelectorAll('img')].map(img => {
    const box = img.getBoundingClientRect();
    return box.width > 0 && box.left >= seen.left - 0.5 && box.right <= seen.right + 0.5
      && box.top >= seen.top - 0.5 && box.bottom <= seen.bottom + 0.5;
  });
}"""
# what a click at the centre of the gallery's first image would reach: the image itself, not an overlay
IMAGE_ON_TOP = """id => {
  const img = document.querySelector('#' + id + ' img');
  const box = img.getBoundingClientRect();
  return document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2) === img;
}"""


@dataclass
class Demo:
    url: str
    outdir: Path
    log: Path
    api_status_when_page_answered: int
    loaded_line_when_page_answered: str
    shots: Path


def first_answers(url: str, proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Poll / as a client would; the moment it answers 200, the API's status and the loaded
    line the page is built with (its first paint)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"launch.py exited with {proc.returncode}")
            try:
                if client.get(f"{url}/").status_code == 200:
                    api = client.get(f"{url}/sdapi/v1/progress").status_code
                    config = client.get(f"{url}/config").json()
                    line = next(c.get("props", {}).get("value") for c in config["components"]
                                if c.get("props", {}).get("elem_id") == "loaded_line")
                    return api, str(line)
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    pytest.fail("the page never answered")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("polish")
    port, log = free_port(), tmp / "server.log"
    cmd = [sys.executable, str(REPO / "launch.py"), "--port", str(port), "--api",
           "--data-dir", str(tmp / "data"), "--outdir", str(tmp / "outputs")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        api, line = first_answers(url, proc)
        wait_for_url(proc, log, 60)
        shots = Path(os.environ.get("POLISH_SHOTS") or tmp / "shots")
        shots.mkdir(parents=True, exist_ok=True)
        yield Demo(url, tmp / "outputs", log, api, line, shots)
    finally:
        stop(proc)


def generate_small(page, mode: str = "txt2img", steps: int = 2) -> None:
    for box, value in ((f"{mode}_steps", steps), (f"{mode}_width", 64), (f"{mode}_height", 64)):
        set_number(page, box, value)
    page.click(f"#{mode}_generate")
    page.wait_for_selector(f"#{mode}_gallery img", timeout=60000)
    page.wait_for_function(f"() => !document.getElementById('{mode}_generate').disabled", timeout=60000)


def tab(page, name: str):
    page.get_by_role("tab", name=name, exact=True).click()


# --- item 9 ------------------------------------------------------------------------------------

@needs_chromium
def test_start_up_api_header_and_console(demo):
    assert demo.api_status_when_page_answered == 200, "/sdapi/v1 must answer as soon as / does"
    assert "nothing yet" not in demo.loaded_line_when_page_answered
    assert "Loading model" in demo.loaded_line_when_page_answered or "demo" in demo.loaded_line_when_page_answered
    console = demo.log.read_text(errors="replace")
    assert "share=True" not in console and "--share" in console


# --- items 1, 2, 4, 5 and the shortcuts ---------------------------------------------------------

@needs_chromium
def test_galleries_show_the_whole_image_and_send_it_on(demo):
    with chromium() as browser:
        page = open_ui(browser, demo.url, 1440, 1000)
        page.fill("#txt2img_prompt textarea", PROMPT)
        generate_small(page)
        for width, height in VIEWPORTS:
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(300)
            assert page.evaluate(IMAGE_INSIDE_GALLERY, "txt2img_gallery") == [True], (width, height)
            page.screenshot(path=str(demo.shots / f"txt2img_{width}x{height}.png"))
        page.set_viewport_size({"width": 1440, "height": 1000})

        # Send to img2img: the image and its parameters
        page.click("#txt2img_send_img2img")
        page.wait_for_selector("#img2img_image img", timeout=20000)
        assert page.get_by_role("tab", name="img2img", exact=True).get_attribute("aria-selected") == "true"
        assert page.input_value("#img2img_prompt textarea") == PROMPT
        generate_small(page, "img2img")
        assert page.evaluate(IMAGE_INSIDE_GALLERY, "img2img_gallery") == [True]

        # an error names the field and leaves the image in sight
        page.locator("#img2img_image button[aria-label='Remove Image']").first.click()
        page.click("#img2img_generate")
        toast = page.wait_for_selector(".toast-body", timeout=20000)
        assert "init_image" in toast.inner_text()
        page.wait_for_function("() => !document.getElementById('img2img_generate').disabled", timeout=20000)
        page.wait_for_timeout(500)
        assert page.evaluate(IMAGE_ON_TOP, "img2img_gallery"), "the error hid the gallery's image"
        page.screenshot(path=str(demo.shots / "img2img_error.png"))

        # Send to Upscale, upscale: that gallery fits too
        page.click("#img2img_send_upscale")
        page.wait_for_selector("#upscale_image img", timeout=20000)
        page.click("#upscale_button")
        page.wait_for_selector("#upscale_gallery img", timeout=60000)
        for width, height in VIEWPORTS:
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(300)
            assert page.evaluate(IMAGE_INSIDE_GALLERY, "upscale_gallery") == [True], (width, height)
        page.screenshot(path=str(demo.shots / "upscale_390x844.png"), full_page=True)
        page.set_viewport_size({"width": 1440, "height": 1000})
        page.click("#upscale_send_inpaint")
        page.wait_for_selector("#inpaint_image canvas", timeout=20000)
        assert page.get_by_role("tab", name="Inpaint", exact=True).get_attribute("aria-selected") == "true"
        errors = page.locator(".toast-body.error").all_inner_texts()
        assert all("init_image" in text for text in errors), errors  # only the one asked for above


@needs_chromium
def test_sizes_snap_and_generate_shows_it_runs_with_the_shortcuts(demo):
    with chromium() as browser:
        page = open_ui(browser, demo.url, 1280, 800)
        page.fill("#txt2img_prompt textarea", PROMPT)
        set_number(page, "txt2img_steps", 2)
        set_number(page, "txt2img_width", 63)
        set_number(page, "txt2img_height", 70)
        assert page.input_value("#txt2img_width input[type=number]") == "64"
        assert page.input_value("#txt2img_height input[type=number]") == "72"
        page.focus("#txt2img_prompt textarea")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#txt2img_gallery img", timeout=60000)
        page.wait_for_function("() => document.querySelector('#txt2img_infotext textarea').value"
                               ".includes('Size: 64x72')", timeout=20000)
        assert page.locator(".toast-body.error").count() == 0, page.locator(".toast-body.error").all_inner_texts()

        set_number(page, "txt2img_steps", 150)
        page.focus("#txt2img_prompt textarea")
        page.keyboard.press("Control+Enter")
        page.wait_for_function("() => document.getElementById('txt2img_generate').disabled", timeout=20000)
        assert page.inner_text("#txt2img_generate") == "Generating…"
        page.screenshot(path=str(demo.shots / "generating.png"))
        page.keyboard.press("Escape")
        page.wait_for_selector("text=Interrupted", timeout=60000)
        page.wait_for_function("() => !document.getElementById('txt2img_generate').disabled", timeout=30000)
        assert page.inner_text("#txt2img_generate") == "Generate"


# --- item 3 ------------------------------------------------------------------------------------

@needs_chromium
def test_tool_buttons_draw_an_icon_with_a_tooltip(demo):
    with chromium() as browser:
        page = open_ui(browser, demo.url, 1440, 1000)
        for elem_id in ("txt2img_random_seed", "txt2img_reuse_seed"):
            button = page.locator(f"#{elem_id}")
            assert button.get_attribute("title"), elem_id
            assert button.inner_text().strip() == ""  # nothing an emoji font would have to draw
            icon = page.evaluate("id => { const s = getComputedStyle(document.getElementById(id), '::before');"
                                 " return [s.maskImage || s.webkitMaskImage, s.width]; }", elem_id)
            assert "svg" in icon[0] and icon[1] != "0px", icon
        page.locator("#txt2img_random_seed").screenshot(path=str(demo.shots / "dice.png"))
        page.screenshot(path=str(demo.shots / "txt2img_1440x1000_start.png"))


# --- item 6 ------------------------------------------------------------------------------------

def canvas_centre(page) -> tuple[int, int, int]:
    shot = Image.open(io.BytesIO(page.locator("#inpaint_image canvas").first.screenshot())).convert("RGB")
    return shot.getpixel((shot.width // 2, shot.height // 2))


@needs_chromium
def test_inpaint_brush_in_proportion_and_undo_keeps_the_image(demo, tmp_path):
    image = tmp_path / "green64.png"
    Image.new("RGB", (64, 64), (0, 128, 0)).save(image)
    with chromium() as browser:
        page = open_ui(browser, demo.url, 1440, 1000)
        tab(page, "Inpaint")
        page.wait_for_selector("#inpaint_image canvas", timeout=20000)
        page.wait_for_timeout(500)  # the editor takes a file once its canvas is set up
        page.set_input_files("#inpaint_image input[type=file]", str(image))
        page.wait_for_function("() => document.querySelector('#inpaint_brush_size input[type=number]').value === '3'",
                               timeout=20000)
        page.wait_for_timeout(1000)
        page.click("#inpaint_image button[aria-label='Brush Size']")
        assert page.locator("#inpaint_image input[type=range]").first.input_value() == "3"
        page.click("#inpaint_image button[aria-label='Brush Size']")
        box = page.locator("#inpaint_image canvas").first.bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] * 0.3, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.7, y, steps=5)
        page.mouse.up()
        page.wait_for_timeout(300)
        page.screenshot(path=str(demo.shots / "inpaint_stroke.png"))
        for _ in range(3):
            page.click("#inpaint_image button[aria-label='Undo']")
            page.wait_for_timeout(300)
        r, g, b = canvas_centre(page)
        assert g > 100 and r < 60 and b < 60, "undo removed the uploaded image"
        page.screenshot(path=str(demo.shots / "inpaint_after_undo.png"))
