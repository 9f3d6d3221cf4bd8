"""Checkpoint load benchmark: our loader vs diffusers' `from_single_file`, same files, same configs.

    python bench/load.py                 # SD 1.5 and SDXL, fp16, cold and warm page cache
    python bench/load.py --models sd15 --dtypes fp16 fp32 --repeat 2
    python bench/load.py --generate      # also generate one small image from each (smoke test)

Writes full-size SD 1.5 (~2.1 GB) and SDXL (~6.9 GB) single-file checkpoints with random fp16
weights in the original layout to `bench/.cache/` (git-ignored) if they are missing, plus the
diffusers config folders both loaders are given (diffusers reads them; ours needs none). Each
measurement runs in a fresh interpreter so peak RSS is the load's own:

- load: seconds from the call to the returned modules;
- +touch: load plus reading every weight once (our weights can be lazy views of the file, so
  this is the fair "ready to run" time; diffusers' are already in RAM);
- peak: the process's peak RSS (imports included) and the peak over the RSS after imports,
  each divided by the file size.

"Cold" evicts the file from the page cache first (posix_fadvise DONTNEED, no root needed);
"warm" reads it once before. Ratios are ours / diffusers'. Targets (issue 3): load time
<= 0.25x diffusers', peak RSS <= 1.2x the file size. Nothing is asserted: the numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT))

from pipelines.models import export, families  # noqa: E402  (light: no torch model code at import)

GB = 1 << 30

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
OPEN_CLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=1024, pad_token_id=0)
CLIP_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280, pad_token_id=0)
SD2_UNET = dict(SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)
SD_VAE = dict(VAE, sample_size=512, scaling_factor=0.18215)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# text encoders: (component, tokenizer, config, pad token, with projection, single-file prefix, layout)
SD1_TE = [("text_encoder", "tokenizer", CLIP_L, "<|endoftext|>", False, families.CLIP_PREFIX, "hf_clip")]
SD2_TE = [("text_encoder", "tokenizer", OPEN_CLIP_H, "!", False, families.OPEN_CLIP_PREFIX, "open_clip")]
SDXL_TE = [("text_encoder", "tokenizer", CLIP_L, "<|endoftext|>", False, families.SDXL_CLIP_L_PREFIX, "hf_clip"),
           ("text_encoder_2", "tokenizer_2", CLIP_G, "!", True, families.SDXL_CLIP_G_PREFIX, "open_clip")]
REFINER_TE = [("text_encoder_2", "tokenizer_2", CLIP_G, "!", True, families.REFINER_CLIP_G_PREFIX, "open_clip")]

# "pipeline": the diffusers class from_single_file is compared with (load timing); the other
# families are written for bench/families.py (every family loads offline and generates).
MODELS = {
    "sd15": dict(file="sd15-random-fp16.safetensors", pipeline="StableDiffusionPipeline",
                 unet=SD15_UNET, vae=SD_VAE, encoders=SD1_TE),
    "sdxl": dict(file="sdxl-random-fp16.safetensors", pipeline="StableDiffusionXLPipeline",
                 unet=SDXL_UNET, vae=SDXL_VAE, encoders=SDXL_TE),
    "sd15-inpainting": dict(file="sd15-inpainting-random-fp16.safetensors", unet=dict(SD15_UNET, in_channels=9),
                            vae=SD_VAE, encoders=SD1_TE),
    "sd2": dict(file="sd2-random-fp16.safetensors", unet=SD2_UNET, vae=SD_VAE, encoders=SD2_TE),
    "sd2-inpainting": dict(file="sd2-inpainting-random-fp16.safetensors", unet=dict(SD2_UNET, in_channels=9),
                           vae=SD_VAE, encoders=SD2_TE),
    "sdxl-refiner": dict(file="sdxl-refiner-random-fp16.safetensors", unet=REFINER_UNET, vae=SDXL_VAE,
                         encoders=REFINER_TE),
    "sdxl-inpainting": dict(file="sdxl-inpainting-random-fp16.safetensors", unet=dict(SDXL_UNET, in_channels=9),
                            vae=SDXL_VAE, encoders=SDXL_TE),
}
COMPARED = [name for name, spec in MODELS.items() if "pipeline" in spec]


# --- writing the files ---------------------------------------------------------------------------

def _meta_models(spec):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        encoders = [(CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**cfg))
                    for _, _, cfg, _, proj, _, _ in spec["encoders"]]
    return unet, vae, encoders


def write_config_folder(name: str) -> Path:
    """The diffusers config folder of a model (configs, tokenizer, scheduler; no weights)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from pipelines.models.clip_tokenizer import TOKENIZER_DIR
    from pipelines.models.families import SD_SCHEDULE

    folder = CACHE / f"{name}-config"
    if (folder / "model_index.json").is_file():
        return folder
    spec = MODELS[name]
    unet, vae, encoders = _meta_models(spec)
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    index = {"_class_name": spec["pipeline"], "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for (te, tok, _, pad, proj, _, _), encoder in zip(spec["encoders"], encoders):
        encoder.config.save_pretrained(folder / te)
        CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad).save_pretrained(folder / tok)
        index[te] = ["transformers", "CLIPTextModelWithProjection" if proj else "CLIPTextModel"]
        index[tok] = ["transformers", "CLIPTokenizer"]
    if name == "sd15":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)
    scheduler = {k: v for k, v in SD_SCHEDULE.items() if k not in ("clip_sample", "set_alpha_to_one")}
    EulerDiscreteScheduler(**scheduler).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_checkpoint(name: str) -> Path:
    """Stream a full-size single file with random fp16 weights (never the whole model in RAM)."""
    import torch

    path = CACHE / MODELS[name]["file"]
    if path.is_file():
        return path
    spec = MODELS[name]
    unet, vae, encoders = _meta_models(spec)
    layout = [(prefix, kind, encoder) for (*_, prefix, kind), encoder in zip(spec["encoders"], encoders)]
    meta_state = export.single_file_state_dict(unet, vae, layout)
    header, offset, order = {}, 0, sorted(meta_state)
    for key in order:
        t = meta_state[key]
        dtype = "I64" if not t.is_floating_point() else "F16"
        nbytes = t.numel() * (8 if dtype == "I64" else 2)
        header[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"modelspec.title": f"random {name}", "format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(0)
    tmp = path.with_suffix(".tmp")
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"writing {path.name} ({offset / GB:.2f} GB of random weights)...", flush=True)
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key in order:
            t = meta_state[key]
            if not t.is_floating_point():
                data = torch.arange(t.shape[-1], dtype=torch.int64).expand(t.shape).contiguous()
            elif "norm" in key or ".ln_" in key or key.endswith(("ln_final.weight",)):
                data = torch.ones(t.shape, dtype=torch.float16) if key.endswith("weight") else \
                    torch.zeros(t.shape, dtype=torch.float16)
            else:
                data = (torch.randn(t.shape, generator=generator) * 0.02).to(torch.float16)
            f.write(data.numpy().tobytes())
    os.replace(tmp, path)
    return path


