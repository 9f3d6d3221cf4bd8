"""Generation speed: our engine vs plain diffusers, same full-size SD 1.5 file, seed, sampler and steps.

    python bench/speed.py                              # 256x256 and 512x512, 3 Euler steps, CFG 7
    python bench/speed.py --sizes 256 --steps 4 --sampler "DPM++ 2M"
    python bench/speed.py --sides ours-bf16 diffusers  # skip our fp32 run (no image comparison then)
    python bench/speed.py --preset fast                # 512x512, 4-step LCM LoRA, CFG 1, TAESD: request to image

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

`--preset fast` times issue 21's target case end to end instead: a 512x512 image of the same
file with a 4-step LCM-style LoRA, CFG 1 and the TAESD final decode (see the "--preset fast"
section below). Run time: about 6-7 minutes a round of the four sides with `--threads 1` on the
2-core machine with 4 other workers running (the fp32 diffusers side is half of it); writing the
134 MB LoRA the first time adds under a minute. On a shared machine use `--threads 1 --rounds 2`:
two torch threads fighting other processes for 2 cores ran a U-Net step 7x slower than one.
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


# --- --preset fast ------------------------------------------------------------------------------
# Issue 21's target case, request to finished image: the same full-size file with a 4-step
# LCM-style LoRA (random weights, kohya layout, U-Net only, rank 64 on the layers LCM-LoRA
# trains), the settings "Use recommended settings" gives for it (LCM, 4 steps, CFG 1) and the
# TAESD final decode (a random-weight taesd_decoder in models/VAE-approx). Sides: ours at the
# default precision, ours with token merging or DeepCache on top (`FAST_OPTIONS`: opt-in, they
# change the image),
# ours with the full VAE decode (what TAESD saves), and plain diffusers
# (StableDiffusionPipeline + LCMScheduler + load_lora_weights + AutoencoderTiny) in fp32 and
# bf16. Each side runs the request `--repeat` times in one interpreter: the first call also pays
# oneDNN's kernel set-up, the later ones are what a running server gives. No image comparison:
# LCM re-noises between steps and the weights are random (the sampler's fidelity to diffusers'
# LCMScheduler is tested in tests/test_few_step*.py).
FAST_SIDES = ("ours", "ours-tome", "ours-deepcache", "ours-full-vae", "diffusers-fp32", "diffusers-bf16")
FAST_OPTIONS = {  # the opt-in speed options (they change the image) on top of ours
    "ours-tome": {"token_merging_ratio": 0.5},  # A1111's common token merging ratio
    "ours-deepcache": {"deepcache_interval": 2, "deepcache_start": 0.0},  # steps 2 and 4 reuse 1 and 3
}
LCM_LORA_FILE = "lcm-lora-sdv1-5-random.safetensors"  # "lcm" in the name and ss_output_name: few_step knows it
LCM_LORA_RANK = 64
# the layers LCM-LoRA trains (diffusers' LCM distillation script's default LoRA targets)
LCM_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
TAESD_FILE = "taesd_decoder.safetensors"


def lcm_lora_state(unet, rank: int = LCM_LORA_RANK, seed: int = 0) -> dict:
    """A random LoRA in kohya's layout (``lora_unet_`` + the diffusers module path) for every
    layer of `unet` LCM-LoRA trains; small up weights keep the U-Net's outputs finite."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if not any(name == layer or name.endswith("." + layer) for layer in LCM_LORA_LAYERS):
            continue
        if isinstance(module, torch.nn.Conv2d):
            fan_out, fan_in, kernel = module.out_channels, module.in_channels, tuple(module.kernel_size)
        elif isinstance(module, torch.nn.Linear):
            fan_out, fan_in, kernel = module.out_features, module.in_features, ()
        else:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(rank, fan_in, *kernel, generator=g) / (fan_in * max(1, len(kernel) * 4.5)) ** 0.5
        out[key + ".lora_down.weight"] = down.half()
        out[key + ".lora_up.weight"] = (torch.randn(fan_out, rank, *(1 for _ in kernel), generator=g) * 0.01).half()
        out[key + ".alpha"] = torch.tensor(float(rank)).half()
    return out


