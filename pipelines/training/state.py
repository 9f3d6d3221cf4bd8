"""Training state on disk (atomic checkpoints, the finished autoencoder) and progress logging."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pipelines.core.fileio import atomic_path, write_bytes_atomic
from pipelines.training import models


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path):
    """Our own files: plain tensors, dicts, numbers and strings only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def trained_vae(state_dir: Path, size: str, seed: int):
    """The autoencoder stage 1 finished (``vae_done.pt``), in eval mode."""
    vae = models.build_vae(size, seed)
    vae.load_state_dict(load(Path(state_dir) / "vae_done.pt")["model"])
    return vae.eval()


def write_json(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Log:
    """Log lines to stdout and (appended) to ``<state>/train.log``, with a UTC time stamp."""

    def __init__(self, path: Path | None, quiet: bool = False):
        self.path = Path(path) if path else None
        self.quiet = quiet
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " " + message
        if not self.quiet:
            print(line, file=sys.stdout, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


class Meter:
    """Throughput and ETA over the steps run in this process (not counting resumed ones)."""

    def __init__(self, start_step: int, total_steps: int, batch: int):
        self.start_step, self.total, self.batch = start_step, total_steps, batch
        self.t0 = time.monotonic()

    def line(self, step: int) -> str:
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
        if done <= 0 or elapsed <= 0:
            return "img/s - ETA -"
        rate = done / elapsed
        return f"{rate * self.batch:.1f} img/s ETA {fmt_duration((self.total - step) / rate)}"
