"""Every checkpoint family at full size: loaded offline and generating, through the engine.

    python bench/families.py                                  # all eight cases below
    python bench/families.py --cases sd2-768-v sdxl-refiner --size 256 --steps 2
    python bench/families.py --clean                          # delete the written files after each case
    python bench/families.py --cases sd35-medium-gguf-q4 --size 512 --steps 2   # a quantized flow model

The test suite proves each family with tiny widths; this proves the real sizes: SD 1.x,
SD 1.x inpainting, SD 2.x 512 (epsilon) and 768 (v-prediction: the same file again, told by
an A1111-style `.yaml` beside it), SD 2.x inpainting, SDXL base, refiner and inpainting.
Each file is bench/load.py's full-size single file in the original layout with random fp16
weights (written to `bench/.cache/` if missing: 2-7 GB each, about 25 GB for all).
`sd35-medium-gguf-q4` is SD 3.5 medium as split files: city96's GGUF Q4_0 transformer (SAI's
names, random Q4_0 blocks), SD 3's VAE in models/VAE, clip_l and clip_g in models/text_encoder
(no T5: SD 3.5 runs without it), 3.6 GB in all. `flux-schnell-gguf-q4` is Flux.1 schnell the
same way: city96's GGUF Q4_0 transformer (BFL's names, 19 double + 38 single blocks, 3072 wide,
6.3 GB), the 16-channel VAE as ae.safetensors, clip_l, and T5-XXL at full size stored in fp8
(t5xxl_fp8_e4m3fn, 4.4 GB; cast to bf16 as it loads: 8.9 GB of RAM) with a small stand-in T5
tokenizer (the real one is not on this offline machine; only the token ids differ). It needs
about 11 GB of disk and 17 GB of free RAM, and refuses with the numbers when they are not there.

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
import shutil
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
# split-file flow cases: case -> {file in models/: file written to bench/.cache by write_flow_files}
FLOW_CASES = {
    "sd35-medium-gguf-q4": {"Stable-diffusion/sd3.5_medium-Q4_0.gguf": "sd3.5_medium-Q4_0-random.gguf",
                            "VAE/sd3_vae.safetensors": "sd3_vae-random.safetensors",
                            "text_encoder/clip_l.safetensors": "clip_l-random-fp16.safetensors",
                            "text_encoder/clip_g.safetensors": "clip_g-random-fp16.safetensors"},
    "flux-schnell-gguf-q4": {"Stable-diffusion/flux1-schnell-Q4_0.gguf": "flux1-schnell-Q4_0-random.gguf",
                             "VAE/ae.safetensors": "sd3_vae-random.safetensors",  # Flux's VAE has SD 3's shapes
                             "text_encoder/clip_l.safetensors": "clip_l-random-fp16.safetensors",
                             "text_encoder/t5xxl_fp8_e4m3fn.safetensors": "t5xxl-random-fp8.safetensors",
                             "text_encoder/t5_tokenizer": "t5_tokenizer-stand-in"},
}
# what a flow case needs beyond its files: (free disk for the files not yet written, free RAM), bytes
FLOW_BUDGETS = {"sd35-medium-gguf-q4": (4 * load.GB, 6 * load.GB),
                "flux-schnell-gguf-q4": (11 * load.GB, 17 * load.GB)}
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# diffusers' config of BFL's FLUX.1-schnell transformer (no guidance embedder), and Google's T5 v1.1 XXL encoder
FLUX_SCHNELL = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
# CLIP-L and OpenCLIP bigG as SD 3 ships them (with their projections)
CLIPS = {"clip_l": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        projection_dim=768, hidden_act="quick_gelu"),
         "clip_g": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                        projection_dim=1280, hidden_act="gelu")}


def write_random_gguf(path: Path, shapes: dict[str, tuple[int, ...]], arch: str) -> None:
    """A GGUF Q4_0 file of these tensor shapes as city96's files keep them: random 4-bit blocks
    with small scales for the 2-D weights, F16 / F32 random values for the rest. Written one
    tensor at a time, so a 12-billion-weight file needs no more memory than its largest tensor."""
    import gguf
    import numpy as np

    q4 = gguf.GGMLQuantizationType.Q4_0  # 32 weights in 18 bytes: an fp16 scale, 16 bytes of nibbles
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch=arch)

    def quantized(shape) -> bool:
        return len(shape) == 2 and shape[1] % 32 == 0

    for name, shape in shapes.items():
        if quantized(shape):
            writer.add_tensor_info(name, (shape[0], shape[1] // 32 * 18), np.dtype(np.uint8),
                                   shape[0] * shape[1] // 32 * 18, raw_dtype=q4)
        else:
            dtype = np.dtype(np.float16 if len(shape) > 1 else np.float32)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for shape in shapes.values():
        if quantized(shape):
            blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // 32, 18), dtype=np.uint8)
            blocks[:, :2] = rng.uniform(0.001, 0.004, size=len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
            writer.write_tensor_data(blocks.reshape(shape[0], shape[1] // 32 * 18))
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            writer.write_tensor_data(values.astype(np.float16 if len(shape) > 1 else np.float32))
    writer.close()


def tests_helpers():
    """The tests' diffusers -> original-layout name converters, which work at any size."""
    sys.path.insert(0, str(load.ROOT / "tests"))
    import tiny_flux
    import tiny_sd3

    return tiny_sd3, tiny_flux


