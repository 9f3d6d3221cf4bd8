"""Where a job's memory goes: model placement and offload, the low-memory mode, the peak
estimate made before a job runs, and what counts as running out of memory.

Offload (`--medvram`, `--lowvram`) uses accelerate's hooks: medvram keeps each whole model
(text encoders, U-Net, VAE) on the CPU and moves it to the device only while it runs;
lowvram moves one layer at a time. On a CPU-only machine both run the same code and change
nothing in effect.

The estimate is of the *working* memory a job needs beyond the loaded weights (those are
already counted where they live), at the dtypes and mode it runs in:

    U-Net  = rows * itemsize * (sum over levels l of C_l * (h*w / 4^l) * (layers + 1)
                                + U_WORK * C_0 * h * w)
    VAE    = images * itemsize_vae * V_WORK * C_up * H * W     (images decoded at once)

with h, w = H/8, W/8, rows = batch * 2 under CFG, C_l the U-Net's block widths (the skip
connections kept for the up path), and C_up the VAE width that is upsampled into the last
decoder block at full resolution (block_out_channels[1]). Attention adds no quadratic term:
PyTorch's SDPA (and xformers) never hold the full score matrix. The work factors come from
peak-RSS deltas of the tiny test models in fresh processes (fp32, one thread): the U-Net
used 49-61 x C_0*h*w beyond its skips at 256-512 px, the VAE 5.0-8.5 x C_up*H*W (the larger
factor at the smaller size, where fixed costs weigh more). In low-memory mode the VAE
decodes one image at a time in tiles of at most its sample size, so H*W is capped by the
tile and `images` is 1.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

from pipelines.core.request import RequestError
from pipelines.models.device import Placement
from pipelines.models.flux_files import is_kontext
from pipelines.models.sd3_files import transformer_working_bytes

U_WORK = 56  # resnet/attention/feed-forward buffers, in units of C_0 * h * w (measured 49-61)
V_WORK = 7  # decoder buffers at full resolution, in units of C_up * H * W (measured 5.0-8.5)
SAFETY = 0.9  # share of the free memory a job may plan to use


class OutOfMemory(RequestError):
    """The job does not fit even in low-memory mode; the message says what to change."""

    def __init__(self, width: int, height: int, batch: int, detail: str = ""):
        message = f"Out of memory at {width}x{height} batch {batch}: try a smaller size or batch"
        super().__init__("memory", f"{message}{f' ({detail})' if detail else ''}")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator failing to get memory."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, (MemoryError, RuntimeError)) and "out of memory" in str(exc).lower()


def release(device: torch.device, *, after_job: bool = False) -> None:
    """Give back what a finished or failed job held (cached CUDA blocks included).

    A full garbage collection walks the half a million objects torch and diffusers keep
    (0.25-0.65 s on a 2-core CPU, a tenth of a 20-step demo job). After a job on the CPU
    (`after_job`) only the young generations are collected: measured, a finished job leaves no
    tensor in a reference cycle (86 small objects), and what an older cycle holds is RAM that
    Python's own full collection gives back later. On CUDA, and after an eviction, an unload or
    running out of memory, the collection stays full: there the memory is needed back now."""
    if after_job and device.type != "cuda":
        gc.collect(1)
    else:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- placement -------------------------------------------------------------------------------

def place(components, placement: Placement) -> list:
    """Put a freshly loaded model where it runs, in the order a job uses it (text encoders,
    U-Net, VAE). Returns the medvram offload hooks (`offload_all` after each job)."""
    if placement.channels_last:
        components.unet.to(memory_format=torch.channels_last)
    if placement.vae_channels_last:
        components.vae.to(memory_format=torch.channels_last)
    modules = [*components.text_encoders, components.unet, components.vae]
    hooks = offload(modules, placement.device, placement.offload)
    if placement.compile:
        components.unet.compile()  # in place: the module (and its config, LoRA hooks) stays the same
    return hooks


def offload(modules, device: torch.device, mode: str) -> list:
    """Move `modules` to `device` ("none"), or install offload hooks: "medvram" chains
    accelerate's `cpu_offload_with_hook` (running one model offloads the previous one),
    "lowvram" uses `cpu_offload` (weights stay on the CPU, each layer visits the device)."""
    if mode == "none":
        for module in modules:
            module.to(device)
        return []
    from accelerate import cpu_offload, cpu_offload_with_hook  # heavy: only with --medvram/--lowvram

    if mode == "lowvram":
        for module in modules:
            cpu_offload(module, execution_device=device)
        return []
    hooks, previous = [], None
    for module in modules:
        _, previous = cpu_offload_with_hook(module, execution_device=device, prev_module_hook=previous)
        hooks.append(previous)
    return hooks


def offload_all(hooks) -> None:
    """medvram: after a job, nothing stays on the device."""
    for hook in hooks:
        hook.offload()


def remove_offload(modules, device: torch.device) -> None:
    from accelerate.hooks import remove_hook_from_module  # heavy: only with --medvram/--lowvram

    for module in modules:
        remove_hook_from_module(module, recurse=True)
        module.to(device)


@contextmanager
def low_memory(components, placement: Placement) -> Iterator[None]:
    """For one job: VAE tiling and one-image-at-a-time decoding, sliced attention, and on
    CUDA model offload when none was asked for. Everything is put back afterwards."""
    unet, vae = components.unet, components.vae
    processors = unet.attn_processors
    vae.enable_tiling()
    vae.enable_slicing()
    slicing = hasattr(unet, "set_attention_slice")  # SD 3's transformer chunks its feed-forward instead
    chunking = not slicing and hasattr(unet, "enable_forward_chunking")  # Flux's transformer does neither
    if slicing:
        unet.set_attention_slice("auto")
    elif chunking:
        unet.enable_forward_chunking()
    modules = [*components.text_encoders, unet, vae]
    offloaded = placement.device.type == "cuda" and placement.offload == "none"
    hooks = offload(modules, placement.device, "medvram") if offloaded else []
    try:
        yield
    finally:
        if offloaded:
            offload_all(hooks)
            remove_offload(modules, placement.device)
        unet.set_attn_processor(processors)
        if chunking:
            unet.disable_forward_chunking()
        vae.disable_slicing()
        vae.disable_tiling()


# --- the estimate ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    working_bytes: int  # estimated peak beyond the loaded weights, in the mode the job runs in
    normal_bytes: int  # the same in normal mode
    available_bytes: int
    low_memory: bool  # the normal mode's estimate did not fit
    retried: bool = False  # the job ran out of memory once and was retried in low-memory mode

    def describe(self) -> dict:
        return {"estimated peak": _gb(self.working_bytes), "available": _gb(self.available_bytes),
                "mode": "low-memory" if self.low_memory or self.retried else "normal",
                "retried": self.retried}

    def note(self) -> str | None:
        """What the user is told when the job did not run in the normal mode."""
        if self.retried:
            return ("Ran out of memory; released memory and retried in low-memory mode "
                    "(VAE tiling, sliced attention, offload)")
        if self.low_memory:
            return (f"Estimated peak memory {_gb(self.normal_bytes)} in normal mode is more than is free "
                    f"({_gb(self.available_bytes)}); ran in low-memory mode (VAE tiling, sliced attention, offload)")
        return None


def _gb(n: int) -> str:
    """Bytes for people: MB below a gigabyte (tiny models), GB above."""
    return f"{n / (1 << 30):.2f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MB"


def estimate_working_bytes(components, width: int, height: int, batch: int, cfg: bool,
                           unet_dtype: torch.dtype, vae_dtype: torch.dtype, low_memory: bool = False) -> int:
    """The formula of the module docstring."""
    unet_cfg, vae_cfg = components.unet.config, components.vae.config
    h, w = height // 8, width // 8
    rows = batch * (2 if cfg else 1)
    if hasattr(unet_cfg, "block_out_channels"):
        channels = list(unet_cfg.block_out_channels)
        skips = sum(c * (h * w) // (4 ** level) * (unet_cfg.layers_per_block + 1) for level, c in enumerate(channels))
        unet_bytes = rows * _itemsize(unet_dtype) * (skips + U_WORK * channels[0] * h * w)
    else:  # a transformer denoiser (SD 3)
        reference = is_kontext(getattr(components.spec, "unet_config", None) or {})  # Kontext's reference tokens
        unet_bytes = transformer_working_bytes(unet_cfg, width, height, rows, _itemsize(unet_dtype), reference)
    pixels, images = height * width, batch
    if low_memory:
        tile = int(getattr(vae_cfg, "sample_size", 512) or 512)
        pixels, images = min(height, tile) * min(width, tile), 1
    widths = list(vae_cfg.block_out_channels)
    vae_bytes = images * _itemsize(vae_dtype) * V_WORK * widths[min(1, len(widths) - 1)] * pixels
    outputs = batch * height * width * 3 * 4  # the decoded float images
    return unet_bytes + vae_bytes + outputs


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def available_bytes(device: torch.device) -> int:
    """Free memory where the job's tensors live: free RAM, or free plus cached VRAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(psutil.virtual_memory().available)


def plan_job(components, placement: Placement, width: int, height: int, batch: int, cfg: bool) -> MemoryPlan:
    """Normal mode when it fits, low-memory mode when only that fits, else OutOfMemory."""
    free = available_bytes(placement.device)
    budget = int(free * SAFETY)
    args = (components, width, height, batch, cfg, placement.dtype, placement.vae_dtype)
    normal = estimate_working_bytes(*args)
    if normal <= budget:
        return MemoryPlan(normal, normal, free, low_memory=False)
    low = estimate_working_bytes(*args, low_memory=True)
    if low <= budget:
        return MemoryPlan(low, normal, free, low_memory=True)
    raise OutOfMemory(width, height, batch, f"estimated {_gb(low)} needed even in low-memory mode, {_gb(free)} free")
