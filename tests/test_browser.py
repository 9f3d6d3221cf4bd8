"""Drive the real UI: `python launch.py` on a tiny checkpoint, headless Chromium via Playwright.

Screenshots land in the test's tmp folder (printed at the end; `pytest -s` shows the path).
"""

from __future__ import annotations

import datetime

import pytest
from browsing import chromium, needs_chromium, open_ui, set_number
from serving import launched

pytestmark = pytest.mark.browser


@pytest.fixture
def server(tmp_path):
    """A real `launch.py` on a free port with one tiny SD 1.x checkpoint; yields (url, outdir)."""
    from tiny import write_tiny_sd1_checkpoint

    models = tmp_path / "models"
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors")
    outdir = tmp_path / "outputs"
    log = tmp_path / "server.log"
    with launched(["--models-dir", str(models), "--outdir", str(outdir), "--data-dir", str(tmp_path / "data"),
                   "--use-cpu", "all"], log) as url:
        yield url, outdir


@needs_chromium
def test_txt2img_in_the_browser(server, tmp_path):
    url, outdir = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    prompt = "a tiny red fox"
    with chromium() as browser:
        page = open_ui(browser, url)
        for label in ("txt2img", "img2img", "Inpaint", "Upscale", "Checkpoints"):
            assert page.get_by_role("tab", name=label, exact=True).count() == 1, label
        assert "tiny" in page.input_value("#checkpoint input")
        assert page.input_value("#txt2img_width input[type=number]") == "512"  # SD 1.x native size
        page.screenshot(path=str(shots / "start.png"), full_page=True)

        # A bad request answers with a message naming the field, and the server keeps going.
        page.get_by_role("tab", name="img2img", exact=True).click()
        page.click("#img2img_generate")
        toast = page.wait_for_selector(".toast-body", timeout=15000)
        assert "init_image" in toast.inner_text()
        page.screenshot(path=str(shots / "error.png"))

        page.get_by_role("tab", name="txt2img", exact=True).click()
        page.fill("#txt2img_prompt textarea", prompt)
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 64)
        set_number(page, "txt2img_steps", 3)
        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_gallery img", timeout=60000)
        page.wait_for_function(
            "p => document.querySelector('#txt2img_infotext textarea').value.includes(p)", arg=prompt,
            timeout=10000)
        infotext = page.input_value("#txt2img_infotext textarea")
        page.screenshot(path=str(shots / "generated.png"), full_page=True)
    print(f"screenshots: {shots}")

    assert infotext.startswith(prompt)
    assert "Steps: 3" in infotext and "Size: 64x64" in infotext
    today = {datetime.date.today().isoformat(), (datetime.date.today() - datetime.timedelta(days=1)).isoformat()}
    saved = sorted((outdir / "txt2img-images").glob("*/*.png"))
    assert saved, f"no PNG under {outdir / 'txt2img-images'}"
    assert saved[0].parent.name in today

    from PIL import Image

    with Image.open(saved[0]) as image:
        assert image.size == (64, 64)
        assert image.info.get("parameters", "").startswith(prompt)