def write_lcm_lora(unet, path: Path, rank: int = LCM_LORA_RANK) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lcm_lora_state(unet, rank), str(path), metadata={
        "ss_output_name": "lcm-lora-sdv1-5", "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    return path


def write_taesd(path: Path, config: dict | None = None, seed: int = 0) -> Path:
    """A random-weight TAESD decoder as madebyollin's taesd.py saves it (layer N+1: index 0 is its
    weightless clamp); `config`: AutoencoderTiny's, default TAESD's own shape."""
    import torch
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    decoder = AutoencoderTiny(**(config or {})).decoder.state_dict()
    state = {}
    for name, tensor in decoder.items():
        index, _, rest = name.removeprefix("layers.").partition(".")
        state[f"{int(index) + 1}.{rest}"] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def fast_request(engine, checkpoint: str, lora: str, size: int = 512, seed: int = 1234, tiny_decode: bool = True,
                 **fields):
    """The preset's request: the LoRA in the prompt and what 'Use recommended settings' gives for it
    (`fields`: more request fields, e.g. DeepCache's)."""
    from pipelines.core.request import GenerationRequest

    prompt = f"{PROMPT} <lora:{lora}:1>"
    found = engine.recommended_settings(checkpoint, prompt)
    if found is None or found["source"] != f"{lora}.safetensors":
        raise RuntimeError(f"'Use recommended settings' did not recognise {lora} as a few-step LoRA: {found}")
    return GenerationRequest(prompt=prompt, negative_prompt="", steps=found["steps"], cfg_scale=found["cfg_scale"],
                             sampler=found["sampler"], schedule_type=found["schedule_type"], width=size, height=size,
                             seed=seed, save_images=False, checkpoint=checkpoint, tiny_vae_decode=tiny_decode,
                             **fields)


def write_fast_files() -> tuple[Path, Path]:
    """bench/.cache's LoRA and TAESD files (written once, like load.py's checkpoint)."""
    lora, tiny = CACHE / "Lora" / LCM_LORA_FILE, CACHE / "VAE-approx" / TAESD_FILE
    if not lora.exists():
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):  # the module names and shapes only: no 3.4 GB of weights
            unet = UNet2DConditionModel(**load.SD15_UNET)
        write_lcm_lora(unet, lora)
    if not tiny.exists():
        write_taesd(tiny)
    return lora, tiny


def timed_calls(args, call) -> dict:
    """`call(on_step)` `args.repeat` times: each call's seconds, and the s/step of the last one."""
    totals, stamps = [], []
    for _ in range(args.repeat):
        stamps = [time.perf_counter()]
        call(lambda *_: stamps.append(time.perf_counter()))
        totals.append(time.perf_counter() - stamps[0])
    return {"totals": totals, "s_per_step": step_rate(stamps[1:])}


def run_fast_ours(args, path: Path, lora: Path, tiny: Path) -> dict:
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="sdui-speed-fast-"))
    for kind, file in (("Stable-diffusion", path), ("Lora", lora), ("VAE-approx", tiny)):
        (tmp / "models" / kind).mkdir(parents=True)
        os.symlink(file, tmp / "models" / kind / file.name)
    engine = Engine(Paths(models_dir=tmp / "models", data_dir=tmp / "data", outdir=tmp / "out"),
                    EngineSettings(device="cpu"))  # the default precision: what a user gets
    engine.load_checkpoint(path.name)
    request = fast_request(engine, path.name, lora.stem, args.size, args.seed,
                           tiny_decode=args.side != "ours-full-vae",
                           **FAST_OPTIONS.get(args.side, {}))
    return timed_calls(args, lambda on_step: engine.generate(request, on_progress=on_step))


def run_fast_diffusers(args, path: Path, lora: Path, tiny: Path) -> dict:
    import torch
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

    from pipelines.models import taesd

    dtype = torch.bfloat16 if args.side == "diffusers-bf16" else torch.float32
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(CACHE / "sd15-config"), local_files_only=True, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    vae = AutoencoderTiny()
    vae.load_state_dict(taesd.read_decoder_state(tiny), strict=False)  # the decoder: the one that runs
    pipe.vae = vae.to(dtype).eval()

    def call(on_step):
        pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, width=args.size, height=args.size,
             generator=torch.Generator("cpu").manual_seed(args.seed),
             callback_on_step_end=lambda p, i, t, kw: (on_step(), kw)[1])

    return timed_calls(args, call)


def fast_report(rows: dict, size: int) -> None:
    """Each side's best total over the rounds (the least disturbed), the ratios and TAESD's saving."""
    best = {side: min(r["totals"][-1] for r in runs) for side, runs in rows.items() if runs}
    for side in FAST_SIDES:
        if side in best:
            print(f"{size}x{size} fast {side:14} best warm total {best[side]:6.2f} s", flush=True)
    for ours in ("ours", *FAST_OPTIONS):
        for side in ("diffusers-fp32", "diffusers-bf16"):
            if ours in best and side in best:
                print(f"{size}x{size} fast RATIO {ours} / {side}: {best[ours] / best[side]:.2f}", flush=True)
    if "ours" in best and "ours-full-vae" in best:
        print(f"{size}x{size} fast TAESD final decode saves {best['ours-full-vae'] - best['ours']:.2f} s "
              f"({best['ours'] / best['ours-full-vae']:.2f}x of the full-VAE run; target total <= 3 s)", flush=True)


