"""Run the engine under the real `spaces` package in ZeroGPU mode, against a fake device API.

`spaces` reads SPACES_ZERO_GPU when imported and then patches torch, so this runs in its own
process: `python tests/zerogpu_device.py CHECKPOINT_DIR` prints one JSON line. The fake API
(Hugging Face's ZeroGPU scheduler, `spaces/zero/api.py`) refuses the first /schedule call for
quota, the second for duration, and grants the third, whose forked worker then fails to start
for want of a CUDA device; it records the GPU seconds each call asked for.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

REPO = Path(__file__).resolve().parent.parent

# (status, body) answers to /schedule, in order: a spent quota, a duration over the maximum, then
# a GPU: spaces pickles the request into a forked worker, which fails here for want of CUDA
SCHEDULE_ANSWERS = [(429, {"left": 12, "wait": 250}), (429, {"left": 0, "wait": -1}),
                    (200, {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-fake", "allowToken": "token"})]


class FakeDeviceApi(BaseHTTPRequestHandler):
    asked: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        if url.path == "/schedule":
            FakeDeviceApi.asked.append({k: v[0] for k, v in parse_qs(url.query).items()})
            status, body = SCHEDULE_ANSWERS[min(len(FakeDeviceApi.asked), len(SCHEDULE_ANSWERS)) - 1]
        else:
            status, body = 200, {}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main(models_dir: str) -> dict:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDeviceApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp())
    (work / "cgroup").write_text("0::/zerogpu-test\n")
    os.environ.update(SPACES_ZERO_GPU="true", ZEROGPU_PROC_SELF_CGROUP_PATH=str(work / "cgroup"),
                      SPACES_ZERO_DEVICE_API_URL=f"http://127.0.0.1:{server.server_address[1]}")
    sys.path.insert(0, str(REPO))

    from pipelines.hosting.zerogpu import import_spaces

    import_spaces()  # before torch is imported, as webui.cli does
    from PIL import Image

    from pipelines.core.hosted_limits import ZeroGPUError
    from pipelines.core.request import GenerationRequest, UpscaleRequest
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine
    from pipelines.hosting.zerogpu import clamp_seconds, generation_seconds

    engine = Engine(Paths(models_dir=Path(models_dir), data_dir=work / "data", outdir=work / "outputs"),
                    EngineSettings())
    report: dict = {"active": engine.gpu.active, "device": engine.describe()["device"], "errors": [],
                    "expected_seconds": []}
    small = GenerationRequest(prompt="a cat", checkpoint="tiny.safetensors", width=64, height=64, steps=2)
    large = small.replace(width=1024, height=1024, steps=40, batch_size=4)
    for request in (small, large, small.replace(seed=7)):
        report["expected_seconds"].append(clamp_seconds(generation_seconds(request)))
        try:
            engine.generate(request)
            report["errors"].append(None)
        except ZeroGPUError as exc:
            report["errors"].append({"title": exc.title, "text": str(exc), "quota": exc.quota})
    upscaled = engine.upscale(UpscaleRequest(image=Image.new("RGB", (16, 16)), upscaler="Lanczos", scale=2,
                                             save_images=False))
    report["upscaled"] = list(upscaled.images[0].size)
    report["asked_seconds"] = [int(a["durationSeconds"]) for a in FakeDeviceApi.asked]
    server.shutdown()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
