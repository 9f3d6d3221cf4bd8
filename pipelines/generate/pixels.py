"""Images <-> tensors as the VAE sees them: RGB scaled to [-1, 1], (batch, channel, height, width);
images <-> latents through the VAE."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipelines.core.progress import JobControl


def to_tensor(image: Image.Image, device, dtype) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


def to_image(sample: torch.Tensor) -> Image.Image:
    array = ((sample.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def encode_image(vae, image: Image.Image, device) -> torch.Tensor:
    pixels = to_tensor(image, device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


VAE_NAN_NOTE = ("A tensor with NaNs or infinities was produced in the VAE decode at {dtype}; "
                "decoded again in float32 (use --no-half-vae to always decode in float32)")


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, control: JobControl | None = None) -> list[Image.Image]:
    """Latents -> images. A half-precision decode that overflows (NaN/inf, which would be
    saved as a black image) is done again in float32 and the job says so (control.notes)."""
    samples = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    if vae.dtype != torch.float32 and not torch.isfinite(samples).all():
        half = vae.dtype
        vae.to(torch.float32)  # jobs run one at a time, so the shared module can switch dtype
        try:
            samples = vae.decode((latents / vae.config.scaling_factor).float()).sample
        finally:
            vae.to(half)
        if control is not None:
            control.note(VAE_NAN_NOTE.format(dtype=str(half).replace("torch.", "")))
    return [to_image(s) for s in samples]
