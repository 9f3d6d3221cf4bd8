"""Tiled neural upscaling: time and peak memory per tile size against one untiled pass.

    python bench/upscale.py                 # 4x of 512x512, full-size RealESRGAN_x4plus, random weights
    python bench/upscale.py --size 256 --tiles 128 256 --blocks 6   # quicker

The model is the RealESRGAN_x4plus architecture (spandrel's RRDBNet: 64 filters, 23 blocks,
4x) with random weights, saved to a temporary .pth and loaded through the app's own loader
(`pipelines.generate.upscalers`, weights_only). Each configuration runs in a fresh subprocess so its
peak RSS is its own. The baseline is plain spandrel (`descriptor(tensor)` on the whole image);
the "ratio" column is time / baseline time. Timings are printed, never asserted.
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

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.generate import upscalers

    torch.set_num_threads(args.threads)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    models = upscalers.UpscalerModels("cpu")
    model = models.get(Path(args.model))
    before = rss_mib()
    started = time.perf_counter()
    if args.tile == "plain":  # plain spandrel, the whole image at once
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.inference_mode():
            out = model(tensor)
        size = tuple(out.shape[-2:][::-1])
    else:
        tiles = []
        upscaler = upscalers.ModelUpscaler("bench", Path(args.model), 4, models).with_options(
            upscalers.TileOptions(tile=int(args.tile), overlap=args.overlap, on_tile=tiles.append))
        with torch.inference_mode():
            out = upscaler.upscale(image, 4)
        size = out.size
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tile": args.tile, "seconds": seconds, "peak_rss_mib": peak,
                      "rss_before_mib": before, "size": list(size),
                      "tiles": len(tiles) if args.tile != "plain" else 1}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tiles", nargs="*", default=["128", "256", "512", "0"],
                        help="tile sizes; 0 = the app's untiled path")
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=23, help="RRDB blocks (23 = RealESRGAN_x4plus)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain spandrel baseline")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tile", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

    torch.manual_seed(0)
    net = RRDBNet(in_nc=3, out_nc=3, num_filters=64, num_blocks=args.blocks, scale=4)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "RealESRGAN_x4plus-random.pth"
        torch.save(net.state_dict(), model)
        params = sum(p.numel() for p in net.parameters())
        del net
        print(f"# {args.size}x{args.size} -> 4x, RRDBNet 64f/{args.blocks}b ({params / 1e6:.1f} M params), "
              f"overlap {args.overlap}, {args.threads} threads, torch {torch.__version__}")
        configs = ([] if args.no_plain else ["plain"]) + list(args.tiles)
        rows = []
        for tile in configs:
            cmd = [sys.executable, __file__, "--child", "--tile", tile, "--model", str(model),
                   "--size", str(args.size), "--overlap", str(args.overlap), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"tile {tile}: failed\n{done.stderr[-2000:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  ran {tile}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB "
                  f"({row['tiles']} tiles)", flush=True)
    base = next((r["seconds"] for r in rows if r["tile"] == "plain"), None)
    print(f"{'tile':>10} {'tiles':>5} {'seconds':>8} {'ratio':>6} {'peak RSS MiB':>12} {'model RSS MiB':>13}  output")
    for r in rows:
        label = {"plain": "spandrel", "0": "untiled"}.get(r["tile"], r["tile"])
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        print(f"{label:>10} {r['tiles']:>5} {r['seconds']:>8.1f} {ratio:>6} {r['peak_rss_mib']:>12.0f} "
              f"{r['rss_before_mib']:>13.0f}  {r['size'][0]}x{r['size'][1]}")


if __name__ == "__main__":
    main()