# --- measuring -----------------------------------------------------------------------------------

def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child(which: str, name: str, dtype_name: str) -> None:
    import torch

    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    path = CACHE / MODELS[name]["file"]
    config = CACHE / f"{name}-config"
    # Each side imports what it needs before the clock starts (an app imports once, at
    # start-up); only the loading is timed. Ours needs no pipeline classes.
    import accelerate  # noqa: F401
    import diffusers
    import diffusers.loaders.single_file_utils  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    if which == "ours":
        from pipelines.models.build import load_components
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401

    base = rss()
    t0 = time.perf_counter()
    if which == "ours":
        loaded = load_components(path, dtype=dtype)
        modules = list(loaded.modules())
    else:
        cls = getattr(diffusers, MODELS[name]["pipeline"])
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=dtype)
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    t1 = time.perf_counter()
    checksum = 0.0
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                flat = p.reshape(-1)
                checksum += float(flat[:: max(1, 4096 // p.element_size())].float().sum())  # one read per page
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for m in modules for p in m.parameters())
    print(json.dumps({"load_s": t1 - t0, "touch_s": t2 - t0, "base_rss": base, "end_rss": rss(),
                      "peak_rss": peak, "params": params, "checksum": checksum}))


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def cached_fraction(path: Path) -> float | None:
    """How much of the file is in the page cache (mincore), or None where it cannot be told."""
    try:
        import ctypes
        import mmap

        size = path.stat().st_size
        libc = ctypes.CDLL(None, use_errno=True)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # mapping faults nothing in
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mm)
        ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
        del anchor
        mm.close()
        return sum(v & 1 for v in vec) / pages if ok else None
    except Exception:
        return None


def measure(which: str, name: str, dtype: str, cold: bool) -> dict:
    path = CACHE / MODELS[name]["file"]
    if cold:
        evict(path)
    else:
        warm(path)
    cached = cached_fraction(path)
    out = subprocess.run([sys.executable, __file__, "--child", which, name, dtype], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cached_before"] = cached
    return result


def generate_smoke(name: str) -> str:
    """One 256x256, 2-step image through the engine from the full-size random file."""
    import shutil
    import tempfile

    import numpy as np

    from pipelines.core.request import GenerationRequest
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models" / "Stable-diffusion"
        models.mkdir(parents=True)
        os.symlink(CACHE / MODELS[name]["file"], models / MODELS[name]["file"])
        engine = Engine(Paths(models_dir=Path(tmp) / "models", data_dir=Path(tmp) / "data",
                              outdir=Path(tmp) / "out"), EngineSettings(device="cpu", precision="bf16"))
        t = time.perf_counter()
        result = engine.generate(GenerationRequest(prompt="a cat", steps=2, width=256, height=256, seed=1,
                                                   sampler="Euler", save_images=False,
                                                   checkpoint=MODELS[name]["file"]))
        array = np.asarray(result.images[0])
        shutil.rmtree(Path(tmp) / "data", ignore_errors=True)
        return f"{name}: 256x256 2 steps in {time.perf_counter() - t:.1f}s, finite={np.isfinite(array).all()}, " \
               f"std={array.std():.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=COMPARED, choices=COMPARED)
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=["fp16", "fp32", "bf16"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; files in {CACHE}", flush=True)
    for name in args.models:
        path = write_checkpoint(name)
        write_config_folder(name)
        size = path.stat().st_size
        print(f"\n== {name}: {path.name}, {size / GB:.2f} GB", flush=True)
        for dtype in args.dtypes:
            for cache in ("cold", "warm"):
                rows = {}
                for which in ("diffusers", "ours"):
                    runs = [measure(which, name, dtype, cache == "cold") for _ in range(args.repeat)]
                    good = [r for r in runs if "error" not in r]
                    if not good:
                        print(f"  {dtype} {cache} {which}: FAILED {runs[0]['error']}", flush=True)
                        continue
                    best = min(good, key=lambda r: r["load_s"])
                    rows[which] = best
                    print(f"  {dtype} {cache:4} {which:9} load {best['load_s']:6.2f}s  +touch {best['touch_s']:6.2f}s  "
                          f"peak RSS {best['peak_rss'] / GB:5.2f} GB ({best['peak_rss'] / size:.2f}x file, "
                          f"{(best['peak_rss'] - best['base_rss']) / size:.2f}x over imports)  "
                          f"page cache before: {best['cached_before'] if best['cached_before'] is None else round(best['cached_before'], 2)}",
                          flush=True)
                if len(rows) == 2:
                    ours, theirs = rows["ours"], rows["diffusers"]
                    print(f"  {dtype} {cache:4} RATIO load {ours['load_s'] / theirs['load_s']:.3f}x  "
                          f"+touch {ours['touch_s'] / theirs['touch_s']:.3f}x  (target <= 0.25)   "
                          f"peak RSS / file: ours {ours['peak_rss'] / size:.2f}x, diffusers "
                          f"{theirs['peak_rss'] / size:.2f}x  (target <= 1.2)", flush=True)
                    if abs(ours["checksum"] - theirs["checksum"]) > 1e-3 * max(1.0, abs(theirs["checksum"])):
                        print(f"  note: weight checksums differ (ours {ours['checksum']:.4f}, "
                              f"diffusers {theirs['checksum']:.4f})", flush=True)
        if args.generate:
            print("  " + generate_smoke(name), flush=True)


if __name__ == "__main__":
    main()
