"""The launcher's flags: A1111's names, their help, and the checks that need nothing but the
values (torch-free and Ray-free, so `--help` and a bad value answer at once). `webui.cli` turns
them into Paths / EngineSettings / Ray options and launches.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipelines.core.control import DEFAULT_MAX_UNITS
from pipelines.core.jobs import DEFAULT_MAX_WAITING
from pipelines.core.uploads import DEFAULT_MAX_UPLOAD_MB, DEFAULT_MAX_UPLOAD_MEGAPIXELS

POSITIVE_FLAGS = {"max_queue_size": 1, "controlnet_max_units": 1, "max_upload_mb": 0.001,
                  "max_upload_megapixels": 0.001}  # flag -> its smallest value
RAY_DETAIL_FLAGS = ("ray_replicas", "ray_gpus_per_replica", "ray_cpus_per_replica")  # each needs --ray


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Stable Diffusion web UI (A1111-compatible flags and model folders).",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    server.add_argument("--listen", action="store_true",
                        help="listen on 0.0.0.0 so other machines can connect (use with --gradio-auth)")
    server.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    server.add_argument("--api", action="store_true", help="serve the A1111-compatible REST API (/sdapi/v1/...)")
    server.add_argument("--nowebui", action="store_true", help="serve only the REST API, no web UI")
    server.add_argument("--api-auth", metavar="U:P[,U:P]", default=None,
                        help="credentials for the REST API, comma-separated user:password pairs")
    server.add_argument("--gradio-auth", metavar="U:P[,U:P]", default=None,
                        help="credentials for the web UI, comma-separated user:password pairs")
    server.add_argument("--allowed-paths", nargs="*", default=[], metavar="DIR",
                        help="extra folders the web UI may serve files from (besides the outputs folder)")
    server.add_argument("--max-queue-size", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
                        help=f"jobs that may wait, web UI and API together (default {DEFAULT_MAX_WAITING}); "
                             "more are refused with 'Queue full, try again in a moment' (API: 503). "
                             "A hosted demo keeps its own, smaller bound; this can only lower it")
    server.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                        help="largest image file a user may upload, web UI and API "
                             f"(default {DEFAULT_MAX_UPLOAD_MB:g})")
    server.add_argument("--max-upload-megapixels", type=float, default=DEFAULT_MAX_UPLOAD_MEGAPIXELS, metavar="MP",
                        help="largest uploaded image in megapixels, read from its header before decoding "
                             f"(default {DEFAULT_MAX_UPLOAD_MEGAPIXELS:g}, below Pillow's decompression-bomb limit)")
    server.add_argument("--disable-all-extensions", action="store_true",
                        help="load no extension (to start when one misbehaves); the Extensions tab still lists none")
    server.add_argument("--space", action="store_true",
                        help="run as a public hosted demo (on by itself inside a Hugging Face Space): "
                             "listen on 0.0.0.0, limits on steps/size/batch, a bounded queue, no --share, "
                             "no files served outside the outputs, outputs under /data when mounted")

    folders = parser.add_argument_group("folders")
    folders.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                         help="root of the model folders (Stable-diffusion/, VAE/, Lora/, ESRGAN/, embeddings/); "
                              "default: models/ in the repository")
    folders.add_argument("--ckpt-dir", type=Path, default=None, metavar="DIR", help="checkpoint folder")
    folders.add_argument("--unet-dir", type=Path, action="append", default=[], metavar="DIR",
                         help="another folder of denoiser-only files (GGUF, bare SD 3.x / Flux transformers), "
                              "listed with the checkpoints; repeatable. <models-dir>/unet and "
                              "<models-dir>/diffusion_models (ComfyUI's) are always listed")
    folders.add_argument("--vae-dir", type=Path, default=None, metavar="DIR", help="VAE folder")
    folders.add_argument("--lora-dir", type=Path, default=None, metavar="DIR", help="LoRA folder")
    folders.add_argument("--esrgan-models-path", type=Path, default=None, metavar="DIR",
                         help="upscaler model folder (ESRGAN and any architecture spandrel knows)")
    folders.add_argument("--embeddings-dir", type=Path, default=None, metavar="DIR",
                         help="textual inversion embeddings folder")
    folders.add_argument("--gfpgan-models-path", type=Path, default=None, metavar="DIR",
                         help="GFPGAN / RestoreFormer face restorer folder (default: <models-dir>/GFPGAN)")
    folders.add_argument("--codeformer-models-path", type=Path, default=None, metavar="DIR",
                         help="CodeFormer face restorer folder (default: <models-dir>/Codeformer)")
    folders.add_argument("--controlnet-dir", type=Path, default=None, metavar="DIR",
                         help="ControlNet / T2I-Adapter folder (default: <models-dir>/ControlNet; "
                              "ComfyUI's models/controlnet works too)")
    folders.add_argument("--controlnet-annotator-models-path", type=Path, default=None, metavar="DIR",
                         help="weights of the preprocessors that need a network, e.g. depth "
                              "(default: <models-dir>/ControlNet-annotators)")
    folders.add_argument("--controlnet-max-units", type=int, default=DEFAULT_MAX_UNITS, metavar="N",
                         help=f"ControlNet units per request and in the UI (default {DEFAULT_MAX_UNITS})")
    folders.add_argument("--ckpt", default=None, metavar="PATH",
                         help="checkpoint to use by default (a file in the checkpoint folder, or its name)")
    folders.add_argument("--hf-checkpoint", default=os.environ.get("SDUI_HF_CHECKPOINT") or None,
                         metavar="OWNER/REPO/FILE[@REV]",
                         help="download this checkpoint from the Hugging Face Hub into the checkpoint folder at "
                              "start-up (size and sha256 verified; kept for the next start) and use it by default; "
                              "env SDUI_HF_CHECKPOINT; offline, the app starts without it")
    folders.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                         help="folder for caches (hashes) and user data; default: data/ in the repository")
    folders.add_argument("--outdir", type=Path, default=None, metavar="DIR",
                         help="where images are saved; default: outputs/ in the repository")

    compute = parser.add_argument_group("device and precision")
    compute.add_argument("--use-cpu", nargs="+", default=[], metavar="MODULE",
                         help="run on the CPU ('all', or A1111 module names such as 'sd')")
    compute.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                         help="device to run on (default: auto)")
    compute.add_argument("--precision", choices=("auto", "full", "half", "bf16"), default="auto",
                         help="weights/compute precision (default: auto)")
    compute.add_argument("--no-half", action="store_true", help="use full precision (same as --precision full)")
    compute.add_argument("--no-half-vae", action="store_true", help="keep the VAE in full precision")
    compute.add_argument("--attention", choices=("auto", "xformers", "sdpa", "sliced"), default="auto",
                         help="attention backend (default: auto)")
    compute.add_argument("--xformers", action="store_true", help="same as --attention xformers")
    compute.add_argument("--opt-sdp-attention", action="store_true", help="same as --attention sdpa")
    compute.add_argument("--lowvram", action="store_true",
                         help="sequential offload: weights stay in RAM, each layer visits the GPU in turn")
    compute.add_argument("--medvram", action="store_true",
                         help="model offload: text encoder, U-Net and VAE each on the GPU only while it runs")
    compute.add_argument("--compile", action="store_true",
                         help="torch.compile the U-Net (the first image is slower, later steps may be faster)")
    compute.add_argument("--gguf-dequantize-once", action="store_true",
                         help="GGUF denoisers: decode each layer once and keep it at the run dtype (faster steps, "
                              "as much memory as the unquantized model; used only where it fits)")

    ray = parser.add_argument_group(
        "Ray Serve scale-out",
        "Generation, upscaling and model loading run on a Ray Serve cluster; this process stays the "
        "front end (page, API, queue, outputs). Needs `pip install -e \".[ray]\"`. Every node must see "
        "the same model files at the same --models-dir (a shared folder); a replica refuses a file "
        "whose hash differs from the front end's.")
    ray.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="'auto': the cluster this machine belongs to (started with `ray start --head`; "
                          "Ray reads the RAY_ADDRESS environment variable here, as usual); "
                          "'ray://HOST:10001': a remote cluster through Ray Client; 'local': start a cluster "
                          "inside this process (one machine). RAY_ADDRESS alone does not turn Ray on: only "
                          "this flag does")
    ray.add_argument("--ray-replicas", default=None, metavar="MIN:MAX",
                     help="generation replicas (default 1:1); Ray Serve adds replicas up to MAX while jobs "
                          "wait and removes idle ones down to MIN")
    ray.add_argument("--ray-gpus-per-replica", type=float, default=None, metavar="N",
                     help="GPUs each replica reserves; 0.5 puts two replicas on one GPU (default 1, or 0 "
                          "with --use-cpu all / --device cpu, where the replicas run on the CPU)")
    ray.add_argument("--ray-cpus-per-replica", type=float, default=None, metavar="N",
                     help="CPU cores each replica reserves (default 1)")
    return parser


def check_flag_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A value out of range -> the CLI exits with a message naming the flag (parser.error)."""
    for flag, smallest in POSITIVE_FLAGS.items():
        if getattr(args, flag) < smallest:
            parser.error(f"--{flag.replace('_', '-')}: must be positive, got {getattr(args, flag):g}")
    for flag in ("gradio_auth", "api_auth"):
        value = getattr(args, flag)
        if value is not None:
            try:
                parse_auth(value)
            except ValueError as exc:
                parser.error(f"--{flag.replace('_', '-')}: {exc}")
    if args.ray is None:
        for flag in RAY_DETAIL_FLAGS:
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')}: only with --ray ADDRESS (it sizes the Ray replicas)")


def parse_auth(text: str) -> list[tuple[str, str]]:
    """'u1:p1,u2:p2' -> [('u1', 'p1'), ('u2', 'p2')]; the password may contain ':'."""
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise ValueError(f"expected user:password, got {item!r}")
        pairs.append((user, password))
    if not pairs:
        raise ValueError("no user:password pair given")
    return pairs
