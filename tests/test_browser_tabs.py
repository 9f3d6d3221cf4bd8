"""The Image browser and Settings tabs in the real UI (launch.py, headless Chromium): what a user
sees and clicks, and that the Settings tab and /sdapi/v1/options agree. Screenshots of both tabs
at three viewports go to /tmp/browser_shots/."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from browsing import chromium, needs_chromium, open_ui
from PIL import Image
from serving import launched

from pipelines.core.outputs import save_image

pytestmark = pytest.mark.browser

SHOTS = Path("/tmp/browser_shots")
VIEWPORTS = ((1280, 800), (1440, 1000), (390, 844))


def pick(page, elem_id: str, choice: str) -> None:
    """Choose `choice` in a Gradio dropdown as a user does: open it, click the option."""
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=choice, exact=True).click()


def fill_outputs(outdir: Path) -> None:
    """40 saved images over two days and two folders, as the app saves them."""
    for n in range(40):
        folder = "img2img-images" if n % 4 == 0 else "txt2img-images"
        prompt = "a blue whale" if n == 7 else f"a red fox number {n}"
        text = f"{prompt}\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: {5000 + n}, " \
               "Size: 64x64, Model: tiny"
        image = Image.new("RGB", (64, 64), ((n * 37) % 256, (n * 91) % 256, 200))
        path = save_image(image, outdir, folder, seed=5000 + n, infotext=text, now=datetime(2026, 11, 1 + n // 20, 9))
        os.utime(path, (1_800_000_000 + n,) * 2)


@pytest.fixture
def server(tmp_path):
    """launch.py with a tiny checkpoint, the API and 40 saved images; yields (url, outdir)."""
    from tiny import write_tiny_sd1_checkpoint

    models, outdir = tmp_path / "models", tmp_path / "outputs"
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors")
    fill_outputs(outdir)
    args = ["--models-dir", str(models), "--outdir", str(outdir), "--data-dir", str(tmp_path / "data"),
            "--use-cpu", "all", "--api"]
    with launched(args, tmp_path / "server.log") as url:
        yield url, outdir


def open_tab(page, label: str) -> None:
    page.get_by_role("tab", name=label, exact=True).click()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def gallery_count(page) -> int:
    return page.locator("#browser_gallery .thumbnail-item").count()


@needs_chromium
def test_image_browser_pages_searches_sends_and_deletes(server):
    url, outdir = server
    with chromium() as browser:
        page = open_ui(browser, url, 1440, 1000)
        open_tab(page, "Image browser")
        page.wait_for_function("() => document.querySelectorAll('#browser_gallery .thumbnail-item').length === 36",
                               timeout=30000)
        assert "Page 1 of 2 · 40 images" in page.inner_text("#browser_page_label")
        page.click("#browser_next")
        page.wait_for_function("() => document.querySelectorAll('#browser_gallery .thumbnail-item').length === 4",
                               timeout=20000)
        assert "Page 2 of 2" in page.inner_text("#browser_page_label")

        page.fill("#browser_query textarea, #browser_query input", "whale")
        page.click("#browser_search")
        page.wait_for_function("() => document.querySelectorAll('#browser_gallery .thumbnail-item').length === 1",
                               timeout=20000)
        page.locator("#browser_gallery .thumbnail-item").first.click()
        page.wait_for_function("() => document.querySelector('#browser_infotext textarea').value.includes('whale')",
                               timeout=20000)
        assert "Seed: 5007" in page.input_value("#browser_infotext textarea")
        shoot(page, "browser_selected_1440x1000")

        page.click("#browser_send_txt2img")
        page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value === 'a blue whale'",
                               timeout=20000)
        assert page.input_value("#txt2img_seed input[type=number]") == "5007"

        open_tab(page, "Image browser")
        page.locator("#browser_gallery .thumbnail-item").first.click()
        page.wait_for_function("() => document.querySelector('#browser_infotext textarea').value.includes('whale')",
                               timeout=20000)
        page.click("#browser_delete")
        page.wait_for_function("() => document.querySelector('#browser_trash').innerText.includes('Trash: 1 image')",
                               timeout=20000)
        page.wait_for_function("() => document.querySelector('#browser_page_label').innerText.includes('No images')",
                               timeout=20000)
        assert len(list((outdir / "trash").rglob("*.png"))) == 1
        page.click("#browser_empty_trash")
        page.wait_for_function("() => !document.querySelector('#browser_trash').innerText.includes('Trash')",
                               timeout=20000)
        assert not (outdir / "trash").exists()
        assert len(list(outdir.rglob("*.png"))) == 39

        for width, height in VIEWPORTS:
            page.set_viewport_size({"width": width, "height": height})
            page.fill("#browser_query textarea, #browser_query input", "")
            page.click("#browser_search")
            page.wait_for_function("() => document.querySelectorAll('#browser_gallery .thumbnail-item').length "
                                   "=== 36", timeout=20000)
            page.locator("#browser_gallery .thumbnail-item").nth(1).click()
            page.wait_for_function("() => document.querySelector('#browser_infotext textarea').value.length > 0",
                                   timeout=20000)
            page.locator("#browser_gallery").scroll_into_view_if_needed()
            shoot(page, f"browser_{width}x{height}")


@needs_chromium
def test_settings_tab_saves_what_the_api_reads_and_shows_what_it_writes(server):
    url, _ = server
    with chromium() as browser:
        page = open_ui(browser, url, 1440, 1000)
        open_tab(page, "Settings")
        pick(page, "setting_theme", "dark")
        pick(page, "setting_default_sampler", "Euler a")
        page.fill("#setting_jpeg_quality input", "55")
        page.click("#settings_apply")
        page.wait_for_function("() => document.querySelector('#settings_status').innerText.includes('Saved 3')",
                               timeout=20000)
        assert page.evaluate("() => document.body.classList.contains('dark')")
        options = httpx.get(f"{url}/sdapi/v1/options", timeout=30).json()
        assert (options["theme"], options["default_sampler"], options["jpeg_quality"]) == ("dark", "Euler a", 55)

        page.fill("#setting_jpeg_quality input", "500")
        page.click("#settings_apply")
        toast = page.wait_for_selector(".toast-body", timeout=15000)
        assert "jpeg_quality" in toast.inner_text() and "between 1 and 100" in toast.inner_text()
        assert httpx.get(f"{url}/sdapi/v1/options", timeout=30).json()["jpeg_quality"] == 55

        answer = httpx.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}, timeout=30)
        assert answer.status_code == 200, answer.text
        page.reload()
        page.wait_for_selector("#txt2img_prompt textarea", timeout=30000)
        page.wait_for_function("() => document.body.classList.contains('dark')", timeout=20000)
        assert "Euler a" in page.input_value("#txt2img_sampler input")  # a new page starts with it
        page.wait_for_function("() => document.querySelector('#clip_skip input[type=number]').value === '3'",
                               timeout=20000)  # and with the clip skip the API saved
        open_tab(page, "Settings")
        assert page.input_value("#setting_CLIP_stop_at_last_layers input") == "3"
        for width, height in VIEWPORTS:
            page.set_viewport_size({"width": width, "height": height})
            shoot(page, f"settings_dark_{width}x{height}")
        pick(page, "setting_theme", "light")
        page.click("#settings_apply")
        page.wait_for_function("() => !document.body.classList.contains('dark')", timeout=20000)
        for width, height in VIEWPORTS:
            page.set_viewport_size({"width": width, "height": height})
            shoot(page, f"settings_light_{width}x{height}")
