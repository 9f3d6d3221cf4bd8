"""The shipped X/Y/Z plot and the Extensions tab in the real UI (launch.py + headless Chromium)."""

from __future__ import annotations

import pytest
from browsing import chromium, needs_chromium, open_ui, set_number
from serving import launched

pytestmark = pytest.mark.browser


@needs_chromium
def test_xyz_plot_and_extensions_tab_in_the_browser(tmp_path):
    from tiny import write_tiny_sd1_checkpoint

    models = tmp_path / "models"
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors")
    outdir, shots = tmp_path / "outputs", tmp_path / "screenshots"
    shots.mkdir()
    with launched(["--models-dir", str(models), "--outdir", str(outdir), "--data-dir", str(tmp_path / "data"),
                   "--use-cpu", "all"], tmp_path / "server.log") as url, chromium() as browser:
        page = open_ui(browser, url)
        page.get_by_role("tab", name="Extensions", exact=True).click()
        table = page.wait_for_selector("#extensions_table", timeout=15000)
        text = table.inner_text()
        assert "xyz-plot" in text and "prompt-matrix" in text and "enabled" in text
        assert page.locator("#extensions_url").count() == 0 or page.locator("#extensions_url").is_visible()
        page.screenshot(path=str(shots / "extensions.png"), full_page=True)

        page.get_by_role("tab", name="txt2img", exact=True).click()
        page.fill("#txt2img_prompt textarea", "a tiny red fox")
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 64)
        set_number(page, "txt2img_steps", 2)
        page.click("#txt2img_ext_xyz-plot")  # open the accordion
        page.check("#txt2img_xyz_enabled input")
        page.click("#txt2img_xyz_x_type input")
        page.get_by_role("option", name="Steps", exact=True).click()
        page.fill("#txt2img_xyz_x_values textarea", "1, 2")
        page.click("#txt2img_generate")
        page.wait_for_function("() => document.querySelectorAll('#txt2img_gallery img').length >= 3",
                               timeout=120000)
        page.screenshot(path=str(shots / "xyz.png"), full_page=True)
    print(f"screenshots: {shots}")
    grids = sorted((outdir / "txt2img-grids").glob("*/*.png"))
    assert len(grids) == 1
    from PIL import Image

    with Image.open(grids[0]) as grid:
        assert grid.width == 2 * 64 and grid.height > 64  # column labels on top, no Y axis
        assert "Steps: 1" in grid.info.get("parameters", "")
