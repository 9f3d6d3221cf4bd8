"""PNG Info in the real UI: drop an image the app made, read it, send it to txt2img."""

from __future__ import annotations

import pytest
from browsing import chromium, needs_chromium, open_ui, set_number
from test_browser import server  # noqa: F401 - a fixture

pytestmark = pytest.mark.browser


@needs_chromium
def test_png_info_reads_a_generated_image_and_sends_it_to_txt2img(server, tmp_path):  # noqa: F811
    url, outdir = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    prompt = "a lighthouse on a cliff, (storm:1.2)"
    with chromium() as browser:
        page = open_ui(browser, url)
        page.fill("#txt2img_prompt textarea", prompt)
        page.fill("#txt2img_neg_prompt textarea", "fog")
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 72)
        set_number(page, "txt2img_steps", 3)
        set_number(page, "txt2img_seed", 4242)
        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_gallery img", timeout=60000)
        saved = sorted((outdir / "txt2img-images").glob("*/*.png"))
        assert saved, "the app saved no PNG"

        # change the tab so that sending has something to restore
        page.fill("#txt2img_prompt textarea", "something else")
        page.fill("#txt2img_neg_prompt textarea", "")
        set_number(page, "txt2img_steps", 20)
        set_number(page, "txt2img_seed", -1)

        page.get_by_role("tab", name="PNG Info", exact=True).click()
        page.set_input_files("#pnginfo_image input[type=file]", str(saved[0]))
        page.wait_for_function("p => document.querySelector('#pnginfo_fields') && "
                               "document.querySelector('#pnginfo_fields').innerText.includes(p)",
                               arg=prompt, timeout=20000)
        assert "A1111 parameters" in page.inner_text("#pnginfo_format")
        table = page.inner_text("#pnginfo_fields")
        assert "Seed" in table and "4242" in table and "64x72" in table
        assert page.input_value("#pnginfo_infotext textarea").startswith(prompt)
        page.screenshot(path=str(shots / "pnginfo.png"), full_page=True)

        page.click("#pnginfo_send_txt2img")
        page.wait_for_function("p => { const box = document.querySelector('#txt2img_prompt textarea');"
                               " return box && box.value === p; }", arg=prompt, timeout=20000)
        assert page.get_by_role("tab", name="txt2img", exact=True).get_attribute("aria-selected") == "true"
        assert page.input_value("#txt2img_neg_prompt textarea") == "fog"
        assert page.input_value("#txt2img_steps input[type=number]") == "3"
        assert page.input_value("#txt2img_seed input[type=number]") == "4242"
        assert page.input_value("#txt2img_height input[type=number]") == "72"
        page.screenshot(path=str(shots / "sent_to_txt2img.png"), full_page=True)

        # img2img also gets the image as its input
        page.get_by_role("tab", name="PNG Info", exact=True).click()
        page.click("#pnginfo_send_img2img")
        page.wait_for_function("p => { const box = document.querySelector('#img2img_prompt textarea');"
                               " return box && box.value === p; }", arg=prompt, timeout=20000)
        page.wait_for_selector("#img2img_image img", timeout=20000)
        assert page.input_value("#img2img_seed input[type=number]") == "4242"
    print(f"screenshots: {shots}")
