"""python -m pipelines.training --out pipelines/demo/demo-shapes.safetensors

Runs (or resumes) every stage of the demo model's training: autoencoder, latent data set,
U-Net + text encoder, export. State lives in ``--state`` (default ``data/training/demo``,
git-ignored); running the same command again continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from pipelines.training import export, train
from pipelines.training.state import Log, fmt_duration, write_json

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipelines.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write at the end")
    p.add_argument("--state", type=Path, default=REPO_ROOT / "data" / "training" / "demo",
                   help="folder for checkpoints, cached latents and train.log (default: data/training/demo)")
    p.add_argument("--preset", choices=sorted(train.PRESETS), default="demo",
                   help="demo: the shipped model (about 3 h on 2 cores); tiny: seconds, for tests")
    p.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; results depend on it, so a run keeps its count)")
    p.add_argument("--stop-after", choices=("vae", "latents", "ldm", "export"), default="export",
                   help="stop after this stage (resume later with the same command)")
    p.add_argument("--ldm-steps", type=int, default=None, help="override the U-Net stage's step count")
    p.add_argument("--quiet", action="store_true", help="log to <state>/train.log only")
    return p.parse_args(argv)


def settings_for(args) -> train.Settings:
    s = dataclasses.replace(train.PRESETS[args.preset])
    if args.seed is not None:
        s.seed = args.seed
    if args.ldm_steps is not None:
        s.ldm_steps = args.ldm_steps
    return s


def check_config(state: Path, settings: train.Settings, threads: int) -> None:
    """A state folder belongs to one configuration: resuming with another would mix runs."""
    path = state / "config.json"
    mine = {"settings": json.loads(json.dumps(settings.result_dict())), "threads": threads}
    if path.exists():
        theirs = json.loads(path.read_text())
        # the U-Net step count may be raised to train longer; everything else must match
        # (a setting newer than the stored run is compared only if the run recorded it)
        stored = theirs.get("settings", {})
        a = {k: v for k, v in mine["settings"].items() if k != "ldm_steps" and k in stored}
        b = {k: v for k, v in stored.items() if k != "ldm_steps"}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise SystemExit(f"{state} holds a run with other settings ({', '.join(diff)}); "
                             f"use another --state or delete that folder")
        if theirs.get("threads") != threads:
            print(f"warning: this run used --threads {theirs.get('threads')}; continuing with {threads} "
                  "(the continuation is no longer bit-identical)", file=sys.stderr)
    write_json(path, mine)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    settings = settings_for(args)
    state = args.state
    state.mkdir(parents=True, exist_ok=True)
    check_config(state, settings, args.threads)
    log = Log(state / "train.log", quiet=args.quiet)
    t0 = time.monotonic()
    log(f"training preset {args.preset!r} seed {settings.seed} in {state} (threads {args.threads})")

    train.train_vae(state, settings, log)
    if args.stop_after == "vae":
        return 0
    train.encode_dataset(state, settings, log)
    if args.stop_after == "latents":
        return 0
    train.train_ldm(state, settings, log)
    if args.stop_after == "ldm":
        return 0

    unet, vae, text = export.build_modules(state, settings.size, settings.seed)
    scores = None
    if args.preset != "tiny":
        log("[export] scoring the EMA model on the held-out combinations (2 images each)")
        scores = train.evaluate_ldm(unet, text, vae, per_triple=2)
        log(f"[export] held-out: colour {scores['colour']:.3f} background {scores['background']:.3f} "
            f"shape {scores['shape']:.3f} all {scores['all']:.3f}")
    # what reproduces this file: the options that change the result (not --state, --quiet)
    command = export.COMMAND if args.preset == "demo" else f"python -m pipelines.training --out {args.out}"
    for flag, value, default in (("--preset", args.preset, "demo"), ("--seed", settings.seed, 0),
                                 ("--ldm-steps", settings.ldm_steps, train.PRESETS[args.preset].ldm_steps),
                                 ("--threads", args.threads, 1)):
        if value != default:
            command += f" {flag} {value}"
    meta = export.metadata(settings.result_dict(), scores, command)
    path = export.write(args.out, unet, vae, text, meta)
    log(f"[export] wrote {path} ({path.stat().st_size / 2**20:.1f} MB) after {fmt_duration(time.monotonic() - t0)} "
        "in this process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
