"""Hosted mode (a public Hugging Face Space): detection, persistent storage, ZeroGPU detection.

A Space runs `python launch.py` with no arguments and sets `SPACE_ID` (and `SYSTEM=spaces`)
in the environment; `--space` turns the same mode on anywhere, for trying it locally.

In hosted mode (`EngineSettings.hosted`) the engine holds every job to the limits of
`pipelines.core.hosted_limits` for its hardware (a free CPU Space gets small ones, a GPU Space
roomier ones). Nothing here imports torch or gradio.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pipelines.core.settings import REPO_ROOT

# Set by Hugging Face on every Space (https://huggingface.co/docs/hub/spaces-overview#helper-environment-variables)
SPACE_ENV = ("SPACE_ID", "SYSTEM")
PERSISTENT_ROOT = Path("/data")  # a Space's persistent storage, mounted when the owner adds it


def running_on_space(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Hugging Face Space: SPACE_ID is set, or SYSTEM=spaces."""
    env = os.environ if environ is None else environ
    return bool(env.get("SPACE_ID")) or env.get("SYSTEM") == "spaces"


def space_id(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("SPACE_ID") or None


def persistent_root(root: Path | None = None) -> Path | None:
    """The Space's persistent storage (/data) when it is mounted and writable, else None."""
    root = Path(root or PERSISTENT_ROOT)
    if root.is_dir() and os.access(root, os.W_OK | os.X_OK):
        return root
    return None


def space_paths(args: Any, root: Path | None = None) -> tuple[Path, Path]:
    """(outdir, data_dir) for a Space: --outdir/--data-dir first, then the persistent storage
    (/data) when mounted, then the repository's outputs/ and data/ as without a Space."""
    storage = persistent_root(root)
    outdir = args.outdir or (storage / "outputs" if storage else REPO_ROOT / "outputs")
    data_dir = args.data_dir or (storage / "sdui" if storage else REPO_ROOT / "data")
    return Path(outdir), Path(data_dir)


def on_zero_gpu(environ: Mapping[str, str] | None = None) -> bool:
    """A ZeroGPU Space (the GPU is lent per call to `spaces.GPU` functions)."""
    env = os.environ if environ is None else environ
    return env.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
