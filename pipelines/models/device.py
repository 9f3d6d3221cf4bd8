"""Device, dtype, attention backend and offload mode: chosen here, once, from the settings."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.core.settings import EngineSettings


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # U-Net and text encoder
    vae_dtype: torch.dtype
    attention: str  # "xformers" | "sdpa" | "sliced"
    offload: str = "none"  # "none" | "medvram" (whole models) | "lowvram" (layer by layer)
    compile: bool = False  # torch.compile the U-Net

    @property
    def channels_last(self) -> bool:
        """NHWC layout for the U-Net (see channels_last_helps)."""
        return channels_last_helps(self.device, self.dtype)

    @property
    def vae_channels_last(self) -> bool:
        return channels_last_helps(self.device, self.vae_dtype)

    def describe(self) -> dict:
        info = {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "vae dtype": str(self.vae_dtype).replace("torch.", ""),
            "attention": self.attention,
        }
        if self.offload != "none":
            info["offload"] = self.offload
        if self.compile:
            info["compile"] = "on"
        return info


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
    # auto: half precision where the hardware does it fast; fp32 on other CPUs
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_has_fast_bf16(flags: set[str] | None = None) -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convolutions run about twice as fast as fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_vae_dtype(device: torch.device, precision: str, dtype: torch.dtype, no_half_vae: bool) -> torch.dtype:
    """The U-Net's dtype, except fp32 with --no-half-vae and for `auto` on the CPU: a bf16
    decode is off by up to 24-40 levels on some pixels (measured, see the README), and the
    decode is a small part of a CPU job. A non-finite half-precision decode is retried in
    fp32 anyway (runner.decode_latents)."""
    if no_half_vae or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    return dtype


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
    vae_dtype = choose_vae_dtype(device, settings.precision, dtype, settings.no_half_vae)
    return Placement(device, dtype, vae_dtype, choose_attention(device, settings.attention), offload=settings.offload,
                     compile=settings.compile)


COMPILE_CACHE = "torch-compile"  # --compile's artefacts, under the data folder
COMPILE_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(data_dir: Path, environ: MutableMapping[str, str] = os.environ) -> Path:
    """Keep torch.compile's artefacts (inductor's FX graph cache and generated kernels) in the data
    folder, so a compile is paid once per machine and torch version rather than once per start.
    Inductor keys each entry by the traced graph (the model's layers and shapes), the input
    shapes, its config and the torch version, so one folder serves every model and image size.
    A TORCHINDUCTOR_CACHE_DIR set by the user wins. Inductor reads the variable when it first
    compiles, so this runs before the first compiled call. Returns the folder in use."""
    if environ.get(COMPILE_CACHE_VARIABLE):
        return Path(environ[COMPILE_CACHE_VARIABLE])
    folder = Path(data_dir) / COMPILE_CACHE
    folder.mkdir(parents=True, exist_ok=True)
    environ[COMPILE_CACHE_VARIABLE] = str(folder)
    return folder


def channels_last_helps(device: torch.device, dtype: torch.dtype) -> bool:
    """Measured on this 2-core AVX512-BF16 CPU (README, performance notes): NHWC convolutions
    make a 220M-parameter U-Net forward 12-16% faster and an SD-shaped VAE decode 2.2x faster
    in bf16, and gain nothing in fp32 (tiny models: no difference either way)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def apply_attention(unet, attention: str) -> None:
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "sliced":
        unet.set_attention_slice("auto")
    # "sdpa" is diffusers' default processor on PyTorch 2
