"""DeepCache (pipelines/generate/deep_cache.py): quality and speed against the uncached run.

    python bench/deep_cache.py                          # demo model, 20 steps, intervals 2 3 5, branch 0
    python bench/deep_cache.py --intervals 3 --branch 1 --cfg 5 7
    python bench/deep_cache.py --no-full-size           # only the demo model
    python bench/deep_cache.py --json

1. The shipped demo model (a real trained model, 64x64), through the engine as the UI calls it:
   the demo judge's colour / background / shape scores (bench/demo_quality.py's held-out
   combinations and prompts) with and without caching, and the speed-up of one image (median of
   alternating runs, so load on a shared machine hits both sides alike). Issue 21's target:
   >= 1.8x with every score within one image of the uncached run.
2. A full-size SD 1.5-shaped U-Net with random weights at 512x512, CFG batch 2, 3 steps
   (full, cached, cached at interval 3), in the engine's CPU dtype: the time of a full and a cached
   step and their ratio, plus the FLOP ratio of a cached step per branch (counted on the meta
   device, so it costs nothing). Skipped when the first (warm-up) step shows the part would not
   finish in 3 minutes.

Until the runner drives the cache itself (a `deepcache_interval` request field), the bench applies
it around the engine's loaded U-Net and finds each call's step from the sampler's timesteps.
Nothing is asserted: the numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEMO = ROOT / "pipelines" / "demo" / "demo-shapes.safetensors"
FULL_SIZE_BUDGET_S = 180.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--start", type=float, default=None, help="share of the first steps run in full "
                                                              "(default: deep_cache.DEFAULT_START)")
    p.add_argument("--cfg", type=float, nargs="+", default=[6.0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--per-combo", type=int, default=2, help="images (seeds) per held-out combination")
    p.add_argument("--timing-runs", type=int, default=5, help="alternating one-image runs per setting")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    p.add_argument("--no-full-size", dest="full_size", action="store_false")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def cache_settings(args, interval: int):
    """The cache settings of `interval` with the `--branch` and `--start` given (else the defaults)."""
    from pipelines.generate import deep_cache

    start = deep_cache.DEFAULT_START if args.start is None else args.start
    return deep_cache.DeepCacheSettings(interval, args.branch, start)


class DemoRunner:
    """The demo model in an engine, with DeepCache applied around its loaded U-Net on request."""

    def __init__(self, args):
        from pipelines.core.settings import EngineSettings, Paths
        from pipelines.engine import Engine

        tmp = Path(tempfile.mkdtemp(prefix="deep-cache-bench-"))
        self.args = args
        self.engine = Engine(Paths(models_dir=tmp / "models", ckpt_dir=DEMO.parent, data_dir=tmp / "data",
                                   outdir=tmp / "out"), EngineSettings(device="cpu"))
        file = self.engine.load_checkpoint(DEMO.name)
        self.components = self.engine.manager.get(file.name, file.path).components
        self.unet_seconds = 0.0  # time inside the U-Net's forward, summed over calls
        self._unet_started = 0.0
        self.components.unet.register_forward_pre_hook(self._start_unet_clock)
        self.components.unet.register_forward_hook(self._stop_unet_clock)

    def _start_unet_clock(self, *_):
        self._unet_started = time.perf_counter()

    def _stop_unet_clock(self, *_):
        self.unet_seconds += time.perf_counter() - self._unet_started

    def settings(self, interval: int):
        return cache_settings(self.args, interval)

    def request(self, prompt: str, cfg: float, seed: int, batch: int, interval: int):
        from pipelines.core.request import GenerationRequest

        fields = {"prompt": prompt, "negative_prompt": "", "steps": self.args.steps, "cfg_scale": cfg,
                  "sampler": self.args.sampler, "width": 64, "height": 64, "seed": seed, "batch_size": batch,
                  "save_images": False, "checkpoint": DEMO.name}
        if "deepcache_interval" in GenerationRequest.__dataclass_fields__:  # the runner drives the cache
            fields.update(deepcache_interval=interval, deepcache_branch=self.args.branch,
                          deepcache_start=self.settings(interval).start)
        return GenerationRequest(**fields)

    def generate(self, prompt: str, cfg: float, seed: int, batch: int, interval: int):
        from pipelines.core.request import GenerationRequest

        request = self.request(prompt, cfg, seed, batch, interval)
        if "deepcache_interval" in GenerationRequest.__dataclass_fields__:
            return self.engine.generate(request).images
        with self.cache_applied(interval):
            return self.engine.generate(request).images

    def cache_applied(self, interval: int):
        """DeepCache on the engine's U-Net, each call's step found from the sampler's timesteps."""
        import contextlib

        from pipelines.generate import deep_cache, schedulers

        unet = self.components.unet
        scheduler = schedulers.make_scheduler(self.args.sampler, "Automatic", self.components.scheduler_config)
        scheduler.set_timesteps(self.args.steps)
        index = {round(float(t), 3): i for i, t in enumerate(scheduler.timesteps)}

        @contextlib.contextmanager
        def applied():
            with deep_cache.applied(unet, self.settings(interval)) as cache:
                if cache is None:
                    yield
                    return

                def find_step(_, args, kwargs):
                    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
                    cache.step(index[round(float(t), 3)], len(index))

                hook = unet.register_forward_pre_hook(find_step, with_kwargs=True, prepend=True)
                try:
                    yield
                finally:
                    hook.remove()

        return applied()


