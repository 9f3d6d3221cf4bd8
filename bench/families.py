"""Every checkpoint family at full size: loaded offline and generating, through the engine.

    python bench/families.py                                  # all eight cases below
    python bench/families.py --cases sd2-768-v sdxl-refiner --size 256 --steps 2
    python bench/families.py --clean                          # delete the written files after each case

The test suite proves each family with tiny widths; this proves the real sizes: SD 1.x,
SD 1.x inpainting, SD 2.x 512 (epsilon) and 768 (v-prediction: the same file again, told by
an A1111-style `.yaml` beside it), SD 2.x inpainting, SDXL base, refiner and inpainting.
Each file is bench/load.py's full-size single file in the original layout with random fp16
weights (written to `bench/.cache/` if missing: 2-7 GB each, about 25 GB for all).

Each case runs in a fresh interpreter with the network blocked (HF_HUB_OFFLINE=1 and a socket
guard that fails any connection) and goes through `Engine` as the UI and API call it: the
listing's detection, `load_checkpoint`, then one txt2img image (inpainting models: an inpaint
with a mask over the right half). Printed per case: what was detected, load and generation
seconds, peak RSS, and whether the image is finite and not flat. Random weights make noise,
not pictures; what is checked is that every component loads and runs at its real shape.
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

import load  # noqa: E402  (bench/load.py: the full-size layouts and the writer)

# case -> (bench/load.py model, name in models/Stable-diffusion, yaml text beside it or None)
V_YAML = "model:\n  params:\n    parameterization: \"v\"\n"
CASES = {
    "sd15": ("sd15", "sd15.safetensors", None),
    "sd15-inpainting": ("sd15-inpainting", "sd15-inpainting.safetensors", None),
    "sd2-512": ("sd2", "sd2-512-base.safetensors", None),
    "sd2-768-v": ("sd2", "sd2-768-v.safetensors", V_YAML),
    "sd2-inpainting": ("sd2-inpainting", "sd2-inpainting.safetensors", None),
    "sdxl": ("sdxl", "sdxl-base.safetensors", None),
    "sdxl-refiner": ("sdxl-refiner", "sdxl-refiner.safetensors", None),
    "sdxl-inpainting": ("sdxl-inpainting", "sdxl-inpainting.safetensors", None),
}


def block_network() -> None:
    import socket

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("bench/families.py: the network is blocked")

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    socket.socket.connect = refuse
    socket.create_connection = refuse


def child(case: str, size: int, steps: int) -> None:
    block_network()
    import numpy as np
    from PIL import Image

    from pipelines.core.request import GenerationRequest
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    model, name, yaml_text = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "models" / "Stable-diffusion"
        folder.mkdir(parents=True)
        os.symlink(load.CACHE / load.MODELS[model]["file"], folder / name)
        if yaml_text:
            (folder / name).with_suffix(".yaml").write_text(yaml_text)
        engine = Engine(Paths(models_dir=root / "models", data_dir=root / "data", outdir=root / "out"),
                        EngineSettings(device="cpu", precision="bf16"))
        details = engine.resolve_checkpoint(name).details
        t0 = time.perf_counter()
        engine.load_checkpoint(name)
        t1 = time.perf_counter()
        fields = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=steps, width=size,
                      height=size, seed=1, sampler="Euler", save_images=False, checkpoint=name)
        if details.get("inpainting"):
            mask = Image.new("L", (size, size), 0)
            mask.paste(255, (size // 2, 0, size, size))
            fields.update(mode="img2img", init_image=Image.new("RGB", (size, size), (90, 120, 200)), mask=mask,
                          denoising_strength=1.0)
        result = engine.generate(GenerationRequest(**fields))
        t2 = time.perf_counter()
        array = np.asarray(result.images[0]).astype(np.float32)
        print(json.dumps({
            "detected": {k: details.get(k) for k in ("family", "inpainting", "prediction", "prediction_source",
                                                     "resolution")},
            "load_s": t1 - t0, "generate_s": t2 - t1,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "finite": bool(np.isfinite(array).all()), "std": float(array.std()),
            "size": list(result.images[0].size),
        }))


def run_case(case: str, size: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", case, str(size), str(steps)], capture_output=True,
                         text=True, cwd=load.ROOT)
    if out.returncode != 0:
        return {"error": ((out.stderr or out.stdout).strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--size", type=int, default=256, help="image width and height (default 256)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--clean", action="store_true", help="delete each written file once no case needs it")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return 0
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {args.size}x{args.size}, {args.steps} Euler "
          f"steps, bf16, network blocked; files in {load.CACHE}", flush=True)
    failed = []
    for i, case in enumerate(args.cases):
        model = CASES[case][0]
        path = load.write_checkpoint(model)
        result = run_case(case, args.size, args.steps)
        if "error" in result:
            failed.append(case)
            print(f"  {case:16} FAILED: {result['error']}", flush=True)
        else:
            d = result["detected"]
            print(f"  {case:16} {path.stat().st_size / load.GB:4.1f} GB  detected {d['family']}, "
                  f"{d['prediction']} ({d['prediction_source']}), {d['resolution']} px   load {result['load_s']:5.1f}s  "
                  f"generate {result['generate_s']:5.1f}s  peak RSS {result['peak_rss'] / load.GB:4.1f} GB  "
                  f"image {result['size'][0]}x{result['size'][1]} finite={result['finite']} std={result['std']:.1f}",
                  flush=True)
        if args.clean and all(CASES[later][0] != model for later in args.cases[i + 1:]):
            path.unlink(missing_ok=True)
    print(f"{len(args.cases) - len(failed)} of {len(args.cases)} cases loaded and generated"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
