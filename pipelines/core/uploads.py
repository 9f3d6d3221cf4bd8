"""Limits on uploaded images, checked before an image is decoded.

A small file can hold a huge picture (a "decompression bomb": a 50 kB PNG of 40000x40000
pixels decodes to gigabytes), so two limits apply to every image a user sends, from the UI
or the API: the file's size, and its pixel count read from the header alone (`Image.open`
is lazy: it reads the header, the pixels are decoded only by `load()`). The default pixel
limit sits below Pillow's own decompression-bomb threshold (about 89.5 MP), so ours is the
error a user sees, naming the field. No torch, no gradio here.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from PIL import Image

from pipelines.core.request import RequestError

DEFAULT_MAX_UPLOAD_MB = 50.0
DEFAULT_MAX_UPLOAD_MEGAPIXELS = 64.0
MB = 1 << 20


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * MB)
    max_pixels: int = int(DEFAULT_MAX_UPLOAD_MEGAPIXELS * 1_000_000)

    @classmethod
    def of(cls, settings) -> "UploadLimits":
        """The limits an engine's settings ask for (the defaults for anything without them)."""
        mb = getattr(settings, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB)
        megapixels = getattr(settings, "max_upload_megapixels", DEFAULT_MAX_UPLOAD_MEGAPIXELS)
        return cls(max_bytes=int(mb * MB), max_pixels=int(megapixels * 1_000_000))

    def check_size(self, field: str, size: int) -> None:
        if size > self.max_bytes:
            raise RequestError(field, f"the file is {size / MB:.1f} MB; uploads are limited to "
                                      f"{self.max_bytes / MB:g} MB")

    def check_pixels(self, field: str, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise RequestError(field, f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
                                      f"uploads are limited to {self.max_pixels / 1e6:g} megapixels")

    def decode(self, field: str, data: bytes) -> Image.Image:
        """An uploaded file's bytes -> the decoded image, size and pixel count checked first
        (RequestError naming `field` when over a limit or not an image)."""
        self.check_size(field, len(data))
        try:
            image = Image.open(io.BytesIO(data))  # the header only
            self.check_pixels(field, *image.size)
            image.load()
        except RequestError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own limit, were it set below ours
            raise RequestError(field, f"the image is too large: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
            raise RequestError(field, f"not an image this server can read ({type(exc).__name__}: {exc})") from None
        return image

    def check_file(self, field: str, path: str | os.PathLike) -> None:
        """Size and pixel count of an image file, without decoding it."""
        self.check_size(field, os.path.getsize(path))
        try:
            with Image.open(path) as image:
                size = image.size
        except Image.DecompressionBombError as exc:
            raise RequestError(field, f"the image is too large: {exc}") from None
        except Exception:  # noqa: BLE001 - not an image: whoever decodes it says so
            return
        self.check_pixels(field, *size)
