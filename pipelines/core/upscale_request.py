"""The Extras tab's request: upscale one image or a batch, optionally restore faces after.

Torch-free: the UI builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from pipelines.core.checks import RequestError, check_int, check_number, check_text
from pipelines.core.limits import check_limit as _check_range
from pipelines.core.save_formats import SaveOptions


@dataclass(frozen=True)
class UpscaleRequest:
    image: Image.Image | None = None
    upscaler: str = "Lanczos"
    scale: float = 2.0
    target_width: int | None = None  # both set: resize to exactly this size instead of by scale
    target_height: int | None = None
    save_images: bool = True
    save_options: SaveOptions = SaveOptions()
    images: tuple[Image.Image, ...] = ()  # a batch: upscaled after `image`, each the same way
    upscaler_2: str | None = None  # blended into the first upscaler's result
    upscaler_2_visibility: float = 0.0
    tile_size: int = 256  # neural upscalers: tile edge in input pixels, 0 = whole image
    tile_overlap: int = 16
    # face restoration after upscaling, as A1111's Extras: models/GFPGAN's, then models/Codeformer's
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0  # A1111's Extras default (strongest restoration)

    def __post_init__(self) -> None:
        for name in ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight"):
            _check_range(name, check_number(name, getattr(self, name)))
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise RequestError("image", "an input image is needed")
        batch = tuple(self.images or ())
        if not all(isinstance(i, Image.Image) for i in batch):
            raise RequestError("images", "every item of the batch must be an image")
        object.__setattr__(self, "images", batch)
        if self.image is None and not batch:
            raise RequestError("image", "an input image is needed")
        if self.upscaler_2 in ("", "None"):
            object.__setattr__(self, "upscaler_2", None)
        if self.upscaler_2 is not None:
            check_text("upscaler_2", self.upscaler_2)
        _check_range("upscaler_2_visibility", check_number("upscaler_2_visibility", self.upscaler_2_visibility))
        for name in ("tile_size", "tile_overlap"):
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
            _check_range(name, getattr(self, name))
        scale = check_number("scale", self.scale)
        if not 1.0 <= scale <= 8.0:
            raise RequestError("scale", f"must be between 1 and 8, got {scale}")
        if (self.target_width is None) != (self.target_height is None):
            raise RequestError("target_width", "give both target width and height, or neither")
        for name in ("target_width", "target_height"):
            value = getattr(self, name)
            if value is not None and not 8 <= check_int(name, value) <= 8192:
                raise RequestError(name, f"must be between 8 and 8192, got {value}")

    @property
    def all_images(self) -> tuple[Image.Image, ...]:
        return ((self.image,) if self.image is not None else ()) + self.images


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(width, height) of an image of `size` upscaled by `scale`, as the upscalers size it."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
