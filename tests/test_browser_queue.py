"""The queue as a user sees it in Chromium: a waiting page says how many jobs are ahead, a full
queue is a warning toast (not an error), and opening a page while jobs wait is never refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from serving import launched
from test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.browser


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
def test_waiting_position_and_full_queue_in_the_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from tiny import write_tiny_sd1_checkpoint

    write_tiny_sd1_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors")
    args = ["--models-dir", str(tmp_path / "models"), "--outdir", str(tmp_path / "outputs"),
            "--data-dir", str(tmp_path / "data"), "--api", "--max-queue-size", "1"]
    with launched(args, tmp_path / "server.log") as url:
        api = f"{url}/sdapi/v1"
        while httpx.get(f"{api}/progress", timeout=30).status_code != 200:
            time.sleep(0.2)
        holder = threading.Thread(target=lambda: httpx.post(
            f"{api}/txt2img", json={"prompt": "hold", "steps": 150, "width": 64, "height": 64}, timeout=600))
        holder.start()
        while httpx.get(f"{api}/progress", timeout=30).json()["jobs_ahead"] != 0:
            time.sleep(0.2)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                first = browser.new_page(viewport={"width": 1280, "height": 900})
                first.goto(url)
                first.wait_for_selector("#txt2img_generate", timeout=30000)
                for box, value in (("#txt2img_steps", 1), ("#txt2img_width", 64), ("#txt2img_height", 64)):
                    first.locator(f"{box} input[type=number]").fill(str(value))
                    first.locator(f"{box} input[type=number]").press("Enter")
                first.click("#txt2img_generate")
                first.wait_for_selector("text=Waiting: 1 job ahead of you", timeout=60000)
                first.screenshot(path=str(tmp_path / "waiting.png"))

                second = browser.new_page(viewport={"width": 1280, "height": 900})
                second.goto(url)  # its page-load events are queued too: never refused
                second.wait_for_selector("#txt2img_generate", timeout=30000)
                second.click("#txt2img_generate")
                toast = second.wait_for_selector(".toast-body", timeout=60000)
                assert "Queue full (1 waiting), try again in a moment" in toast.inner_text()
                assert "warning" in (toast.get_attribute("class") or "")
                second.screenshot(path=str(tmp_path / "full.png"))
                assert second.locator(".toast-body.error").count() == 0, "an error toast besides the warning"

                assert httpx.post(f"{api}/interrupt", timeout=30).json()["done"] is True
                holder.join(300)
                first.wait_for_selector("#txt2img_gallery img", timeout=120000)  # the waiting job ran
                assert first.locator(".toast-body.error").count() == 0
            finally:
                browser.close()
