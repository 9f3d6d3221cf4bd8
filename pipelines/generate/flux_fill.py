"""Flux.1 Fill: the inpainting Flux, as diffusers' FluxFillPipeline feeds it.

Beside the noisy latents, Fill's transformer takes two more inputs in every token: the latents
of the image with the masked part erased (pixels * (1 - mask) in [-1, 1], so grey, encoded and
shifted like any latents) and the mask itself at full pixel resolution, each latent pixel's
8x8 mask pixels as 64 channels. The mask is binarized at one half (FluxFillPipeline's mask
processor). The flow loop keeps latents unpacked, so these are made unpacked too, one
(16 + 64)-channel tensor the loop puts beside the latents before padding and packing: packing
channels side by side gives FluxFillPipeline's packed inputs side by side.

The model repaints the masked area itself, so the loop does not blend the known area back in
after each step (FluxFillPipeline does not); the final composite over the original still
applies, as for every inpainting model. Without a mask (txt2img, img2img, hires fix's second
pass) everything counts as masked: FluxFillPipeline with an all-white mask, whose masked image
is blank whatever the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.core.request import GenerationRequest
from pipelines.generate.inpaint import InpaintPlan
from pipelines.generate.pixels import to_tensor
from pipelines.models.flux_files import is_fill

VAE_SCALE = 8  # pixels per latent pixel side: the mask goes in as 8 x 8 = 64 channels
WHOLE_IMAGE_NOTE = ("Flux.1 Fill is an inpainting model: {mode} ran it with the whole image masked; use the "
                    "Inpaint tab (or outpainting) with a mask to repaint part of an image")
SOFT_NOTE = "Soft inpainting does not apply to Flux.1 Fill: its mask is hard (repaint or keep, cut at half grey)"


def is_fill_model(components) -> bool:
    return is_fill(components.unet.config)


def binary_mask(mask: Image.Image | None, width: int, height: int) -> torch.Tensor:
    """(1, 1, height, width): 1 where the model repaints. FluxFillPipeline's mask: grey levels
    cut at one half; none: everything."""
    if mask is None:
        return torch.ones(1, 1, height, width)
    grey = np.asarray(mask.convert("L").resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((grey >= 0.5).astype(np.float32))[None, None]


@torch.no_grad()
def masked_image_latents(vae, image: Image.Image | None, mask: torch.Tensor, device) -> torch.Tensor:
    """The image with the masked pixels erased (0 in [-1, 1]), as SD 3 / Flux latents
    ((z - shift) * scale, the distribution's mean as this app's encodes take it)."""
    height, width = mask.shape[-2:]
    pixels = torch.zeros(1, 3, height, width) if image is None else to_tensor(image, "cpu", torch.float32)
    masked = (pixels * (1 - mask)).to(device=device, dtype=vae.dtype)
    latents = vae.encode(masked).latent_dist.mean.float()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def fill_inputs(vae, plan: InpaintPlan | None, width: int, height: int, device) -> torch.Tensor:
    """Fill's extra input for one image, unpacked: (1, 16 + 64, height / 8, width / 8), the masked
    image's latents then the mask's 8x8 pixels of each latent pixel (FluxFillPipeline's order)."""
    mask = binary_mask(None if plan is None else plan.mask, width, height)
    image = None if plan is None or plan.mask is None else plan.image
    latents = masked_image_latents(vae, image, mask, device)
    # pixel (8 * row + i, 8 * column + j) -> channel 8 * i + j of latent pixel (row, column)
    return torch.cat([latents, F.pixel_unshuffle(mask, VAE_SCALE).to(device)], dim=1)


def batch_fill_inputs(components, plan: InpaintPlan | None, width: int, height: int, images: int,
                      device) -> torch.Tensor | None:
    """`fill_inputs` for a batch of `images` on a Fill model; None for any other model."""
    if not is_fill_model(components):
        return None
    return fill_inputs(components.vae, plan, width, height, device).repeat(images, 1, 1, 1)


def fill_notes(components, request: GenerationRequest) -> list[str]:
    """What a Fill job does differently from what was asked: no mask means all masked; no soft mask."""
    if not is_fill_model(components):
        return []
    if request.mode != "inpaint":
        return [WHOLE_IMAGE_NOTE.format(mode=request.mode)]
    return [SOFT_NOTE] if request.soft_inpainting else []