def demo_scores(runner: DemoRunner, cfg: float, interval: int) -> dict:
    from pipelines.training import data

    images, expected = [], []
    for k, (colour, shape, background) in enumerate(data.HELD_OUT):
        out = runner.generate(data.simple_caption(colour, shape, background), cfg, 1000 + 10 * k,
                              runner.args.per_combo, interval)
        images += out
        expected += [(colour, shape, background)] * len(out)
    scores = data.score(images, expected)
    return {key: round(value, 4) for key, value in scores.items()} | {"images": len(images)}


def demo_timing(runner: DemoRunner, cfg: float, intervals: list[int]) -> dict[int, tuple[float, float]]:
    """Median seconds of one image per interval (1 = uncached), end to end and inside the U-Net,
    runs alternating between settings."""
    settings = [1] + intervals
    runner.generate("a red circle on a blue background", cfg, 1, 1, 1)  # warm-up
    times: dict[int, list[tuple[float, float]]] = {s: [] for s in settings}
    for _ in range(runner.args.timing_runs):
        for interval in settings:
            runner.unet_seconds = 0.0
            t0 = time.perf_counter()
            runner.generate("a red circle on a blue background", cfg, 1, 1, interval)
            times[interval].append((time.perf_counter() - t0, runner.unet_seconds))
    return {s: (statistics.median(t for t, _ in v), statistics.median(u for _, u in v)) for s, v in times.items()}


JUDGED = ("colour", "background", "shape")


def images_gained(scores: dict, uncached: dict) -> dict[str, int]:
    """Per judged property, how many more images than the uncached run's got it right (negative: fewer)."""
    return {k: round((scores[k] - uncached[k]) * uncached["images"]) for k in JUDGED}


def demo_part(args) -> dict:
    runner = DemoRunner(args)
    report: dict = {"steps": args.steps, "sampler": args.sampler, "branch": args.branch, "per_combo": args.per_combo,
                    "start": runner.settings(2).start,
                    "flop_ratio_cached_over_full": flop_ratios(dict(runner.components.unet.config), 64), "cfg": {}}
    for cfg in args.cfg:
        uncached = demo_scores(runner, cfg, 1)
        entry = {"uncached": uncached}
        seconds = demo_timing(runner, cfg, args.intervals)
        entry["seconds_uncached"], entry["unet_seconds_uncached"] = (round(s, 4) for s in seconds[1])
        for interval in args.intervals:
            scores = demo_scores(runner, cfg, interval)
            total, unet = seconds[interval]
            entry[f"interval {interval}"] = dict(scores, seconds=round(total, 4), unet_seconds=round(unet, 4),
                                                 speedup=round(seconds[1][0] / total, 3),
                                                 unet_speedup=round(seconds[1][1] / unet, 3),
                                                 images_gained=images_gained(scores, uncached))
        report["cfg"][str(cfg)] = entry
    return report


def flop_ratios(unet_config: dict, size: int) -> dict[str, float]:
    """FLOPs of a cached step over a full one, per branch, counted on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.generate import deep_cache

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        latents = torch.empty(2, 4, size // 8, size // 8)
        context = torch.empty(2, 77, unet_config["cross_attention_dim"])

    def count(branch: int | None) -> int:
        settings = deep_cache.DeepCacheSettings(interval=2, branch=branch or 0, start=0)
        with torch.no_grad(), deep_cache.applied(unet, settings if branch is not None else deep_cache.OFF) as cache:
            if cache is not None:
                cache.step(0, 2)
                unet(latents, 500, encoder_hidden_states=context)
                cache.step(1, 2)
            with FlopCounterMode(display=False) as counter:
                unet(latents, 480, encoder_hidden_states=context)
        return counter.get_total_flops()

    full = count(None)
    return {f"branch {b}": round(count(b) / full, 4) for b in range(deep_cache.max_branch(unet) + 1)}


def estimated_speedup(settings, steps: int, cached_over_full: float) -> float:
    """U-Net time of `steps` uncached steps over the same with `settings`, from a cached step's cost."""
    full = sum(settings.full_step(i, steps) for i in range(steps))
    return steps / (full + (steps - full) * cached_over_full)


