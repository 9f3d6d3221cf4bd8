"""Pixel-side helpers for img2img and inpainting: resize modes, masks, fill, composite.

Pure functions on PIL images (numpy inside); no torch, so the UI can preview with them.
Semantics follow A1111 where users can see the difference (where the picture lands in
the frame, which pixels a mask touches, how far a blur reaches).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from pipelines.core.request import RESIZE_MODES, RequestError

LANCZOS = Image.Resampling.LANCZOS
# Flattening colour for transparent init images (A1111's img2img background default).
BACKGROUND = (255, 255, 255)


def _resize_mode_name(mode: str | int) -> str:
    # The A1111 API sends resize_mode as 0/1/2; the UI and GenerationRequest use the names.
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        return RESIZE_MODES[mode]
    if mode in RESIZE_MODES:
        return mode  # type: ignore[return-value]
    raise RequestError("resize_mode", f"unknown value {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels flattened onto white (not onto whatever colour the
    transparent pixels happen to store, which is often black garbage)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_size(width: int, height: int) -> None:
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"target size must be at least 1x1, got {width}x{height}")


def _resize(image: Image.Image, width: int, height: int, mode: str | int) -> Image.Image:
    """The three A1111 resize modes, keeping the image's pixel mode (used for images and masks)."""
    mode = _resize_mode_name(mode)
    _check_size(width, height)
    w, h = image.size
    if (w, h) == (width, height):
        return image.copy()
    if mode == "just resize":
        return image.resize((width, height), LANCZOS)

    cover = mode == "crop and resize"
    # "crop and resize" scales so the image covers the frame; "resize and fill" so it fits.
    wider = width / height > w / h  # the frame is wider than the image
    if wider == cover:
        new_w, new_h = width, max(1, h * width // w)
    else:
        new_w, new_h = max(1, w * height // h), height
    resized = image.resize((new_w, new_h), LANCZOS)
    # Centre it the way A1111 pastes it: offset = frame//2 - image//2.
    left, top = width // 2 - new_w // 2, height // 2 - new_h // 2
    if cover:
        return resized.crop((-left, -top, -left + width, -top + height))

    # "resize and fill": the empty bands repeat the image's edge rows/columns (A1111 stretches
    # the 1-pixel edge over the band), which blends better than a flat colour when repainted.
    pad_y = (top, height - new_h - top)
    pad_x = (left, width - new_w - left)
    arr = np.asarray(resized)
    pad = (pad_y, pad_x) + ((0, 0),) * (arr.ndim - 2)
    return Image.fromarray(np.pad(arr, pad, mode="edge"))


def resize_image(image: Image.Image, width: int, height: int, mode: str | int) -> Image.Image:
    """`image` as RGB of exactly width x height using an A1111 resize mode:

    - "just resize": stretch to the size;
    - "crop and resize": scale to cover, crop the centre;
    - "resize and fill": scale to fit, centre, fill the bands with the stretched edge pixels.
    """
    return _resize(to_rgb(image), int(width), int(height), mode)


def mask_to_l(mask: Image.Image) -> Image.Image:
    """A mask in any mode as "L" (white = repaint).

    Masks with real transparency (Gradio's brush layer: strokes opaque, the rest clear) use
    their alpha channel; opaque masks use their brightness.
    """
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = mask.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
        return mask.convert("RGB").convert("L")
    return mask.convert("L")


def prepare_mask(mask: Image.Image, width: int, height: int, *, blur: int, invert: bool,
                 resize_mode: str | int, soft: bool = False) -> Image.Image:
    """The processing mask ("L", width x height, 255 = repaint), in A1111's order:

    1. any mode -> L (alpha for transparent masks), binarised at 128 so soft brush edges and
       JPEG noise do not leak a faint repaint into the picture;
    2. inverted for "Inpaint not masked";
    3. Gaussian blur with standard deviation `blur` pixels of the *source* mask (A1111 blurs
       with sigma = mask_blur before resizing; Pillow's GaussianBlur radius is that sigma);
    4. resized to width x height with the image's resize mode so it stays aligned with the
       image resized by `resize_image`.
    `soft` (soft inpainting) keeps step 1's grey values: how much each pixel may change.
    """
    _check_size(width, height)
    arr = np.asarray(mask_to_l(mask))
    binary = arr.astype(np.uint8) if soft else np.where(arr >= 128, 255, 0).astype(np.uint8)
    if invert:
        binary = 255 - binary
    result = Image.fromarray(binary)
    if blur and blur > 0:
        result = result.filter(ImageFilter.GaussianBlur(radius=blur))
    return _resize(result, int(width), int(height), resize_mode)


def crop_region(mask_L: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """"Only masked": the box (x1, y1, x2, y2; x2/y2 exclusive) around the non-zero mask,
    grown by `padding` pixels on each side and clamped to the image.

    None for an empty mask: there is nothing to crop to, and the caller should fall back to
    the whole picture as A1111 does.
    """
    box = mask_L.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    w, h = mask_L.size
    padding = max(0, int(padding))
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)


def _grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    # Grow [lo, hi) by `grow` split over both ends, slide it back inside [0, limit), and
    # clip it only if it is larger than the image.
    lo -= grow // 2
    hi += grow - grow // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_to_aspect(box: tuple[int, int, int, int], width: int, height: int,
                     image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow the short side of `box` so it has the processing aspect width:height (the crop
    is then resized to width x height without distortion), staying inside the image.

    Same semantics as A1111's expand_crop_region: grow symmetrically, shift back inside the
    image, clip if the image itself is too small (then the aspect is only approximate).
    """
    x1, y1, x2, y2 = box
    box_w, box_h = x2 - x1, y2 - y1
    if box_w <= 0 or box_h <= 0:
        raise ValueError(f"empty crop box {box}")
    target = width / height
    if box_w / box_h > target:
        y1, y2 = _grow_span(y1, y2, int(box_w / target - box_h), image_h)
    else:
        x1, x2 = _grow_span(x1, x2, int(box_h * target - box_w), image_w)
    return x1, y1, x2, y2


def _box_blur(arr: np.ndarray, radius: int) -> np.ndarray:
    """Sum over a (2r+1)^2 window with zeros outside (cumulative sums: cost independent of r)."""
    out = arr
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad), axis=axis)
        size = out.shape[axis]
        hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + size), axis=axis)
        lo = np.take(c, np.arange(0, size), axis=axis)
        out = hi - lo
    return out


def fill_masked(image: Image.Image, mask_L: Image.Image) -> Image.Image:
    """Masked content "fill": masked pixels replaced by a smooth colour from their surroundings.

    Normalised convolution at shrinking radii: each pass averages the unmasked pixels in a
    window (weights = how unmasked a pixel is) and blends that estimate in by how much
    unmasked support the window had, so far inside a hole the colour comes from wide
    windows and near the edge from the nearby pixels. Deterministic, no noise. Pixels
    where the mask is 0 are returned unchanged.
    """
    rgb = to_rgb(image)
    if mask_L.size != rgb.size:
        raise ValueError(f"mask size {mask_L.size} does not match image size {rgb.size}")
    arr = np.asarray(rgb, dtype=np.float64)
    m = np.asarray(mask_L.convert("L"), dtype=np.float64) / 255.0
    known = 1.0 - m
    if known.sum() < 1e-6:  # everything masked: nothing to take colours from
        fill = np.full_like(arr, 127.0)
    else:
        fill = np.broadcast_to((arr * known[..., None]).sum((0, 1)) / known.sum(), arr.shape).copy()
        weighted = arr * known[..., None]
        longest = max(rgb.size)
        for radius in (256, 64, 16, 4, 1):
            if radius >= longest:
                continue
            num = _box_blur(_box_blur(weighted, radius), radius)
            den = _box_blur(_box_blur(known, radius), radius)
            window = float((2 * radius + 1) ** 4)
            support = np.clip(den / window * 2.0, 0.0, 1.0)[..., None]
            estimate = num / np.maximum(den, 1e-9)[..., None]
            fill = fill * (1.0 - support) + estimate * support
    out = arr * (1.0 - m[..., None]) + fill * m[..., None]
    out = np.where(m[..., None] == 0, arr, out)  # exactly the original where unmasked
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def composite(generated: Image.Image, original: Image.Image, mask_L: Image.Image) -> Image.Image:
    """original where the mask is 0, generated where it is 255, linear blend between.

    Integer arithmetic, so unmasked pixels are bit-for-bit the original (no VAE round-trip
    drift outside the painted area).
    """
    gen, orig = to_rgb(generated), to_rgb(original)
    if gen.size != orig.size or mask_L.size != orig.size:
        raise ValueError(f"sizes differ: generated {gen.size}, original {orig.size}, mask {mask_L.size}")
    g = np.asarray(gen, dtype=np.uint32)
    o = np.asarray(orig, dtype=np.uint32)
    m = np.asarray(mask_L.convert("L"), dtype=np.uint32)[..., None]
    out = (o * (255 - m) + g * m + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


def paste_region(generated: Image.Image, base: Image.Image,
                 box: tuple[int, int, int, int]) -> Image.Image:
    """"Only masked": put the generated crop back into a copy of `base` at `box` (resized to
    the box). Follow with `composite(..., original, mask)` to keep unmasked pixels exact."""
    x1, y1, x2, y2 = box
    patch = _resize(to_rgb(generated), x2 - x1, y2 - y1, "crop and resize")
    out = to_rgb(base).copy()
    out.paste(patch, (x1, y1))
    return out


__all__ = [
    "resize_image", "prepare_mask", "crop_region", "expand_to_aspect", "fill_masked",
    "composite", "paste_region", "mask_to_l", "to_rgb",
]