def write_sd3_gguf(path: Path) -> None:
    """SD 3.5 medium's transformer as a GGUF Q4_0 file in SAI's names."""
    from diffusers import SD3Transformer2DModel

    from pipelines.models.build import empty_modules

    with empty_modules():
        model = SD3Transformer2DModel(**SD35_MEDIUM)
    state = tests_helpers()[0].transformer_to_sai(model.state_dict(), SD35_MEDIUM["num_layers"])
    write_random_gguf(path, {name: tuple(t.shape) for name, t in state.items()}, arch="sd3")


def write_flux_gguf(path: Path) -> None:
    """Flux.1 schnell's transformer as a GGUF Q4_0 file in BFL's names (city96's layout)."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_SCHNELL)
    state = tests_helpers()[1].transformer_to_bfl(model.state_dict(), model.config)
    write_random_gguf(path, {name: tuple(t.shape) for name, t in state.items()}, arch="flux")


def write_t5_fp8(path: Path) -> None:
    """T5 v1.1 XXL's encoder (4.8 billion weights) as ComfyUI's t5xxl_fp8_e4m3fn: matrices random in
    fp8, norms at one in fp16, streamed tensor by tensor into a safetensors file."""
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**T5_XXL))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    kinds = {k: ("F8_E4M3", 1) if len(shape) == 2 else ("F16", 2) for k, shape in shapes.items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = kinds[name][1] * int(torch.Size(shape).numel())
        header[name] = {"dtype": kinds[name][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for name, shape in shapes.items():
            if len(shape) == 2:
                values = (torch.randn(shape, generator=generator) * 0.05).to(torch.float8_e4m3fn)
            else:
                values = torch.ones(shape, dtype=torch.float16)
            values.view(torch.uint8).numpy().tofile(out)


def write_clip(path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **CLIPS[path.name[:6]])
    encoder = CLIPTextModelWithProjection(config).to(torch.float16)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, path)


def write_flow_vae(path: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from pipelines.models.ldm_layout import vae_to_ldm

    vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        use_quant_conv=False, use_post_quant_conv=False)
    save_file({k: v.half().contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}, path)


def write_t5_tokenizer(path: Path) -> None:
    tests_helpers()[0].write_t5_tokenizer(path)


# cached file -> its writer (a file the flow cases share is written once)
FLOW_WRITERS = {"sd3.5_medium-Q4_0-random.gguf": write_sd3_gguf, "flux1-schnell-Q4_0-random.gguf": write_flux_gguf,
                "sd3_vae-random.safetensors": write_flow_vae, "clip_l-random-fp16.safetensors": write_clip,
                "clip_g-random-fp16.safetensors": write_clip, "t5xxl-random-fp8.safetensors": write_t5_fp8,
                "t5_tokenizer-stand-in": write_t5_tokenizer}


def write_flow_files(case: str) -> list[Path]:
    """The case's files in bench/.cache (written if missing), random weights at full size."""
    load.CACHE.mkdir(parents=True, exist_ok=True)
    paths = [load.CACHE / name for name in FLOW_CASES[case].values()]
    for path in paths:
        if path.exists():
            continue
        tmp = path.with_name(path.name + ".part")
        FLOW_WRITERS[path.name](tmp)
        tmp.rename(path)
    return paths


