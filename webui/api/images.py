"""Images in and out of the API: base64 in (raw or data: URL, never a URL to fetch),
base64 PNG out with the `parameters` text chunk, and the text chunks png-info reports."""

from __future__ import annotations

import base64
import binascii
import html
import io
import re
from typing import Any

from PIL import Image, PngImagePlugin

from pipelines.core.request import RequestError
from pipelines.core.uploads import UploadLimits

from .errors import bad_field

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*,", re.IGNORECASE)


def decode_image(field_name: str, text: Any, limits: UploadLimits | None = None) -> Image.Image:
    """A base64 image (raw, or a data: URL); a 422 naming the field when it is not one, or when
    it is over the upload limits (checked on the base64 length, then on the header's pixel
    count, before anything is decoded).

    URLs are refused: this server never fetches anything a request points at."""
    limits = limits or UploadLimits()
    if not isinstance(text, str) or not text.strip():
        raise bad_field(field_name, "an image is required (base64 PNG/JPEG/WebP, a data: URL prefix is fine)")
    text = text.strip()
    if text.lower().startswith(("http://", "https://", "file:")):
        raise bad_field(field_name, "images are not fetched from URLs; send the image itself as base64")
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end():]
    try:
        limits.check_size(field_name, len(text) * 3 // 4)  # what the base64 decodes to, whitespace aside
    except RequestError as exc:
        raise bad_field(field_name, exc.message) from None
    text = "".join(text.split())  # line-wrapped base64 is common
    text += "=" * (-len(text) % 4)  # and so is missing padding
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_field(field_name, "not valid base64") from None
    try:
        return limits.decode(field_name, data)
    except RequestError as exc:
        raise bad_field(field_name, exc.message) from None


def encode_png(image: Image.Image) -> str:
    """Base64 PNG carrying the image's text (the A1111 `parameters` chunk)."""
    pnginfo = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            pnginfo.add_text(key, value)
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Pillow's bookkeeping keys, not texts someone wrote (A1111 leaves the same ones out)
_IGNORED_INFO = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                 "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
                 "photoshop", "parameters", "transparency", "gamma", "aspect", "srgb", "xmp"}


def png_items(image: Image.Image) -> dict[str, Any]:
    return {key: value for key, value in image.info.items()
            if isinstance(key, str) and key.lower() not in _IGNORED_INFO
            and isinstance(value, (str, int, float, bool))}


def html_info(text: str) -> str:
    return f"<p>{html.escape(text)}</p>" if text else ""
