"""Where things live and how the engine runs: built once from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Paths:
    models_dir: Path = REPO_ROOT / "models"
    ckpt_dir: Path | None = None  # default: <models_dir>/Stable-diffusion
    vae_dir: Path | None = None
    lora_dir: Path | None = None
    esrgan_dir: Path | None = None
    embeddings_dir: Path | None = None
    data_dir: Path = REPO_ROOT / "data"  # caches (hashes) and user data
    outdir: Path = REPO_ROOT / "outputs"

    def folder(self, kind: str) -> Path:
        """The folder of a model kind, honouring the per-kind overrides."""
        override = {
            "checkpoints": self.ckpt_dir,
            "vae": self.vae_dir,
            "lora": self.lora_dir,
            "esrgan": self.esrgan_dir,
            "embeddings": self.embeddings_dir,
        }.get(kind)
        if override is not None:
            return Path(override)
        from .registry import MODEL_KINDS

        return Path(self.models_dir) / MODEL_KINDS[kind].folder


@dataclass(frozen=True)
class EngineSettings:
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | full | half | bf16
    no_half_vae: bool = False
    attention: str = "auto"  # auto | xformers | sdpa | sliced
    offload: str = "none"  # none | medvram | lowvram
    default_checkpoint: str | None = None  # --ckpt
    ram_budget_gb: float | None = None  # model cache budget; None = derived from the machine