def free_memory() -> int:
    """MemAvailable (bytes): what a new process can take without pushing others out."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def budget_refusal(case: str) -> str | None:
    """Why a flow case cannot run here (too little disk for its missing files, or RAM), or None."""
    disk, ram = FLOW_BUDGETS.get(case, (0, 0))
    missing = [p for p in (load.CACHE / n for n in FLOW_CASES.get(case, {}).values()) if not p.exists()]
    load.CACHE.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(load.CACHE).free
    if missing and free_disk < disk:
        return f"needs {disk / load.GB:.0f} GB of free disk for its files, {free_disk / load.GB:.1f} GB free"
    if free_memory() < ram:
        return f"needs {ram / load.GB:.0f} GB of free RAM, {free_memory() / load.GB:.1f} GB available"
    return None


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

    model, name, yaml_text = CASES.get(case, (None, None, None))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "models" / "Stable-diffusion"
        folder.mkdir(parents=True)
        if case in FLOW_CASES:  # split files: each in its models/ folder
            for where, cached in FLOW_CASES[case].items():
                (root / "models" / where).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(load.CACHE / cached, root / "models" / where)
            name = next(Path(where).name for where in FLOW_CASES[case] if where.startswith("Stable-diffusion/"))
        else:
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
        recommended = details.get("recommended") or {}
        if "cfg_scale" in recommended:  # guidance-distilled (Flux): one pass per step, as it is meant to run
            fields["cfg_scale"] = recommended["cfg_scale"]
        step_times = []
        result = engine.generate(GenerationRequest(**fields),
                                 on_progress=lambda p: step_times.append((p.step, time.perf_counter())))
        t2 = time.perf_counter()
        done = [t for step, t in step_times if step >= 1]  # step 1 ends the first (warm-up) step
        array = np.asarray(result.images[0]).astype(np.float32)
        print(json.dumps({
            "detected": {k: details.get(k) for k in ("family", "inpainting", "prediction", "prediction_source",
                                                     "resolution", "storage")},
            "load_s": t1 - t0, "generate_s": t2 - t1,
            "step_s": (done[-1] - done[0]) / (len(done) - 1) if len(done) > 1 else None,
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


def case_paths(case: str) -> list[Path]:
    """The cached files a case reads (some shared between cases)."""
    if case in FLOW_CASES:
        return [load.CACHE / name for name in FLOW_CASES[case].values()]
    return [load.CACHE / load.MODELS[CASES[case][0]]["file"]]


def step_text(result: dict) -> str:
    return f" ({result['step_s']:.1f} s/step)" if result.get("step_s") else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=[*CASES, *FLOW_CASES])
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
        model = CASES.get(case, (None,))[0]
        refusal = budget_refusal(case) if case in FLOW_CASES else None
        if refusal:
            failed.append(case)
            print(f"  {case:16} REFUSED: {refusal}", flush=True)
            continue
        paths = write_flow_files(case) if case in FLOW_CASES else [load.write_checkpoint(model)]
        result = run_case(case, args.size, args.steps)
        if "error" in result:
            failed.append(case)
            print(f"  {case:16} FAILED: {result['error']}", flush=True)
        else:
            d = result["detected"]
            storage = f" {d['storage']}" if d.get("storage") else ""
            size = sum(p.stat().st_size for p in paths) / load.GB
            print(f"  {case:16} {size:4.1f} GB  detected {d['family']}{storage}, {d['prediction']} "
                  f"({d['prediction_source']}), {d['resolution']} px   load {result['load_s']:5.1f}s  "
                  f"generate {result['generate_s']:5.1f}s{step_text(result)}  "
                  f"peak RSS {result['peak_rss'] / load.GB:4.1f} GB  "
                  f"image {result['size'][0]}x{result['size'][1]} finite={result['finite']} std={result['std']:.1f}",
                  flush=True)
        if args.clean:
            needed_later = {p for later in args.cases[i + 1:] for p in case_paths(later)}
            for path in set(paths) - needed_later:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    print(f"{len(args.cases) - len(failed)} of {len(args.cases)} cases loaded and generated"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
