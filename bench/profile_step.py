"""Where one CFG step's time goes: torch.profiler over the full-size SD 1.5 U-Net, run as our default runs it.

    python bench/profile_step.py                       # 256x256 and 512x512, bf16, 2 warm-up steps
    python bench/profile_step.py --sizes 256 --threads 1 --steps 3

The U-Net is bench/load.py's full-size SD 1.5 file with random fp16 weights, loaded by our own
loader (`build.load_components`) in bf16 with channels-last weights, as the engine places it on an
AVX512-BF16/AMX CPU (`device.choose_placement` with the default settings), SDPA attention. One
CFG step is one U-Net call on a batch of 2 latents (the negative and the positive prompt) with
(2, 77, 768) text embeddings, called as `runner.run_batch` calls it. Warm-up steps first (oneDNN
sets its kernels up on the first call of each shape), then `--steps` profiled steps.

The table sums each operator's *self* CPU time (its time minus its children's) into groups:
convolutions, attention (SDPA), matmul/linear, GroupNorm/LayerNorm, SiLU/GELU/elementwise, layout
conversions (to/copy/contiguous/cat), other. The ops run on the calling thread (their intra-op
worker threads are inside those times), so the groups add up to the op time; what the wall clock
has on top of that is Python and dispatch ("outside ops"). The profiler's own overhead is in the
profiled step's time: the unprofiled s/step is printed next to it. Nothing is asserted.
Run time: about a minute for both sizes with `--threads 1` (load included), on the shared 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (bench/load.py: writes the checkpoint)

CACHE = load.CACHE
FLOP_PER_CFG_STEP_512 = 1.6e12  # as bench/speed.py counts it

# (group, operator names without "aten::"): a name of 3 letters or fewer matches exactly (an
# in-place "_" aside), a longer one anywhere in the name; first match wins, specific names first
GROUPS = (
    ("convolutions", ("convolution", "conv2d")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("matmul/linear", ("addmm", "linear", "matmul", "bmm", "mm")),
    ("GroupNorm/LayerNorm", ("group_norm", "layer_norm")),
    ("layout (to/copy/contiguous)", ("to", "_to_copy", "copy", "contiguous", "clone", "cat", "permute",
                                     "transpose", "reshape", "view", "expand", "as_strided", "chunk", "split",
                                     "slice", "select", "unsqueeze", "t", "empty", "empty_like", "resize")),
    ("SiLU/GELU/elementwise", ("silu", "gelu", "add", "mul", "div", "sub", "exp", "sin", "cos", "neg", "pow",
                               "rsqrt", "fill", "zero", "where", "clamp", "arange", "sigmoid")),
)


def group_of(op_name: str) -> str:
    """The table's group of a profiler event name ("aten::mkldnn_convolution" -> "convolutions")."""
    name = op_name.removeprefix("aten::")
    for group, names in GROUPS:
        if any(name.rstrip("_") == n or (len(n) > 3 and n in name) for n in names):
            return group
    return "other"


def load_as_engine(precision: str = "auto"):
    """The bench file's components, loaded and placed as the engine does for `--precision`
    (U-Net dtype and channels-last, the VAE's dtype, the attention processor), and the placement."""
    from pipelines.core.settings import EngineSettings
    from pipelines.models import build, device

    load.write_checkpoint("sd15")
    placement = device.choose_placement(EngineSettings(device="cpu", precision=precision))
    components = build.load_components(CACHE / load.MODELS["sd15"]["file"], dtype=placement.dtype,
                                       vae_dtype=placement.vae_dtype, unet_channels_last=placement.channels_last,
                                       vae_channels_last=placement.vae_channels_last)
    device.apply_attention(components.unet, placement.attention)
    components.unet.eval().requires_grad_(False)
    components.vae.eval().requires_grad_(False)
    return components, placement


def load_unet(precision: str = "auto"):
    components, placement = load_as_engine(precision)
    return components.unet, placement


def step_inputs(size: int, dtype, seed: int = 0) -> dict:
    """One CFG step's U-Net inputs at `size` pixels: as `runner.run_batch` passes them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    # a float timestep, as Euler-type schedulers give it (a compiled U-Net specialises on its dtype)
    return {"sample": latents, "timestep": torch.tensor(500.0), "encoder_hidden_states": context}


def seconds_per_step(unet, inputs: dict, steps: int) -> float:
    import torch

    with torch.no_grad():
        started = time.perf_counter()
        for _ in range(steps):
            unet(**inputs)
        return (time.perf_counter() - started) / steps


def profile_groups(unet, inputs: dict, steps: int) -> tuple[dict[str, float], float, list]:
    """Self CPU seconds per group per step, the profiled wall seconds per step, the top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            unet(**inputs)
        wall = (time.perf_counter() - started) / steps
    groups: dict[str, float] = {}
    events = prof.key_averages()
    for event in events:
        groups[group_of(event.key)] = groups.get(group_of(event.key), 0.0) + event.self_cpu_time_total / 1e6 / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return groups, wall, [(e.key, e.self_cpu_time_total / 1e6 / steps, e.count // steps) for e in top]


def report(size: int, plain: float, groups: dict[str, float], wall: float, top: list) -> None:
    ops = sum(groups.values())
    flop = FLOP_PER_CFG_STEP_512 * size * size / (512 * 512)
    print(f"{size}x{size}: {plain:.3f} s/step unprofiled ({flop / plain / 1e9:.0f} GFLOP/s), {wall:.3f} s profiled, "
          f"ops {ops:.3f} s", flush=True)
    rows = sorted(groups.items(), key=lambda kv: -kv[1]) + [("outside ops (Python, dispatch)", max(0.0, wall - ops))]
    for group, seconds in rows:
        print(f"  {group:32} {seconds:7.3f} s  {100 * seconds / wall:5.1f} %", flush=True)
    print("  top operators (self time per step, calls):", flush=True)
    for name, seconds, calls in top:
        print(f"    {name:44} {seconds:7.3f} s  {calls:4d}  [{group_of(name)}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "full"],
                        help="as --precision: auto is bf16 on AVX512-BF16/AMX CPUs, fp32 on others")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="profiled (and unprofiled) steps per size")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    unet, placement = load_unet(args.precision)
    print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); U-Net {placement.dtype}, channels_last {placement.channels_last}, "
          f"attention {placement.attention}; one CFG step = batch 2", flush=True)
    for size in args.sizes:
        inputs = step_inputs(size, placement.dtype)
        seconds_per_step(unet, inputs, args.warmup)
        plain = seconds_per_step(unet, inputs, args.steps)
        groups, wall, top = profile_groups(unet, inputs, args.steps)
        report(size, plain, groups, wall, top)
        print(f"  (load average {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
