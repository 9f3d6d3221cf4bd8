"""Device, dtype and attention backend: chosen here, once, from the settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import EngineSettings


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # U-Net and text encoder
    vae_dtype: torch.dtype
    attention: str  # "xformers" | "sdpa" | "sliced"

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "vae dtype": str(self.vae_dtype).replace("torch.", ""),
            "attention": self.attention,
        }


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(requested)


def choose_dtype(device: torch.device, precision: str) -> torch.dtype:
    if precision == "full":
        return torch.float32
    if precision == "half":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    # auto: half precision where it is fast and safe; fp32 on the CPU for now
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def choose_attention(device: torch.device, requested: str) -> str:
    if requested in ("sdpa", "sliced"):
        return requested
    xformers_ok = device.type == "cuda" and _xformers_available()
    if requested == "xformers":
        if not xformers_ok:
            raise RuntimeError("--attention xformers: xformers is not installed or there is no CUDA device "
                               "(pip install -e '.[xformers]')")
        return "xformers"
    return "xformers" if xformers_ok else "sdpa"


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def choose_placement(settings: EngineSettings) -> Placement:
    device = choose_device(settings.device)
    dtype = choose_dtype(device, settings.precision)
    vae_dtype = torch.float32 if settings.no_half_vae else dtype
    return Placement(device, dtype, vae_dtype, choose_attention(device, settings.attention))


def apply_attention(unet, attention: str) -> None:
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "sliced":
        unet.set_attention_slice("auto")
    # "sdpa" is diffusers' default processor on PyTorch 2
