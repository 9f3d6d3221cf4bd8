"""The queue as a user sees it in Chromium: a waiting page says how many jobs are ahead, a full
queue is a warning toast (not an error), and opening a page while jobs wait is never refused."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from browsing import chromium, needs_chromium, open_ui, set_number
from serving import one_slot_server

pytestmark = pytest.mark.browser


@needs_chromium
def test_waiting_position_and_full_queue_in_the_browser(tmp_path):
    with one_slot_server(tmp_path) as url:
        api = f"{url}/sdapi/v1"
        holder = threading.Thread(target=lambda: httpx.post(
            f"{api}/txt2img", json={"prompt": "hold", "steps": 150, "width": 64, "height": 64}, timeout=600))
        holder.start()
        while httpx.get(f"{api}/progress", timeout=30).json()["jobs_ahead"] != 0:
            time.sleep(0.2)
        with chromium() as browser:
            first = open_ui(browser, url, 1280, 900, ready="#txt2img_generate")
            for box, value in (("txt2img_steps", 1), ("txt2img_width", 64), ("txt2img_height", 64)):
                set_number(first, box, value)
            first.click("#txt2img_generate")
            first.wait_for_selector("text=Waiting: 1 job ahead of you", timeout=60000)
            first.screenshot(path=str(tmp_path / "waiting.png"))

            # its page-load events are queued too: never refused
            second = open_ui(browser, url, 1280, 900, ready="#txt2img_generate")
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
