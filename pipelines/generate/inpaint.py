"""img2img / inpaint's pixel side: the input resized, the mask prepared (only-masked crops,
fills), the mask at latent size (hard or soft), the 9-channel inpainting U-Net's extra input,
and the final composite of the generated picture over the original."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipelines.core.request import GenerationRequest
from pipelines.generate import images
from pipelines.generate.pixels import encode_image


@dataclass
class InpaintPlan:
    """Pixel-side inputs of img2img/inpaint, at the processing size."""

    image: Image.Image  # what gets encoded (resized, maybe cropped/filled)
    original: Image.Image | None = None  # the full input at output size, for the final composite
    mask: Image.Image | None = None  # blurred "L" mask at processing size, white = repaint
    overlay_mask: Image.Image | None = None  # blurred mask at output size
    crop_box: tuple[int, int, int, int] | None = None  # only-masked: region of `original`


def plan_pixels(request: GenerationRequest, width: int, height: int) -> InpaintPlan | None:
    """Resize the input image and prepare the mask (steps 1-2 of img2img/inpaint)."""
    if request.mode == "txt2img":
        return None
    init = request.init_image.convert("RGB")
    if request.mode == "img2img":
        return InpaintPlan(image=images.resize_image(init, width, height, request.resize_mode))
    original = images.resize_image(init, width, height, request.resize_mode)
    mask = images.prepare_mask(request.mask, width, height, blur=request.mask_blur, soft=request.soft_inpainting,
                               invert=request.inpainting_mask_invert, resize_mode=request.resize_mode)
    plan = InpaintPlan(image=original, original=original, mask=mask, overlay_mask=mask)
    if request.inpaint_full_res:
        sharp = images.prepare_mask(request.mask, width, height, blur=0,
                                    invert=request.inpainting_mask_invert, resize_mode=request.resize_mode)
        box = images.crop_region(sharp, request.inpaint_full_res_padding)
        if box is not None:
            box = images.expand_to_aspect(box, width, height, original.width, original.height)
            plan.crop_box = box
            plan.image = original.crop(box).resize((width, height), Image.LANCZOS)
            plan.mask = mask.crop(box).resize((width, height), Image.LANCZOS)
    if request.inpainting_fill == "fill":
        plan.image = images.fill_masked(plan.image, plan.mask)
    return plan


def latent_mask(mask: Image.Image, latent_w: int, latent_h: int, device, soft: bool = False) -> torch.Tensor:
    """The repaint mask at latent size, rounded to 0/1 (A1111 rounds the blurred mask); `soft`:
    its grey values kept (soft inpainting: how much each latent pixel may change)."""
    small = np.asarray(mask.resize((latent_w, latent_h), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(small if soft else np.around(small))[None, None].to(device)


def free_pixels(mask: torch.Tensor, step: int, steps: int, soft: bool) -> torch.Tensor:
    """Where step `step` of `steps` may change the latents (1) or keeps the original's (0).
    Soft inpainting (differential diffusion): a pixel of mask value m joins for the last share m of
    the steps, so its change grows with m; a hard mask is the same at every step."""
    return (mask >= 1 - step / steps).to(mask.dtype) if soft else mask


def inpaint_conditioning(vae, plan: InpaintPlan | None, width: int, height: int, device) -> torch.Tensor:
    """What a 9-channel inpainting U-Net sees besides the latents: the mask and the image with
    the masked part grey. Without a mask (txt2img/img2img) everything counts as masked."""
    if plan is None or plan.mask is None:
        mask_image = Image.new("L", (width, height), 255)
        source = Image.new("RGB", (width, height), (128, 128, 128))
    else:
        mask_image, source = plan.mask, plan.image
    keep = (np.asarray(mask_image, dtype=np.float32) < 127.5)[..., None]
    masked = Image.fromarray((np.asarray(source.convert("RGB"), dtype=np.float32) * keep
                              + 127.5 * (1 - keep)).round().astype(np.uint8))
    mask = latent_mask(mask_image, width // 8, height // 8, device)
    return torch.cat([mask, encode_image(vae, masked, device)], dim=1)


def finish_image(generated: Image.Image, plan: InpaintPlan | None) -> Image.Image:
    if plan is None or plan.mask is None:
        return generated
    if plan.crop_box is not None:
        x1, y1, x2, y2 = plan.crop_box
        canvas = plan.original.copy()
        canvas.paste(generated.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        generated = canvas
    return images.composite(generated, plan.original, plan.overlay_mask)
