"""Upscalers by name: the PIL resamplers now, neural models (spandrel, models/ESRGAN/) later.

An upscaler is anything with `name`, `scale` (its native factor, None for plain resamplers
that do any factor) and `upscale(image, scale) -> image`. A neural one runs its native
factor and may return a size that is not exactly `scale` times; `upscale_image` fixes the
size up, so every upscaler honours the same contract for the UI, the API and hires fix.

No torch here: the list of names is shown by the UI. Neural upscalers are passed in
through `extra` (the engine builds them from the registry), so this module holds no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

from PIL import Image

from .request import RequestError


@runtime_checkable
class Upscaler(Protocol):
    name: str
    scale: float | None

    def upscale(self, image: Image.Image, scale: float) -> Image.Image: ...


def _scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@dataclass(frozen=True)
class PILUpscaler:
    """A plain Pillow resampler: any factor, no model."""

    name: str
    resample: Image.Resampling
    scale: float | None = None

    def upscale(self, image: Image.Image, scale: float) -> Image.Image:
        return image.resize(_scaled_size(image.size, scale), self.resample)


BUILTIN: tuple[PILUpscaler, ...] = (
    PILUpscaler("Lanczos", Image.Resampling.LANCZOS),
    PILUpscaler("Nearest", Image.Resampling.NEAREST),
    PILUpscaler("Bicubic", Image.Resampling.BICUBIC),
)


def upscaler_names(extra: Iterable[Upscaler | str] = ()) -> list[str]:
    """Built-in names first (always present), then the extra ones, without duplicates."""
    names = [u.name for u in BUILTIN]
    for item in extra:
        name = item if isinstance(item, str) else item.name
        if name not in names:
            names.append(name)
    return names


def get_upscaler(name: str, extra: Iterable[Upscaler] = ()) -> Upscaler:
    """The upscaler called `name` (exact, else case-insensitive); a RequestError (a
    ValueError) naming the field `upscaler` and the valid names otherwise."""
    candidates = [*BUILTIN, *extra]
    for upscaler in candidates:
        if upscaler.name == name:
            return upscaler
    if isinstance(name, str):
        for upscaler in candidates:
            if upscaler.name.casefold() == name.casefold():
                return upscaler
    names = upscaler_names(candidates)
    raise RequestError("upscaler", f"unknown value {name!r}; choose one of: {', '.join(names)}")


def upscale_image(image: Image.Image, upscaler: Upscaler | str, *, scale: float | None = None,
                  target_size: tuple[int, int] | None = None,
                  extra: Iterable[Upscaler] = ()) -> Image.Image:
    """Upscale by `scale`, or to exactly `target_size` (w, h).

    For a target, the image is upscaled by the factor that covers the target (the larger of
    the two ratios), the centre is cropped to the target's aspect ratio (A1111's default
    "crop to fit"), and the rest resampled with Lanczos so the size is exact.
    """
    if (scale is None) == (target_size is None):
        raise ValueError("give exactly one of scale or target_size")
    if isinstance(upscaler, str):
        upscaler = get_upscaler(upscaler, extra)

    if target_size is not None:
        target_w, target_h = (int(v) for v in target_size)
        if target_w < 1 or target_h < 1:
            raise RequestError("target_width", f"target size must be positive, got {target_w}x{target_h}")
        factor = max(target_w / image.width, target_h / image.height)
    else:
        factor = float(scale)  # type: ignore[arg-type]
        if not factor > 0:
            raise RequestError("scale", f"must be greater than 0, got {scale}")
        target_w, target_h = _scaled_size(image.size, factor)

    result = upscaler.upscale(image, factor)
    if result.size == (target_w, target_h):
        return result
    # Crop the centre to the target aspect, then resample to the exact size.
    w, h = result.size
    if w * target_h > h * target_w:  # too wide
        crop_w = max(1, round(h * target_w / target_h))
        left = (w - crop_w) // 2
        result = result.crop((left, 0, left + crop_w, h))
    elif w * target_h < h * target_w:  # too tall
        crop_h = max(1, round(w * target_h / target_w))
        top = (h - crop_h) // 2
        result = result.crop((0, top, w, top + crop_h))
    if result.size != (target_w, target_h):
        result = result.resize((target_w, target_h), Image.Resampling.LANCZOS)
    return result
