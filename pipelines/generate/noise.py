"""Initial noise, A1111's way (DESIGN.md "Seeds and noise"): CPU generators, float32.

Variation seeds blend a second seed's noise in by spherical interpolation; "resize seed
from" draws the noise at another size's latent shape and pastes it centred into this one's.
"""

from __future__ import annotations

import torch


def noise_for_seed(seed: int, subseed: int, subseed_strength: float, shape,
                   resize_from: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """A1111's CPU noise: randn from a generator seeded with the image's seed (float32).

    `resize_from` (width, height in pixels; off when a side is <= 0) is A1111's "Resize seed
    from": the noise (and its variation) is drawn at that size's latent shape and pasted,
    centred, into the noise of `shape` drawn from the same seed, so a composition found at
    that size survives at this one. The returned generator (which feeds the sampler) has drawn
    `shape` either way."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    from_shape = seed_resize_shape(shape, resize_from)
    drawn = noise if from_shape == tuple(shape) else _randn(seed, from_shape)
    if subseed_strength > 0:
        drawn = slerp(subseed_strength, drawn, _randn(subseed, from_shape))
    return (drawn if from_shape == tuple(shape) else paste_centred(drawn, noise)), generator


def _randn(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def seed_resize_shape(shape, resize_from: tuple[int, int] | None) -> tuple[int, ...]:
    """The latent shape the noise is drawn at: `shape`, or that of the "resize seed from" size."""
    shape = tuple(shape)
    if not resize_from or min(resize_from) <= 0:
        return shape
    width, height = resize_from
    return (*shape[:-2], max(1, height // 8), max(1, width // 8))


def _centred_span(target: int, source: int) -> tuple[int, int, int]:
    """(start in target, start in source, length) of `source` centred in `target`: the offset is
    (target - source) // 2 latent cells; a larger source is cropped by that much on each side."""
    offset = (target - source) // 2
    return (offset, 0, source) if offset >= 0 else (0, -offset, source + 2 * offset)


def paste_centred(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`target` with `source` pasted into its centre (both (..., H, W)); where they overlap,
    the result is `source`'s."""
    ty, sy, h = _centred_span(target.shape[-2], source.shape[-2])
    tx, sx, w = _centred_span(target.shape[-1], source.shape[-1])
    result = target.clone()
    result[..., ty:ty + h, tx:tx + w] = source[..., sy:sy + h, sx:sx + w]
    return result


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_n, b_n = a / a.norm(), b / b.norm()
    dot = (a_n * b_n).sum().clamp(-1.0, 1.0)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.acos(dot)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
