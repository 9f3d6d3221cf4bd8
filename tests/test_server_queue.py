"""Against the real `launch.py`: one bounded queue for the web UI and the API. A waiting page
is told how many jobs are ahead; a full queue is a warning on the page and a 503 for the API;
the server keeps answering."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from serving import one_slot_server


class PageSession:
    """One browser page speaking Gradio's queue protocol: join an event, read every message."""

    def __init__(self, url: str, config: dict):
        self.url, self.config = url, config
        self.session = uuid.uuid4().hex[:11]
        self.messages: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._started = False

    def _read(self) -> None:
        with httpx.stream("GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": self.session},
                          timeout=None) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    self.messages.append(message)
                    if message.get("msg") == "close_stream":
                        return

    def submit(self, api_name: str, values: dict) -> str:
        """Click the button of `api_name` with the page's defaults, `values` by elem_id."""
        components = {c["id"]: c for c in self.config["components"]}
        dependency = next(d for d in self.config["dependencies"] if d.get("api_name") == api_name)
        data = []
        for component_id in dependency["inputs"]:
            props = components[component_id].get("props", {})
            data.append(values.get(props.get("elem_id"), props.get("value")))
        response = httpx.post(f"{self.url}/gradio_api/queue/join", timeout=30, json={
            "data": data, "fn_index": dependency["id"], "session_hash": self.session,
            "event_data": None, "trigger_id": None})
        assert response.status_code == 200, response.text
        if not self._started:
            self._started = True
            self._reader.start()
        return response.json()["event_id"]

    def wait_for(self, predicate, what: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if predicate(message):
                    return message
            time.sleep(0.05)
        pytest.fail(f"no {what} within {timeout:.0f}s; got {[m.get('msg') for m in self.messages]}")


def progress_text(message: dict) -> str:
    units = message.get("progress_data") or []
    return " ".join(str(unit.get("desc") or "") for unit in units)


def test_ui_and_api_share_one_bounded_queue(tmp_path):
    with one_slot_server(tmp_path) as url:
        api = f"{url}/sdapi/v1"
        config = httpx.get(f"{url}/config", timeout=30).json()
        # an API job holds the slot for a while (interrupted below)
        long_job: dict = {}
        holder = threading.Thread(target=lambda: long_job.update(response=httpx.post(
            f"{api}/txt2img", json={"prompt": "hold", "steps": 150, "width": 64, "height": 64}, timeout=600)))
        holder.start()
        deadline = time.monotonic() + 300
        while httpx.get(f"{api}/progress", timeout=30).json()["jobs_ahead"] != 0:  # the API's own job runs
            assert time.monotonic() < deadline and holder.is_alive(), long_job
            time.sleep(0.2)

        # a page's job waits, and the page is told where it stands
        waiting = PageSession(url, config)
        waiting.submit("txt2img", {"txt2img_prompt": "waits", "txt2img_steps": 1, "txt2img_width": 64,
                                   "txt2img_height": 64})
        waiting.wait_for(lambda m: "Waiting: 1 job ahead of you" in progress_text(m), "waiting position")

        # the queue holds one waiting job: the API is refused with a 503 saying so...
        refused = httpx.post(f"{api}/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64},
                             timeout=60)
        assert refused.status_code == 503
        assert refused.json()["detail"] == "Queue full (1 waiting), try again in a moment"
        # ...and another page gets a warning, not an error
        late = PageSession(url, config)
        late.submit("txt2img", {"txt2img_prompt": "late", "txt2img_steps": 1})
        warning = late.wait_for(lambda m: m.get("msg") == "log", "queue-full notice", timeout=60)
        assert warning["level"] == "warning" and warning["log"] == "Queue full (1 waiting), try again in a moment"
        done = late.wait_for(lambda m: m.get("msg") == "process_completed", "end of the refused event", 60)
        assert done["success"] is True, done

        # the API job ends; the waiting page's job runs and brings its image
        assert httpx.post(f"{api}/interrupt", timeout=30).json()["done"] is True
        holder.join(300)
        assert long_job["response"].status_code == 200
        finished = waiting.wait_for(lambda m: m.get("msg") == "process_completed", "the waiting job's result")
        assert finished["success"] is True, finished
        gallery = finished["output"]["data"][0]
        assert len(gallery) == 1
        assert httpx.get(f"{api}/progress", timeout=30).json()["jobs_ahead"] is None
