"""Soft inpainting (differential diffusion): a grey mask value is how much that pixel may change."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.core.request import GenerationRequest, RequestError

SIZE = 64


def gradient_mask() -> Image.Image:
    """Black (keep) on the left to white (repaint) on the right."""
    row = np.linspace(0, 255, SIZE).round().astype(np.uint8)
    return Image.fromarray(np.tile(row, (SIZE, 1)), "L")


def source() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def inpaint(engine, **changes):
    request = GenerationRequest(mode="inpaint", prompt="a red circle", seed=3, steps=8, sampler="Euler",
                                width=SIZE, height=SIZE, init_image=source(), mask=gradient_mask(), mask_blur=0,
                                denoising_strength=1.0, save_images=False, **changes)
    result = engine.generate(request)
    assert result.images, result.warnings
    return np.abs(np.asarray(result.images[0], dtype=np.float64) - np.asarray(source(), dtype=np.float64))


def test_the_change_grows_along_a_gradient_mask(engine):
    change = inpaint(engine, soft_inpainting=True).mean(axis=(0, 2))  # per column
    bands = [float(band.mean()) for band in np.array_split(change, 4)]
    assert bands == sorted(bands), bands  # left (mask ~0) changes least, right (mask ~1) most
    assert bands[-1] > 3 * bands[0]
    assert change[0] == 0  # a mask value of 0 keeps the original pixels exactly


def test_a_hard_mask_changes_the_right_half_alike(engine):
    change = inpaint(engine).mean(axis=(0, 2))
    left, right = change[: SIZE // 2 - 2], change[SIZE // 2 + 2 :]
    assert left.max() == 0 and right.min() > 0  # binarised at 128: all or nothing


def test_soft_inpainting_is_for_inpaint_only():
    with pytest.raises(RequestError) as error:
        GenerationRequest(mode="txt2img", soft_inpainting=True)
    assert error.value.field == "soft_inpainting"
