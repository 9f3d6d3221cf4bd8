"""Quality of the demo checkpoint on the held-out colour/shape/background combinations.

    python bench/demo_quality.py                          # pipelines/demo/demo-shapes.safetensors
    python bench/demo_quality.py --checkpoint path.safetensors --cfg 5 6 7 --per-combo 4
    python bench/demo_quality.py --gate                   # exit status 1 below the targets
    python bench/demo_quality.py --grid grid.png          # also save the images as a grid

Generates, through the project's engine (loader, prompt encoding, sampler table, runner, the
same path the UI takes), one 64x64 image per held-out combination and seed with the prompt
"a <colour> <shape> on a <background> background" (none of these combinations was in the
training data), and scores each with the data set's own judge (`pipelines.training.data.judge`:
background = median of the border; object colour = median of the pixels far from it; shape from
the mask's bounding-box fill and how it narrows towards the top). Training combinations are
scored too (`--seen N`), for comparison.

Targets (issue 8): colour >= 0.90, background >= 0.90, shape >= 0.70 on held-out combinations
at 20 steps and CFG 5-7; one image at native size and 20 steps in under 2 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {"colour": 0.90, "background": 0.90, "shape": 0.70}
DEFAULT_CHECKPOINT = ROOT / "pipelines" / "demo" / "demo-shapes.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--cfg", type=float, nargs="+", default=[5.0, 6.0, 7.0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--per-combo", type=int, default=2, help="images (seeds) per combination")
    p.add_argument("--seen", type=int, default=12, help="also score this many training combinations")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--gate", action="store_true", help="exit 1 unless every CFG meets the targets")
    p.add_argument("--grid", type=Path, default=None, help="save the held-out images as a PNG grid")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.core.request import GenerationRequest
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine
    from pipelines.training import data

    ckpt = args.checkpoint.resolve()
    if not ckpt.is_file():
        print(f"no checkpoint at {ckpt}; train one with: python -m pipelines.training --out {ckpt}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="demo-quality-"))
    engine = Engine(Paths(models_dir=tmp / "models", ckpt_dir=ckpt.parent, data_dir=tmp / "data", outdir=tmp / "out"),
                    EngineSettings(device="cpu"))
    engine.load_checkpoint(ckpt.name)

    def generate(colour, shape, background, cfg, seed):
        request = GenerationRequest(prompt=data.simple_caption(colour, shape, background), negative_prompt="",
                                    steps=args.steps, cfg_scale=cfg, sampler=args.sampler, width=64, height=64,
                                    seed=seed, batch_size=args.per_combo, save_images=False, checkpoint=ckpt.name)
        return engine.generate(request).images

    # warm-up, then the time of one image at native size
    generate("red", "circle", "blue", args.cfg[0], 0)
    t0 = time.perf_counter()
    one = GenerationRequest(prompt="a red circle on a blue background", steps=args.steps, cfg_scale=args.cfg[0],
                            sampler=args.sampler, width=64, height=64, seed=1, save_images=False,
                            checkpoint=ckpt.name)
    engine.generate(one)
    seconds_per_image = time.perf_counter() - t0

    seen = [t for i, t in enumerate(data.TRAIN_TRIPLES) if i % max(1, len(data.TRAIN_TRIPLES) // max(1, args.seen)) == 0]
    seen = seen[: args.seen]
    report = {"checkpoint": str(ckpt), "steps": args.steps, "sampler": args.sampler, "per_combo": args.per_combo,
              "held_out_combos": len(data.HELD_OUT), "seconds_per_image": round(seconds_per_image, 3), "cfg": {}}
    grid_rows = []
    for cfg in args.cfg:
        entry = {}
        for name, triples in (("held_out", data.HELD_OUT), ("seen", seen)):
            images, expected = [], []
            for k, (c, s, b) in enumerate(triples):
                out = generate(c, s, b, cfg, 1000 + 10 * k)
                images += out
                expected += [(c, s, b)] * len(out)
            entry[name] = {k: round(v, 4) for k, v in data.score(images, expected).items()}
            if name == "held_out" and args.grid is not None:
                grid_rows.append(images)
        entry["passes"] = all(entry["held_out"][k] >= v for k, v in TARGETS.items())
        report["cfg"][str(cfg)] = entry
    report["passes"] = all(e["passes"] for e in report["cfg"].values())

    if args.grid is not None:
        from PIL import Image

        cols = max(len(r) for r in grid_rows)
        grid = Image.new("RGB", (64 * cols, 64 * len(grid_rows)), (128, 128, 128))
        for y, row in enumerate(grid_rows):
            for x, image in enumerate(row):
                grid.paste(image, (64 * x, 64 * y))
        grid.save(args.grid)

    if args.json:
        print(json.dumps(report))
    else:
        print(f"{ckpt.name}: {args.steps} steps {args.sampler}, {args.per_combo} image(s) per combination, "
              f"{len(data.HELD_OUT)} held-out combinations; one image {seconds_per_image:.2f} s (target < 2 s)")
        print(f"{'CFG':>5} {'set':>9} {'colour':>7} {'bg':>7} {'shape':>7} {'all':>7}")
        for cfg, e in report["cfg"].items():
            for name in ("held_out", "seen"):
                r = e[name]
                print(f"{cfg:>5} {name:>9} {r['colour']:7.3f} {r['background']:7.3f} {r['shape']:7.3f} {r['all']:7.3f}")
        print(f"targets on held-out: colour >= {TARGETS['colour']}, background >= {TARGETS['background']}, "
              f"shape >= {TARGETS['shape']}: {'PASS' if report['passes'] else 'FAIL'}")
    return 0 if (report["passes"] or not args.gate) else 1


if __name__ == "__main__":
    sys.exit(main())
