"""Live previews of a job's latents while it runs: cheap enough to make at every step."""

from __future__ import annotations

import torch
from PIL import Image

from pipelines.generate.pixels import to_image

# Approximate latent -> RGB map of the SD VAE (a linear fit, A1111's "Approx cheap" idea):
# good enough to watch an image form, at latent resolution and at no decoding cost.
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def latent_preview(latents: torch.Tensor) -> Image.Image | None:
    """The first image of a batch as a cheap RGB preview (None for non-4-channel latents)."""
    if latents.shape[1] != len(LATENT_RGB):
        return None
    factors = torch.tensor(LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latents[0].detach().float().cpu(), factors)
    return to_image(rgb.clamp(-1, 1))


def preview_of(latents: torch.Tensor | None):
    """A deferred preview for Progress.preview: nothing is computed unless it is called."""
    return None if latents is None else (lambda: latent_preview(latents))
