"""Seamless tiling (A1111's `tiling`): the U-Net's and the VAE's convolutions pad circularly
for one job, so the picture continues across its left/right and top/bottom edges.

`applied(components, enabled)` switches every padded `Conv2d` of the job's U-Net and VAE
(LoRA layers included, when entered after `lora.applied`) to `padding_mode="circular"` and
puts each module's own mode back when the block ends, also after an error or an interrupt:
the cached model is unchanged afterwards. Attention and group norm see the whole latent
already, so only the convolutions' borders stand between a picture and a tile.

SD upscale does not use this: its img2img tiles are crops of the picture, and a crop padded
with its own opposite edge would be wrong. It wraps its tiles around the picture's edges
instead (`wrapped_canvas` / `fold`, used by `hires.sd_upscale`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.core.request import LATENT_UPSCALE_MODES

CIRCULAR = "circular"
VAE_TILED_NOTE = ("Tiling: the VAE decodes in tiles in low-memory mode, so only the U-Net pads circularly; "
                  "the edges may show a faint seam")


def padded_convolutions(module: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The 2-D convolutions in `module` that pad their input (the ones whose border matters)."""
    found = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            padding = layer.padding
            if padding == "same" or (not isinstance(padding, str) and any(padding)):
                found.append(layer)
    return found


@contextlib.contextmanager
def applied(components, enabled: bool, warnings: list[str] | None = None) -> Iterator[int]:
    """Circular padding in the U-Net and the VAE for the block when `enabled`; yields how many
    convolutions were switched (0 when not enabled). A VAE that decodes in tiles (low-memory
    mode) keeps its padding: wrapping each tile onto itself would spoil the picture; the job
    says so in `warnings`."""
    if not enabled:
        yield 0
        return
    modules = [components.unet]
    if getattr(components.vae, "use_tiling", False):
        if warnings is not None and VAE_TILED_NOTE not in warnings:
            warnings.append(VAE_TILED_NOTE)
    else:
        modules.append(components.vae)
    layers = [layer for module in modules for layer in padded_convolutions(module)]
    saved = [(layer, layer.padding_mode) for layer in layers]
    try:
        for layer in layers:
            layer.padding_mode = CIRCULAR
        yield len(layers)
    finally:
        for layer, mode in saved:
            layer.padding_mode = mode


# --- SD upscale: tiles that wrap around the picture's edges ------------------------------------

def wrapped_canvas(source: np.ndarray, width: int, height: int) -> np.ndarray:
    """`source` (H x W x 3) repeated past its right and bottom edges to `width` x `height`,
    so tiles that reach beyond the picture see its other side."""
    h, w = source.shape[:2]
    return np.pad(source, ((0, height - h), (0, width - w), (0, 0)), mode="wrap")


def fold(canvas: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sum a wrapped canvas back onto the `width` x `height` picture it repeats (the inverse
    of `wrapped_canvas` for accumulated pixels and weights)."""
    folded = np.zeros((height, width, *canvas.shape[2:]), dtype=canvas.dtype)
    for y in range(0, canvas.shape[0], height):
        for x in range(0, canvas.shape[1], width):
            part = canvas[y:y + height, x:x + width]
            folded[:part.shape[0], :part.shape[1]] += part
    return folded


# --- hires fix: latent upscaling on a torus ----------------------------------------------------

def _wrap_pad(size: int, target: int) -> int:
    """Cells to wrap on each side so that the upscaled padding is a whole number of cells
    (p * target / size integral) and at least 2 (bicubic's reach)."""
    step = size // math.gcd(size, target)
    return step * max(1, math.ceil(2 / step))


def _wrap(latents: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    size = latents.shape[dim]
    reps = math.ceil(pad / size)
    tiled = torch.cat([latents] * (2 * reps + 1), dim=dim)
    return tiled.narrow(dim, reps * size - pad, size + 2 * pad)


def upscale_latents(latents: torch.Tensor, mode: str, width: int, height: int) -> torch.Tensor:
    """Hires fix's latent upscale (`hires.upscale_latents`) for a tiling job: the latents are
    interpolated as if they repeated on every side, so the first pass's seamless edges stay
    seamless instead of being clamped."""
    interpolation, antialias = LATENT_UPSCALE_MODES[mode]
    (h, w), (th, tw) = latents.shape[-2:], (height // 8, width // 8)
    ph, pw = _wrap_pad(h, th), _wrap_pad(w, tw)
    padded = _wrap(_wrap(latents, ph, -2), pw, -1)
    kwargs = {"antialias": antialias, "align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
    big = F.interpolate(padded, scale_factor=(th / h, tw / w), mode=interpolation, recompute_scale_factor=False,
                        **kwargs)
    top, left = ph * th // h, pw * tw // w
    return big[..., top:top + th, left:left + tw]
