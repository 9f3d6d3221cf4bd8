"""Start-up (issue 21): building the engine and the page imports neither diffusers, peft nor
torchvision (seconds of imports that hold the interpreter lock while Gradio builds the page); the
start-up load is listed as loading at once and does its work only once the launcher says the page
is served."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny import write_tiny_sd1_checkpoint

from pipelines.engine_work import OnFirstUse

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("diffusers", "peft", "torchvision", "transformers")

# Run in a fresh interpreter: what is imported depends on what ran before in this one.
START = """
import json, sys, threading
from pipelines.core.settings import EngineSettings, Paths
from pipelines.engine import Engine
from webui.app import UIOptions, build_ui

models, tmp = sys.argv[1], sys.argv[2]
engine = Engine(Paths(models_dir=models, data_dir=tmp + "/data", outdir=tmp + "/outputs"),
                EngineSettings(device="cpu", precision="full"))
blocks = build_ui(engine, UIOptions())
served = threading.Event()
loader = engine.preload(start=served)
header = blocks.webui.on_page_load()[blocks.webui.components["loaded"]]  # a browser's first load
report = {"imported": [m for m in HEAVY if m in sys.modules], "header": header,
          "loading": engine.loading_checkpoints(), "loaded": engine.loaded_checkpoints(),
          "loras": [item["trigger_words"] for item in engine.lora_listing()],
          "hires": engine.hires_upscaler_names()}
served.set()  # the launcher: the page is served
loader.join(300)
report["after"] = {"loading": engine.loading_checkpoints(), "loaded": engine.loaded_checkpoints()}
print(json.dumps(report))
"""


def test_the_engine_and_the_page_are_built_without_diffusers_and_the_load_waits_for_the_page(tmp_path):
    models = tmp_path / "models"
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors")
    (models / "Lora").mkdir()
    tags = json.dumps({"1_set": {"red circle": 3, "blue": 1}})
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, models / "Lora" / "circle.safetensors",
              metadata={"ss_tag_frequency": tags})

    script = f"HEAVY = {HEAVY!r}\n{START}"
    done = subprocess.run([sys.executable, "-c", script, str(models), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["imported"] == []  # none of them while the engine and the page are built
    assert report["loras"] == [["red circle", "blue"]]  # the Lora folder listed all the same
    assert report["hires"][0] == "Latent" and "Lanczos" in report["hires"]
    assert "Loading model…" in report["header"] and "tiny.safetensors" in report["header"]
    assert report["loading"] == ["tiny.safetensors"] and report["loaded"] == []  # listed, not read yet
    assert report["after"] == {"loading": [], "loaded": ["tiny.safetensors"]}  # read once the page is served


def test_the_job_side_is_made_once_when_two_jobs_ask_for_it_at_once():
    made = []

    def make():
        time.sleep(0.05)  # two first jobs overlap here
        made.append(object())
        return made[-1]

    first_use = OnFirstUse(make)
    got = []
    threads = [threading.Thread(target=lambda: got.append(first_use.get())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and all(value is made[0] for value in got)
