"""Flux.1 Kontext: the edit model, given its reference image as diffusers' FluxKontextPipeline does.

Kontext's transformer is dev's; what differs is its input sequence. After the latents' tokens
come the reference image's (VAE-encoded and packed as any latents), at rotary positions
(1, row, column) where the latents' are (0, row, column); only the latents' part of the output
is the velocity (`flow_runner.denoise_flux` does this with the latents this module's picture
encodes to). As Forge and ComfyUI users run it, the reference is the input image:

- img2img: "make the cat wear a hat" on the input picture. At denoising strength 1 the output
  starts from noise (FluxKontextPipeline); below 1 it starts from the input noised as img2img
  does, so strength is still "how far from the input" (FluxKontextInpaintPipeline's strength,
  with everything masked).
- Inpaint: the masked area is repainted as the prompt says, the rest follows the input's noisy
  path each step, as FluxKontextInpaintPipeline does; the input is also the reference.
- txt2img: there is no reference; the file runs as Flux.1 dev, and the job says where Kontext acts.

The output has the requested size (A1111's Width and Height). The reference goes in at the
resolution Kontext was trained on nearest the output's aspect ratio (diffusers' auto-resize
table, exact for a 1024-px model; a file declaring another native size gets the table scaled to
it), the input fitted to that frame by the request's resize mode, as it is fitted to the output,
so the reference and the output show the same framing. The infotext says it: "Kontext reference: WxH".
"""

from __future__ import annotations

from PIL import Image

from pipelines.core.request import GenerationRequest
from pipelines.generate import images
from pipelines.generate.inpaint import InpaintPlan
from pipelines.models.flux_files import is_kontext

TABLE_RESOLUTION = 1024  # the side of the square entry of diffusers' PREFERRED_KONTEXT_RESOLUTIONS
MULTIPLE = 16  # a VAE pixel is 8 pixels and a token 2x2 of them
REFERENCE_KEY = "Kontext reference"  # the infotext key (Forge and ComfyUI write none for it)
EDIT_MODES = ("img2img", "inpaint")
TXT2IMG_NOTE = ("Flux.1 Kontext is an edit model: txt2img ran it as Flux.1 dev, without a reference image; put "
                "the picture to edit in img2img (or Inpaint) and say the change in the prompt")


def is_kontext_model(components) -> bool:
    return is_kontext(components.spec.unet_config)


def preferred_resolutions() -> list[tuple[int, int]]:
    """The (width, height) pairs Kontext was trained at, as diffusers lists them."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import (  # heavy: diffusers, only for a Kontext job
        PREFERRED_KONTEXT_RESOLUTIONS,
    )

    return list(PREFERRED_KONTEXT_RESOLUTIONS)


def reference_size(width: int, height: int, native_resolution: int = TABLE_RESOLUTION) -> tuple[int, int]:
    """The reference's (width, height) for an output of width x height: the trained resolution
    nearest its aspect ratio (diffusers' `_auto_resize` choice), scaled to the model's native
    resolution (no change at 1024), in multiples of 16."""
    aspect = width / height
    _, best_w, best_h = min((abs(aspect - w / h), w, h) for w, h in preferred_resolutions())
    scale = native_resolution / TABLE_RESOLUTION
    return tuple(max(MULTIPLE, round(side * scale / MULTIPLE) * MULTIPLE) for side in (best_w, best_h))


def job_reference_size(components, request: GenerationRequest) -> tuple[int, int] | None:
    """The reference's size in a Kontext job on an input image; None when there is no reference."""
    if request.mode not in EDIT_MODES or not is_kontext_model(components):
        return None
    native = components.spec.native_resolution
    return reference_size(*request.size_for(native), native)


def reference_picture(components, request: GenerationRequest, plan: InpaintPlan | None) -> Image.Image | None:
    """The picture Kontext sees as its reference: the input fitted to the output's frame by the
    resize mode, at `job_reference_size`; with "only masked" the crop it repaints. None for
    another model or without an input image."""
    size = job_reference_size(components, request)
    if plan is None or size is None:
        return None
    if plan.crop_box is not None and plan.original is not None:  # the model edits the crop: it sees the crop
        return images.resize_image(plan.original.crop(plan.crop_box), *size, "just resize")
    return images.resize_image(request.init_image, *size, request.resize_mode)


def infotext_params(components, request: GenerationRequest) -> dict[str, str]:
    """{"Kontext reference": "WxH"} when a Kontext job had a reference image, else {}."""
    size = job_reference_size(components, request)
    return {} if size is None else {REFERENCE_KEY: f"{size[0]}x{size[1]}"}


def kontext_notes(components, request: GenerationRequest) -> list[str]:
    """What a Kontext job does differently from what was asked: txt2img has no reference."""
    if not is_kontext_model(components) or request.mode in EDIT_MODES:
        return []
    return [TXT2IMG_NOTE]
