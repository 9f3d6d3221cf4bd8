"""Generation speed: our engine vs plain diffusers, same full-size SD 1.5 file, seed, sampler and steps.

    python bench/speed.py                              # 256x256 and 512x512, 3 Euler steps, CFG 7
    python bench/speed.py --sizes 256 --steps 4 --sampler "DPM++ 2M"
    python bench/speed.py --sides ours-bf16 diffusers  # skip our fp32 run (no image comparison then)

The checkpoint is bench/load.py's full-size SD 1.5 file with random fp16 weights (written to
`bench/.cache/` if missing), with the diffusers config folder load.py writes from the
project's shipped tokenizer and noise schedule, so diffusers loads it offline
(`from_single_file(..., config=..., local_files_only=True)`).

Three sides, each in its own fresh interpreter so its peak RSS is its own (load included):
- diffusers: `StableDiffusionPipeline`, fp32, default attention, its scheduler class for the
  sampler with our spacing (A1111's k-diffusion schedules use "linspace", not the "leading"
  of SD's training config; without this the two would run different timesteps);
- ours-fp32 / ours-bf16: `Engine.generate` as the UI and API call it (`--precision full|bf16`).

s/step is the mean time between step callbacks after the first step (the first one also pays
oneDNN's one-time kernel set-up), so text encoding and VAE decoding are not in it; "total" is
the whole call. FLOP/s uses 1.6 TFLOP per CFG step at 512x512, scaled by pixel count. The image
difference is the mean absolute 8-bit pixel difference between ours-fp32 and diffusers.
Nothing is asserted: the numbers are printed. Targets (issue 7): bf16 / diffusers <= 0.5,
peak RSS <= diffusers'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (bench/load.py: writes the checkpoint and config folder)

ROOT, CACHE, GB = load.ROOT, load.CACHE, load.GB
FLOP_PER_CFG_STEP_512 = 1.6e12
PROMPT, NEGATIVE = "a photograph of a cat on a red sofa", "blurry"
SIDES = ("diffusers", "ours-fp32", "ours-bf16")


def step_rate(stamps: list[float]) -> float:
    """Seconds per step from the step-end times, the first step left out when there are more."""
    if len(stamps) >= 3:
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return stamps[-1] - stamps[-2] if len(stamps) == 2 else float("nan")


def run_diffusers(args, path: Path) -> tuple[object, list[float]]:
    import torch
    from diffusers import StableDiffusionPipeline

    from pipelines.core import samplers
    from pipelines.generate import schedulers

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(CACHE / "sd15-config"), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    spec = samplers.sampler_spec(args.sampler)
    cls = schedulers.scheduler_class(args.sampler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config,
                                     **({"timestep_spacing": spec.spacing} if spec.spacing else {}), **spec.kwargs)
    stamps: list[float] = []

    def on_step_end(pipe, step, timestep, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    started = time.perf_counter()
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.0,
                 width=args.size, height=args.size, generator=torch.Generator("cpu").manual_seed(args.seed),
                 callback_on_step_end=on_step_end).images[0]
    return image, [started, *stamps]


def run_ours(args, path: Path, precision: str) -> tuple[object, list[float]]:
    from pipelines.core.request import GenerationRequest
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="sdui-speed-"))
    models = tmp / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.symlink(path, models / path.name)
    engine = Engine(Paths(models_dir=tmp / "models", data_dir=tmp / "data", outdir=tmp / "out"),
                    EngineSettings(device="cpu", precision=precision))
    engine.load_checkpoint(path.name)  # loaded (and hashed) before the clock, as diffusers is
    stamps: list[float] = []
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, cfg_scale=7.0,
                                width=args.size, height=args.size, seed=args.seed, sampler=args.sampler,
                                schedule_type="Uniform", save_images=False, checkpoint=path.name)
    started = time.perf_counter()
    result = engine.generate(request, on_progress=lambda p: stamps.append(time.perf_counter()))
    return result.images[0], [started, *stamps]


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    path = CACHE / load.MODELS["sd15"]["file"]
    t0 = time.perf_counter()
    if args.side == "diffusers":
        image, stamps = run_diffusers(args, path)
    else:
        image, stamps = run_ours(args, path, {"ours-fp32": "full", "ours-bf16": "bf16"}[args.side])
    end = time.perf_counter()
    image.save(args.image)
    steps = stamps[1:]
    print(json.dumps({"side": args.side, "size": args.size, "s_per_step": step_rate(steps),
                      "first_step_s": steps[0] - stamps[0], "total_s": end - stamps[0],
                      "with_load_s": end - t0, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "threads": torch.get_num_threads()}))


def measure(args, side: str, size: int, image: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--size", str(size), "--steps", str(args.steps),
           "--sampler", args.sampler, "--seed", str(args.seed), "--image", str(image)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def image_difference(a: Path, b: Path) -> tuple[float, int]:
    """Mean and max absolute difference of two 8-bit RGB images."""
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    diff = np.abs(x - y)
    return float(diff.mean()), int(diff.max())


def machine_line() -> str:
    import torch

    load_avg = os.getloadavg()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load_avg:.2f} "
            f"before the run, torch {torch.__version__} ({torch.get_num_threads()} threads), python "
            f"{sys.version.split()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sampler", default="Euler", choices=["Euler", "DPM++ 2M"])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each side (default: torch's own, one per core); on a shared "
                             "machine 1 thread is steadier, as idle-waiting threads stall each other")
    parser.add_argument("--note", default="", help="printed with the machine line (e.g. what else was running)")
    parser.add_argument("--child", choices=SIDES, dest="side", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    threads = f"; {args.threads} torch thread(s) per side" if args.threads else ""
    print(f"# {machine_line()}{threads}{'; ' + args.note if args.note else ''}", flush=True)
    load.write_checkpoint("sd15")
    load.write_config_folder("sd15")
    print(f"# {load.MODELS['sd15']['file']}, {args.sampler}, {args.steps} steps, CFG 7, batch 1, seed {args.seed}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            flop = FLOP_PER_CFG_STEP_512 * size * size / (512 * 512)
            rows = {}
            for side in args.sides:
                row = measure(args, side, size, Path(tmp) / f"{side}-{size}.png")
                if "error" in row:
                    print(f"{size}x{size} {side:9}: FAILED {row['error']}", flush=True)
                    continue
                rows[side] = row
                print(f"{size}x{size} {side:9}  {row['s_per_step']:6.2f} s/step  "
                      f"{flop / row['s_per_step'] / 1e9:6.1f} GFLOP/s  first step {row['first_step_s']:6.2f} s  "
                      f"total {row['total_s']:6.1f} s  peak RSS {row['peak_rss'] / GB:5.2f} GB", flush=True)
            base = rows.get("diffusers")
            for side in ("ours-fp32", "ours-bf16"):
                if base and side in rows:
                    print(f"{size}x{size} RATIO {side} / diffusers: s/step {rows[side]['s_per_step'] / base['s_per_step']:.2f}"
                          f"  peak RSS {rows[side]['peak_rss'] / base['peak_rss']:.2f}"
                          f"{'  (target <= 0.5)' if side == 'ours-bf16' else ''}", flush=True)
            for side in ("ours-fp32", "ours-bf16"):
                if base and side in rows:
                    mean, worst = image_difference(Path(tmp) / f"{side}-{size}.png", Path(tmp) / f"diffusers-{size}.png")
                    print(f"{size}x{size} image |{side} - diffusers|: mean {mean:.2f}, max {worst} (of 255)", flush=True)


if __name__ == "__main__":
    main()
