"""Picture helpers the UI's tabs and translations share (PIL only)."""

from __future__ import annotations

from PIL import Image


def flatten(image: Image.Image) -> Image.Image:
    """RGB copy of an image; transparent parts become white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