def fast_main(args) -> None:
    load.write_checkpoint("sd15")
    load.write_config_folder("sd15")
    write_fast_files()
    print(f"# preset fast: {load.MODELS['sd15']['file']} + {LCM_LORA_FILE} (rank {LCM_LORA_RANK}), LCM, 4 steps, "
          f"CFG 1, TAESD decode; {args.repeat} calls per side, {args.rounds} round(s) of the sides", flush=True)
    for size in args.sizes:
        rows: dict[str, list] = {side: [] for side in args.sides}
        for round_ in range(args.rounds):  # sides interleaved: a load spike hits one round, not one side
            for side in args.sides:
                row = measure(args, side, size, Path(os.devnull))
                if "error" in row:
                    print(f"{size}x{size} fast {side:14}: FAILED {row['error']}", flush=True)
                    continue
                rows[side].append(row)
                calls = " ".join(f"{t:6.2f}" for t in row["totals"])
                print(f"{size}x{size} fast {side:14} round {round_ + 1}: calls {calls} s  "
                      f"last {row['s_per_step']:5.2f} s/step  load {row['load_s']:5.1f} s  "
                      f"peak RSS {row['peak_rss'] / GB:5.2f} GB  "
                      f"(load average {row['load_average']:.2f})", flush=True)
        fast_report(rows, size)


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    path = CACHE / load.MODELS["sd15"]["file"]
    t0 = time.perf_counter()
    if args.side in FAST_SIDES:
        run = run_fast_ours if args.side.startswith("ours") else run_fast_diffusers
        row = run(args, path, *write_fast_files())
        print(json.dumps({"side": args.side, "size": args.size, **row, "load_s": time.perf_counter() - t0
                          - sum(row["totals"]), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          "load_average": os.getloadavg()[0], "threads": torch.get_num_threads()}))
        return
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
           "--sampler", args.sampler, "--seed", str(args.seed), "--image", str(image), "--repeat", str(args.repeat)]
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
    parser.add_argument("--sizes", nargs="+", type=int)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sampler", default="Euler", choices=["Euler", "DPM++ 2M"])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sides", nargs="+", choices=SIDES + FAST_SIDES,
                        help=f"default: {' '.join(SIDES)}; with --preset fast: {' '.join(FAST_SIDES)}")
    parser.add_argument("--preset", choices=["fast"], help="fast: a 4-step LCM LoRA, CFG 1, TAESD decode, "
                        "request to image (issue 21's target); --sizes default 512 then")
    parser.add_argument("--repeat", type=int, default=2, help="--preset fast: calls per side (first: cold)")
    parser.add_argument("--rounds", type=int, default=1, help="--preset fast: rounds of all sides, interleaved")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each side (default: torch's own, one per core); on a shared "
                             "machine 1 thread is steadier, as idle-waiting threads stall each other")
    parser.add_argument("--note", default="", help="printed with the machine line (e.g. what else was running)")
    parser.add_argument("--child", choices=SIDES + FAST_SIDES, dest="side", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    threads = f"; {args.threads} torch thread(s) per side" if args.threads else ""
    print(f"# {machine_line()}{threads}{'; ' + args.note if args.note else ''}", flush=True)
    args.sides = args.sides or list(FAST_SIDES if args.preset else SIDES)
    if args.preset:
        args.sizes = args.sizes or [512]
        return fast_main(args)
    args.sizes = args.sizes or [256, 512]
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
                    ratio = rows[side]['s_per_step'] / base['s_per_step']
                    print(f"{size}x{size} RATIO {side} / diffusers: s/step {ratio:.2f}"
                          f"  peak RSS {rows[side]['peak_rss'] / base['peak_rss']:.2f}"
                          f"{'  (target <= 0.5)' if side == 'ours-bf16' else ''}", flush=True)
            for side in ("ours-fp32", "ours-bf16"):
                if base and side in rows:
                    mean, worst = image_difference(Path(tmp) / f"{side}-{size}.png",
                                                   Path(tmp) / f"diffusers-{size}.png")
                    print(f"{size}x{size} image |{side} - diffusers|: mean {mean:.2f}, max {worst} (of 255)",
                          flush=True)


if __name__ == "__main__":
    main()
