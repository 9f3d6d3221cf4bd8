"""Saving under faults: a `kill -9` mid-save never leaves a truncated PNG under a final name;
a full disk still returns the image with a clear notice, loses nothing already saved, and
the server keeps answering."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from pipelines.core import outputs

REPO = Path(__file__).resolve().parent.parent

# Saves big noisy PNGs (slow to encode: a kill is likely to land mid-write) through the
# project's writer for ever, saying "writing" as each one starts.
SAVER = r"""
import os, sys
from pathlib import Path
from PIL import Image
from pipelines.core import outputs

real_write = outputs.write_png
def announced(image, handle, infotext):
    print("writing", flush=True)
    real_write(image, handle, infotext)
outputs.write_png = announced

outdir = Path(sys.argv[1])
seed = 0
while True:
    image = Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
    outputs.save_image(image, outdir, "txt2img-images", seed=seed, infotext=f"noise\nSteps: 1, Seed: {seed}")
    seed += 1
"""


def final_pngs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png") if not p.name.startswith("."))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_kill_9_mid_save_never_leaves_a_truncated_png(tmp_path):
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(6):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE,
                                 cwd=REPO, env=env, text=True)
        try:
            for _ in range(rng.randint(1, 3)):  # into the first, second or third save...
                assert saver.stdout.readline().strip() == "writing", "the saver did not start"
            time.sleep(rng.uniform(0.0, 0.3))  # ...and a random moment into it
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait(30)
            saver.stdout.close()
        assert saver.returncode == -signal.SIGKILL
    saved = final_pngs(tmp_path)
    assert saved, "nothing was ever saved"
    for path in saved:
        with Image.open(path) as image:
            image.verify()  # every chunk there, CRCs right
        with Image.open(path) as image:
            image.load()  # and all the pixels decode
            assert image.size == (1024, 1024) and image.info["parameters"].startswith("noise")
    leftovers = [p for p in tmp_path.rglob(".*.tmp")]
    assert leftovers, "no kill landed mid-save: the test proved nothing"
    # the folder stays usable: the next save takes a number no temp file or PNG holds
    path = outputs.save_image(Image.new("RGB", (8, 8)), tmp_path, "txt2img-images", seed=1, infotext=None)
    numbers = [int(p.name.lstrip(".").split("-")[0].split(".")[0]) for p in [*saved, *leftovers]]
    assert int(path.name.split("-")[0]) == max(numbers) + 1


def disk_full(image, handle, infotext):
    handle.write(b"\x89PNG\r\n\x1a\n")  # a few bytes reach the disk, then it is full
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_still_returns_the_image_over_the_api(engine, monkeypatch):
    from test_api import SMALL, post, serve

    from webui.api import ApiOptions, create_app

    body = {**SMALL, "prompt": "disk", "seed": 5, "save_images": True}
    with serve(create_app(engine, options=ApiOptions(sd_model_checkpoint="tiny.safetensors"))) as url:
        first = post(url, "txt2img", body)
        assert first.status_code == 200
        saved = final_pngs(Path(engine.paths.outdir))
        assert saved
        before = {p: p.read_bytes() for p in saved}

        monkeypatch.setattr(outputs, "write_png", disk_full)
        full = post(url, "txt2img", {**body, "seed": 6})
        assert full.status_code == 200, full.text
        assert len(full.json()["images"]) == 1  # the user still gets the picture
        notices = json.loads(full.json()["info"])["warnings"]
        assert any("not saved" in n and "the disk is full" in n for n in notices), notices
        # nothing already saved is lost or touched, and no half file is left behind
        assert final_pngs(Path(engine.paths.outdir)) == saved
        assert all(p.read_bytes() == data for p, data in before.items())
        assert not list(Path(engine.paths.outdir).rglob(".*.tmp"))

        monkeypatch.undo()  # space freed: the server kept answering and saves again
        again = post(url, "txt2img", {**body, "seed": 7})
        assert again.status_code == 200
        assert len(final_pngs(Path(engine.paths.outdir))) == len(saved) + 1


def test_full_disk_is_a_notice_on_the_page_with_the_image_shown(engine, monkeypatch):
    from webui.app import build_ui

    ui = build_ui(engine).webui
    fields = {"prompt": "disk", "steps": 2, "width": 64, "height": 64, "seed": 3, "checkpoint": "tiny.safetensors"}
    monkeypatch.setattr(outputs, "write_png", disk_full)
    with warnings.catch_warnings(record=True) as shown:  # gr.Warning outside a live page
        warnings.simplefilter("always")
        images, infotext, last, _ = ui.generate("txt2img", fields)
    assert len(images) == 1 and isinstance(images[0], Image.Image)  # shown, though not saved
    assert "Seed: 3" in infotext
    notices = [str(w.message) for w in shown]
    assert any("not saved" in n and "the disk is full" in n for n in notices), notices
