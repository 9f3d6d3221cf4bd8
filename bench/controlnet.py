"""ControlNet's cost: full-size SD 1.5 with and without one full-size ControlNet unit, same run.

    python bench/controlnet.py                 # 512x512, 3 steps each, the engine's default precision
    python bench/controlnet.py --size 256 --steps 4 --precision full

The checkpoint is bench/load.py's full-size SD 1.5 file with random fp16 weights (written to
`bench/.cache/` if missing); the ControlNet is a full-size SD 1.5 ControlNet (diffusers' config
of lllyasviel/control_v11p_sd15_canny, built from the U-Net's) with random fp16 weights, written
in diffusers' single-file layout into a temporary models/ControlNet. Both go through
`Engine.generate` as the UI and API call it. s/step is the mean time between step callbacks
after the first step of each job. Nothing is asserted: the numbers are printed. Target
(issue 18): one unit costs <= 1.5x a plain step (a ControlNet is about half a U-Net).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import load  # noqa: E402  (bench/load.py: writes the checkpoint)

CONTROLNET_FILE = "control-sd15-random-fp16.safetensors"


def write_controlnet(path: Path) -> Path:
    """A full-size SD 1.5 ControlNet with random weights (zero convolutions too, so it acts)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    if path.is_file():
        return path
    unet = UNet2DConditionModel(**load.MODELS["sd15"]["unet"])
    controlnet = ControlNetModel.from_unet(unet)
    del unet
    generator = torch.Generator().manual_seed(1)
    state = {key: (torch.randn(t.shape, generator=generator) * 0.02).to(torch.float16) if "controlnet_" in key
             else t.to(torch.float16).contiguous() for key, t in controlnet.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def step_rate(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2) if len(stamps) >= 3 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "full", "bf16"])
    args = parser.parse_args()

    from PIL import Image, ImageDraw

    from pipelines.core.control import ControlUnit
    from pipelines.core.request import GenerationRequest
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    checkpoint = load.write_checkpoint("sd15")
    tmp = Path(tempfile.mkdtemp(prefix="sdui-controlnet-"))
    (tmp / "models" / "Stable-diffusion").mkdir(parents=True)
    os.symlink(checkpoint, tmp / "models" / "Stable-diffusion" / checkpoint.name)
    write_controlnet(load.CACHE / CONTROLNET_FILE)
    (tmp / "models" / "ControlNet").mkdir()
    os.symlink(load.CACHE / CONTROLNET_FILE, tmp / "models" / "ControlNet" / CONTROLNET_FILE)
    engine = Engine(Paths(models_dir=tmp / "models", data_dir=tmp / "data", outdir=tmp / "out"),
                    EngineSettings(device="cpu", precision=args.precision))
    engine.load_checkpoint(checkpoint.name)

    edges = Image.new("RGB", (args.size, args.size), "black")
    ImageDraw.Draw(edges).rectangle((args.size // 4, args.size // 4, 3 * args.size // 4, 3 * args.size // 4),
                                    outline="white", width=4)
    unit = ControlUnit(model=CONTROLNET_FILE, image=edges, module="none")

    def job(units, steps):
        stamps = [time.perf_counter()]
        request = GenerationRequest(prompt="a cat", negative_prompt="blurry", steps=steps, cfg_scale=7.0,
                                    width=args.size, height=args.size, seed=1, sampler="Euler",
                                    save_images=False, checkpoint=checkpoint.name, control_units=units)
        result = engine.generate(request, on_progress=lambda p: stamps.append(time.perf_counter()))
        return result, stamps

    job((), 1)  # warm-up: oneDNN's kernel set-up
    _, plain = job((), args.steps)
    rss_plain = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result, controlled = job((unit,), args.steps)
    rss_control = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plain_rate, control_rate = step_rate(plain), step_rate(controlled)
    print(f"SD 1.5 full size, {args.size}x{args.size}, CFG 7, {args.steps} Euler steps, "
          f"precision {engine.describe().get('dtype', args.precision)}, {os.cpu_count()} CPUs")
    print(f"  without ControlNet: {plain_rate:.2f} s/step, job {plain[-1] - plain[0]:.1f} s, "
          f"peak RSS {rss_plain / load.GB:.2f} GB")
    print(f"  one ControlNet unit: {control_rate:.2f} s/step, job {controlled[-1] - controlled[0]:.1f} s, "
          f"peak RSS {rss_control / load.GB:.2f} GB (the control model loaded in the job included)")
    print(f"  ratio with / without: {control_rate / plain_rate:.2f}x per step")
    print("  infotext:", result.infotexts[0].splitlines()[-1][:160])


if __name__ == "__main__":
    main()
