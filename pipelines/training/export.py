"""Write the trained demo model as an SD 1.x original-layout single file, with its card."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipelines.models import export as sd_export
from pipelines.training import models
from pipelines.training.state import load, trained_vae

TITLE = "Demo: coloured shapes (64 px)"
DESCRIPTION = (
    "A tiny latent diffusion model in the SD 1.x architecture, trained from scratch by this project "
    "(pipelines/training) on procedurally drawn scenes: one circle, square or triangle of one of eight colours "
    "(red, orange, yellow, green, blue, purple, white, black) on a flat background of another, small or large, "
    "in the center or a corner. Prompt like 'a red circle on a blue background' or "
    "'a small green triangle in the top left on a white background'. Native resolution 64x64. "
    "It is a demo that makes the app work without downloads, not a general image model."
)
LICENSE = "MIT"
COMMAND = "python -m pipelines.training --out pipelines/demo/demo-shapes.safetensors"


def build_modules(state_dir: Path, size: str, seed: int):
    """(unet, vae, text encoder) of a finished run, in eval mode, fp32."""
    vae = trained_vae(state_dir, size, seed)
    unet, text = models.build_unet_and_text(size, seed)
    done = load(Path(state_dir) / "ldm_done.pt")
    unet.load_state_dict(done["unet"])
    text.load_state_dict(done["text"])
    return unet.eval(), vae.eval(), text.eval()


def metadata(settings: dict, scores: dict | None, command: str = COMMAND) -> dict[str, str]:
    meta = {
        "modelspec.title": TITLE,
        "modelspec.description": DESCRIPTION,
        "modelspec.license": LICENSE,
        "modelspec.author": "sdui project",
        "modelspec.date": time.strftime("%Y-%m-%d", time.gmtime()),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": "a red circle on a blue background",
        "sdui.demo": "true",
        "sdui.native_resolution": "64",
        "sdui.vae_scaling_factor": str(models.SD1_SCALING_FACTOR),
        "sdui.training_command": command,
        "sdui.training_settings": json.dumps(settings, sort_keys=True),
    }
    if scores is not None:
        meta["sdui.heldout_scores"] = json.dumps({k: round(v, 4) for k, v in scores.items()}, sort_keys=True)
    return meta


def write(out: Path, unet, vae, text, meta: dict[str, str]) -> Path:
    path = sd_export.save_sd1_checkpoint(out, unet, vae, text, metadata=meta, dtype=torch.float16)
    size_mb = path.stat().st_size / 2**20
    if size_mb > 40:
        raise RuntimeError(f"{path}: {size_mb:.1f} MB is over the 40 MB budget")
    return path
