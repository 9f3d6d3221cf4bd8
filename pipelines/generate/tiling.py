"""Tiled processing with overlap and seamless blending, in bounded memory.

An image-to-image function (a spandrel upscaler, an img2img pass) is run on overlapping
tiles; each tile's output is weighted by a feather that is 1 in its interior, falls off
across the overlap with its neighbour and is ~0 at the edge it shares with it (where the
function saw padding instead of the neighbouring pixels), and the weighted sum is
normalised. Border tiles keep full weight at the image border, so the result matches an
untiled run up to the function's receptive field beyond the kept overlap.

Memory: only one row of tiles is accumulated in float (tile height x output width); rows
that no later tile touches are written to the uint8 output as soon as the row is done.

`run_tiled` halves the tile size and starts again when the function runs out of memory
(CUDA's OutOfMemoryError or the CPU allocator's error), down to `MIN_TILE`.

No torch at import (the tensors come from the caller): `upscalers`, which imports this,
stays importable without it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MIN_TILE = 32


class Cancelled(Exception):
    """The job was interrupted between two tiles."""


def positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) evenly, with at least
    `overlap` pixels shared by neighbours. A single tile when it covers everything."""
    if tile <= 0 or tile >= length:
        return [0]
    overlap = max(0, min(overlap, tile - 1))
    count = math.ceil((length - overlap) / (tile - overlap))
    count = max(count, 2)
    span = length - tile
    return [round(i * span / (count - 1)) for i in range(count)]


def layout(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, start offsets) along one axis: as few tiles as `tile` allows, then shrunk
    to share the length evenly, so the overlap is about `overlap` and not whatever is left
    (512 px in tiles of at most 256 with 16 overlap: 3 tiles of 182, not 3 of 256)."""
    if tile <= 0 or tile >= length:
        return length, [0]
    overlap = max(0, min(overlap, tile - 1))
    count = max(2, math.ceil((length - overlap) / (tile - overlap)))
    size = min(tile, math.ceil((length + (count - 1) * overlap) / count))
    return size, positions(length, size, overlap) if size < length else [0]


def feather(size: int, before: int, after: int) -> np.ndarray:
    """Weights along one axis of a tile: `before`/`after` are the overlaps (in output pixels)
    with the previous/next tile (0 at the image border). Across an overlap of o pixels the
    weight is 0 for the outer quarter, rises linearly through the middle half and is 1 after,
    so the two tiles' weights sum to 1 wherever they overlap."""
    w = np.ones(size, dtype=np.float32)
    centres = np.arange(size, dtype=np.float32) + 0.5
    if before > 0:
        t = centres / before
        w = np.minimum(w, np.clip((t - 0.25) / 0.5, 0.0, 1.0))
    if after > 0:
        t = (size - centres) / after
        w = np.minimum(w, np.clip((t - 0.25) / 0.5, 0.0, 1.0))
    return np.maximum(w, 1e-4)  # never exactly 0: the sum of weights is always positive


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch  # heavy: only once something failed (and a tensor function ran, so torch is loaded)

    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                               or "not enough memory" in text)


@dataclass
class TileReport:
    done: int
    total: int
    tile: int


def tile_once(fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int, tile: int,
              overlap: int, on_tile: Callable[[TileReport], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> np.ndarray:
    """Run `fn` on tiles of `image` (1, C, H, W, values in [0, 1]) and blend the outputs.

    `fn` maps a (1, C, h, w) tile to (1, C', h*scale, w*scale). Returns an (H*s, W*s, C')
    uint8 array. `tile` <= 0 means one pass over the whole image."""
    _, _, height, width = image.shape
    if tile <= 0 or (tile >= height and tile >= width):
        if cancelled and cancelled():
            raise Cancelled()
        out = fn(image)
        if on_tile:
            on_tile(TileReport(1, 1, 0))
        return _to_uint8(out[0])
    th, ys = layout(height, tile, overlap)
    tw, xs = layout(width, tile, overlap)
    total, done = len(ys) * len(xs), 0
    result: np.ndarray | None = None
    band: torch.Tensor | None = None  # weighted sum of the current row, plus a weight channel
    band_top = 0  # output row of band[0]
    finished = 0  # output rows already written to `result`
    for row, y in enumerate(ys):
        top = y * scale
        height_out = th * scale
        before_y = (ys[row - 1] + th - y) * scale if row > 0 else 0
        after_y = (y + th - ys[row + 1]) * scale if row + 1 < len(ys) else 0
        wy = feather(height_out, before_y, after_y)
        new_band: torch.Tensor | None = None
        for col, x in enumerate(xs):
            if cancelled and cancelled():
                raise Cancelled()
            out = fn(image[:, :, y:y + th, x:x + tw])[0].float().cpu()
            channels, out_h, out_w = out.shape
            if (out_h, out_w) != (th * scale, tw * scale):
                raise ValueError(f"the model returned {out_w}x{out_h} for a {tw}x{th} tile, "
                                 f"expected {scale}x")
            if result is None:
                result = np.empty((height * scale, width * scale, channels), dtype=np.uint8)
            if new_band is None:
                new_band = out.new_zeros(channels + 1, height_out, width * scale)
                if band is not None:  # carry over what the previous row left in the overlap
                    keep = band_top + band.shape[1] - top
                    if keep > 0:
                        new_band[:, :keep] = band[:, top - band_top:]
            before_x = (xs[col - 1] + tw - x) * scale if col > 0 else 0
            after_x = (x + tw - xs[col + 1]) * scale if col + 1 < len(xs) else 0
            weight = out.new_tensor(np.outer(wy, feather(tw * scale, before_x, after_x)))
            left = x * scale
            new_band[:channels, :, left:left + out_w] += out * weight
            new_band[channels, :, left:left + out_w] += weight
            done += 1
            if on_tile:
                on_tile(TileReport(done, total, tile))
        band, band_top = new_band, top
        # rows before the next tile row are final
        limit = ys[row + 1] * scale if row + 1 < len(ys) else height * scale
        if limit > finished:
            part = band[:, finished - band_top:limit - band_top]
            result[finished:limit] = _to_uint8(part[:-1] / part[-1:])
            finished = limit
    assert result is not None
    return result


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int, tile: int,
              overlap: int, on_tile: Callable[[TileReport], None] | None = None,
              cancelled: Callable[[], bool] | None = None,
              min_tile: int = MIN_TILE) -> tuple[np.ndarray, int]:
    """`tile_once`, halving the tile (an untiled pass first becomes 512) on out-of-memory.
    Returns (output array, tile size that worked; 0 = untiled)."""
    while True:
        try:
            return tile_once(fn, image, scale, tile, overlap, on_tile, cancelled), tile
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            longest = max(image.shape[-2:])
            smaller = (min(512, longest // 2) if tile <= 0 or tile >= longest else tile // 2)
            if smaller < min_tile:
                raise
            log.warning("out of memory with tile size %s; retrying with %d", tile or "none", smaller)
            import torch  # heavy: only after running out of memory

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tile = smaller


def _to_uint8(chw: torch.Tensor) -> np.ndarray:
    scaled = (chw.float().clamp(0, 1) * 255.0).permute(1, 2, 0).cpu().numpy()
    return np.round(scaled).astype(np.uint8)  # half to even, as torch.round