def full_size_part(args) -> dict:
    """Full and cached step times of an SD 1.5-shaped random U-Net at 512x512 (CFG batch 2)."""
    import load
    import torch
    from diffusers import UNet2DConditionModel

    from pipelines.generate import deep_cache
    from pipelines.models.device import cpu_has_fast_bf16

    report: dict = {"flop_ratio_cached_over_full": flop_ratios(load.SD15_UNET, 512),
                    "start": cache_settings(args, 2).start}
    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**load.SD15_UNET).to(dtype).eval()
    latents = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1)).to(dtype)
    timesteps = [999, 666, 333]

    def step(t) -> float:
        t0 = time.perf_counter()
        unet(latents, t, encoder_hidden_states=context)
        return time.perf_counter() - t0

    with torch.no_grad():
        warm = step(999)
        report.update(dtype=str(dtype).replace("torch.", ""),
                      build_and_warmup_s=round(time.perf_counter() - started, 1))
        if (time.perf_counter() - started) + 6 * warm > FULL_SIZE_BUDGET_S:
            report["skipped"] = f"one step takes {warm:.1f} s: the part would exceed {FULL_SIZE_BUDGET_S:.0f} s"
            return report
        uncached = [step(t) for t in timesteps]
        settings = deep_cache.DeepCacheSettings(interval=3, branch=args.branch, start=0)
        with deep_cache.applied(unet, settings) as cache:
            cached = []
            for i, t in enumerate(timesteps):
                cache.step(i, len(timesteps))
                cached.append(step(t))
    full_step, cached_step = statistics.mean(uncached), statistics.mean(cached[1:])
    report.update(full_step_s=round(full_step, 3), cached_step_s=round(cached_step, 3),
                  cached_over_full=round(cached_step / full_step, 3),
                  three_steps_speedup=round(sum(uncached) / sum(cached), 3),
                  twenty_steps_speedup={interval: round(estimated_speedup(cache_settings(args, interval), 20,
                                                                          cached_step / full_step), 3)
                                        for interval in args.intervals})
    return report


def print_report(report: dict) -> None:
    demo = report["demo"]
    print(f"demo model: {demo['steps']} steps {demo['sampler']}, branch {demo['branch']}, start {demo['start']}, "
          f"{demo['per_combo']} image(s) per held-out combination; FLOPs of a cached step / a full one: "
          + ", ".join(f"{k} {v:.3f}" for k, v in demo["flop_ratio_cached_over_full"].items()))
    print(f"{'CFG':>5} {'interval':>9} {'colour':>7} {'bg':>7} {'shape':>7} {'all':>7} {'s/image':>8} "
          f"{'speed-up':>8} {'U-Net s':>8} {'speed-up':>8}  images right vs off (colour/bg/shape)")
    for cfg, entry in demo["cfg"].items():
        base = entry["uncached"]
        print(f"{cfg:>5} {'off':>9} {base['colour']:7.3f} {base['background']:7.3f} {base['shape']:7.3f} "
              f"{base['all']:7.3f} {entry['seconds_uncached']:8.3f} {1.0:8.2f} {entry['unet_seconds_uncached']:8.3f} "
              f"{1.0:8.2f}")
        for key, row in entry.items():
            if key.startswith("interval"):
                print(f"{cfg:>5} {key.split()[1]:>9} {row['colour']:7.3f} {row['background']:7.3f} "
                      f"{row['shape']:7.3f} {row['all']:7.3f} {row['seconds']:8.3f} {row['speedup']:8.2f} "
                      f"{row['unet_seconds']:8.3f} {row['unet_speedup']:8.2f}  "
                      + "/".join(f"{n:+d}" for n in row["images_gained"].values()))
    full = report.get("full_size")
    if full:
        print("full-size SD 1.5-shaped U-Net, 512x512, CFG batch 2:")
        print("  FLOPs of a cached step / a full one: "
              + ", ".join(f"{k} {v:.3f}" for k, v in full["flop_ratio_cached_over_full"].items()))
        if "skipped" in full:
            print(f"  timing skipped: {full['skipped']}")
        else:
            print(f"  {full['dtype']}: full step {full['full_step_s']:.2f} s, "
                  f"cached step {full['cached_step_s']:.2f} s "
                  f"(ratio {full['cached_over_full']:.3f}); 3 steps at interval 3: {full['three_steps_speedup']:.2f}x")
            print(f"  20 steps (estimated from these, start {full['start']}): "
                  + ", ".join(f"interval {k} {v:.2f}x" for k, v in full["twenty_steps_speedup"].items()))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not DEMO.is_file():
        print(f"no demo model at {DEMO}", file=sys.stderr)
        return 2
    report = {"demo": demo_part(args)}
    if args.full_size:
        report["full_size"] = full_size_part(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
