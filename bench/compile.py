"""torch.compile against eager bf16 on the full-size SD 1.5 U-Net, side by side in one run.

    python bench/compile.py                            # inductor (freezing) at 256 and 512
    python bench/compile.py --backends inductor openvino --sizes 256
    python bench/compile.py --backends inductor-autotune --sizes 256   # max-autotune-no-cudagraphs
    python bench/compile.py --cache-dir bench/.cache/inductor          # twice: the second compile is warm

The U-Net is loaded and placed as the engine places it at the default precision
(`profile_step.load_as_engine`: bf16, channels-last, SDPA). Each (backend, size) runs in a fresh
interpreter that holds both models: the eager U-Net and the compiled one (the same module).

- compile: seconds of the compiled model's first call less an eager step (tracing, lowering,
  code generation; a warm inductor cache in `--cache-dir` cuts it);
- s/step: one CFG step (batch 2), eager and compiled calls interleaved `--steps` times each, so a
  load spike on the shared machine hits both sides;
- image: `--image-steps` Euler steps (CFG 7, fixed noise and text embeddings) with each model,
  decoded by the VAE as the engine decodes (fp32 at the default precision); mean / max absolute
  8-bit difference between the compiled model's image and the eager one's.

Backends: "inductor" is `torch.compile(unet, dynamic=False)` under `torch.no_grad()` with
`torch._inductor.config.freezing = True` (weights folded as constants, oneDNN weight prepacking
for convolutions and linears); "inductor-autotune" adds mode="max-autotune-no-cudagraphs" (it
benchmarks kernel choices while compiling: slow); "openvino" is the `openvino` package's
torch.compile backend (`pip install openvino`, an optional extra), device CPU. The issue's bar
for a default: faster at both sizes, images within 1 level mean / 8 max of eager bf16.
Nothing is asserted: the numbers are printed. The openvino backend needs its `aot_autograd`
option with torch 2.14 (without it Dynamo fails building its guards).

Run time with `--threads 1` on the shared 2-core machine: inductor about 4.5 minutes at 256
(a 160 s cold compile; 64 s with a warm `--cache-dir`) and 8 minutes at 512 (173 s compile);
openvino about 1.5 minutes at 256. Run the sizes as separate commands to stay under 10 minutes each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # noqa: E402  (bench/profile_step.py: the U-Net as the engine places it, a step's inputs)

ROOT = profile_step.load.ROOT
BACKENDS = ("inductor", "inductor-autotune", "openvino")


def compiled_unet(unet, backend: str):
    """`unet` compiled by `backend` (compilation itself happens on the first call)."""
    import torch

    if backend == "openvino":
        import openvino.torch  # noqa: F401  (optional: registers the "openvino" backend)

        # aot_autograd: without it torch 2.14 fails building the guards ("sources must not be empty")
        return torch.compile(unet, backend="openvino", dynamic=False, options={"device": "CPU", "aot_autograd": True})
    torch._inductor.config.freezing = True  # weights as constants: folded and prepacked for oneDNN
    mode = "max-autotune-no-cudagraphs" if backend == "inductor-autotune" else None
    return torch.compile(unet, dynamic=False, mode=mode)


def denoised_image(unet, vae, inputs: dict, steps: int):
    """`steps` Euler steps from fixed noise at CFG 7, decoded to an 8-bit HWC array."""
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler

    from pipelines.models.families import SD_SCHEDULE

    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULE.items()
                                          if k not in ("clip_sample", "set_alpha_to_one")})
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, *inputs["sample"].shape[1:], generator=torch.Generator().manual_seed(7))
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(model_in.to(inputs["sample"].dtype), t, encoder_hidden_states=inputs["encoder_hidden_states"])
            uncond, cond = out.sample.float().chunk(2)
            latents = scheduler.step(uncond + 7.0 * (cond - uncond), t, latents).prev_sample
        parameter = next(vae.parameters())
        pixels = vae.decode((latents / vae.config.scaling_factor).to(parameter.dtype)).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels[0].permute(1, 2, 0).numpy().astype(np.int16)


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    components, placement = profile_step.load_as_engine()
    unet, inputs = components.unet, profile_step.step_inputs(args.size, placement.dtype)
    eager_step = profile_step.seconds_per_step(unet, inputs, 2)  # the second call: oneDNN set up
    fast = compiled_unet(unet, args.backend)
    with torch.no_grad():
        started = time.perf_counter()
        fast(**inputs)
        compile_s = time.perf_counter() - started - eager_step
        fast(**inputs)  # a second call may still specialise
    eager, compiled = [], []
    for _ in range(args.steps):  # interleaved
        eager.append(profile_step.seconds_per_step(unet, inputs, 1))
        compiled.append(profile_step.seconds_per_step(fast, inputs, 1))
    reference = denoised_image(unet, components.vae, inputs, args.image_steps)
    image = denoised_image(fast, components.vae, inputs, args.image_steps)
    diff = abs(image - reference)
    print(json.dumps({"backend": args.backend, "size": args.size, "compile_s": compile_s,
                      "eager_s": sorted(eager)[len(eager) // 2], "compiled_s": sorted(compiled)[len(compiled) // 2],
                      "mean": float(diff.mean()), "max": int(diff.max()), "load_average": os.getloadavg()[0],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
                      "threads": torch.get_num_threads()}))


def measure(args, backend: str, size: int, cache_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--size", str(size), "--steps", str(args.steps),
           "--image-steps", str(args.image_steps)] + (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": [f"over --timeout {args.timeout} s"]}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def verdict(rows: list[dict]) -> str:
    """Whether a backend clears the issue's bar at every size measured."""
    wins = all(r["compiled_s"] < 0.9 * r["eager_s"] and r["mean"] <= 1 and r["max"] <= 8 for r in rows)
    return "clears the bar (>= 10% faster, mean <= 1, max <= 8 everywhere)" if wins else "does not clear the bar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--backends", nargs="+", default=["inductor"], choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (median)")
    parser.add_argument("--image-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", help="TORCHINDUCTOR_CACHE_DIR (default: a fresh one: cold compiles)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per (backend, size)")
    parser.add_argument("--child", choices=BACKENDS, dest="backend", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        return child(args)
    import torch

    print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}; eager = "
          f"bf16 channels-last U-Net as the engine runs it; one CFG step = batch 2", flush=True)
    with tempfile.TemporaryDirectory(prefix="sdui-inductor-") as fresh:
        cache_dir = args.cache_dir or fresh
        for backend in args.backends:
            rows = []
            for size in args.sizes:
                row = measure(args, backend, size, cache_dir)
                if "error" in row:
                    print(f"{size}x{size} {backend:17}: FAILED {row['error']}", flush=True)
                    continue
                rows.append(row)
                print(f"{size}x{size} {backend:17} compile {row['compile_s']:6.1f} s  eager {row['eager_s']:6.3f} "
                      f"s/step  compiled {row['compiled_s']:6.3f} s/step  "
                      f"ratio {row['compiled_s'] / row['eager_s']:.2f}"
                      f"  image |compiled - eager| mean {row['mean']:.2f} max {row['max']} (of 255)  "
                      f"peak RSS {row['peak_rss_gb']:.1f} GB  (load average {row['load_average']:.2f}, "
                      f"{row['threads']} threads, {row['wall_s']:.0f} s)",
                      flush=True)
            if rows:
                print(f"{backend}: {verdict(rows)}", flush=True)


if __name__ == "__main__":
    main()
