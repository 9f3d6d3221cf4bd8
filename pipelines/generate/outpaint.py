"""Outpainting: grow the canvas left, right, up and down, and paint the new area with the
inpainting machinery (an inpainting checkpoint or a plain one).

An outpainting request becomes an inpaint request: the input image on a larger canvas whose new
area starts from a fill that gives the sampler something to continue (the edge pixels stretched
outwards, blurred, with a little noise), and a mask over the new area that reaches `mask_blur`
pixels into the old one, so the seam is painted over and feathered. Outside that band the
original pixels are kept exactly (the final composite). The canvas grows as A1111's
"Outpainting mk2" grows it: the image's own size plus the extensions (the request's width and
height do not apply), rounded up to multiples of 8 (`GenerationRequest.outpaint_canvas`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from pipelines.core.request import OUTPAINT_SIDES, GenerationRequest

FILL_BLUR = 16  # pixels: the stretched edges are smoothed so no streaks are continued
FILL_NOISE = 12  # grey levels of noise on the fill, so the sampler does not paint a flat area


def filled_canvas(image: Image.Image, sides: tuple[int, int, int, int], seed: int) -> Image.Image:
    """`image` in the middle of the grown canvas; the new area continues its edge pixels outwards
    (blurred, with a little noise)."""
    left, right, up, down = sides
    pixels = np.asarray(image.convert("RGB"))
    grown = np.pad(pixels, ((up, down), (left, right), (0, 0)), mode="edge")
    blurred = np.asarray(Image.fromarray(grown).filter(ImageFilter.GaussianBlur(FILL_BLUR)), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, FILL_NOISE, blurred.shape)
    fill = np.clip(blurred + noise, 0, 255).round().astype(np.uint8)
    canvas = Image.fromarray(fill)
    canvas.paste(image.convert("RGB"), (left, up))
    return canvas


def grown_mask(image_size: tuple[int, int], sides: tuple[int, int, int, int], user_mask: Image.Image | None,
               mask_blur: int) -> Image.Image:
    """White over the new area and `mask_blur` pixels into the old one along each grown edge (the
    seam gets painted over); a user's inpaint mask keeps its place on the old area."""
    left, right, up, down = sides
    width, height = image_size[0] + left + right, image_size[1] + up + down
    mask = np.full((height, width), 255, dtype=np.uint8)
    inner = np.zeros((image_size[1], image_size[0]), dtype=np.uint8)
    if user_mask is not None:
        inner = np.asarray(user_mask.convert("L").resize(image_size, Image.NEAREST))
    mask[up:up + image_size[1], left:left + image_size[0]] = inner
    band = max(mask_blur, 0)
    for grown, region in ((left, np.s_[:, left:left + band]), (right, np.s_[:, width - right - band:width - right]),
                          (up, np.s_[up:up + band, :]), (down, np.s_[height - down - band:height - down, :])):
        if grown and band:
            mask[region] = 255
    return Image.fromarray(mask, "L")


def as_inpaint(request: GenerationRequest) -> tuple[GenerationRequest, dict]:
    """An outpainting request as the inpaint request that does it, and its infotext entry;
    any other request unchanged (and no entry)."""
    if not request.outpaints:
        return request, {}
    width, height, sides = request.outpaint_canvas()  # within the size limits: the request checked it
    canvas = filled_canvas(request.init_image, sides, request.seed)
    mask = grown_mask(request.init_image.size, sides, request.mask if request.mode == "inpaint" else None,
                      request.mask_blur)
    inpaint = request.replace(mode="inpaint", init_image=canvas, mask=mask, width=width, height=height,
                              resize_mode="just resize", inpaint_full_res=False, inpainting_mask_invert=False,
                              **{name: 0 for name in OUTPAINT_SIDES})
    asked = [getattr(request, name) for name in OUTPAINT_SIDES]
    return inpaint, {"Outpaint": ", ".join(f"{side} {value}" for side, value in
                                           zip(("left", "right", "up", "down"), asked) if value)}
