"""Face alignment: a face's five landmarks onto the FFHQ 512x512 template, and back.

GFPGAN, CodeFormer and RestoreFormer were trained on FFHQ faces, cropped so the eyes, nose
and mouth corners sit at the same five points. A detected face is warped there by the
similarity transform (rotation, uniform scale, shift) that best maps its landmarks onto the
template (least squares), restored, and warped back by the inverse transform; the paste mask
is the same feathered square as a face box's (`feather_mask`, the one home of feathering),
warped along, so everything outside the warped square stays exactly as it was.

Torch-free; cv2 (heavy) loads on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

FACE_SIZE = 512  # what GFPGAN, CodeFormer and RestoreFormer were trained on
FEATHER = 0.12  # the paste mask fades in over this fraction of the face square's side
# FFHQ's five points at 512x512 (left eye, right eye, nose tip, left and right mouth corner), as
# facexlib's face helper uses them for GFPGAN and CodeFormer
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])
OUTSIDE_GRAY = (135, 133, 132)  # what the warped face shows where it leaves the picture (facexlib's border)


@dataclass(frozen=True, eq=False)
class Face:
    """A found face: its box (left, top, width, height) in pixels, the detector's score, and its
    five landmarks ((5, 2) array: eyes, nose, mouth corners) when the detector gives them."""

    box: tuple[float, float, float, float]
    score: float | None = None
    landmarks: np.ndarray | None = None


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix [[a, -b, tx], [b, a, ty]] that maps `source` points onto `target` points
    with the least squared error (rotation, uniform scale and shift; no shear, no mirroring)."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need two matching (n >= 2, 2) point sets, got {source.shape} and {target.shape}")
    x, y = source[:, 0], source[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    # x' = a x - b y + tx ; y' = b x + a y + ty, stacked as one linear system in (a, b, tx, ty)
    system = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(system, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(n, 2) points through a 2x3 affine matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], 1)


def alignment(landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The picture -> face-square transform for a face's five landmarks (the template at `size`)."""
    return similarity_transform(landmarks, FFHQ_TEMPLATE * (size / FACE_SIZE))


def feather_mask(side: int) -> Image.Image:
    """An "L" mask of side x side: 255 inside, fading linearly to 0 over FEATHER of the side at the edges."""
    ramp = max(1.0, side * FEATHER)
    distance = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32) + 0.5
    edge = np.clip(distance / ramp, 0.0, 1.0)
    return Image.fromarray((np.minimum.outer(edge, edge) * 255).round().astype(np.uint8), "L")


def for_resized_source(matrix: np.ndarray, ratio: float | tuple[float, float]) -> np.ndarray:
    """`matrix` for its source image resized by `ratio` ((x, y) or both; pixel centres kept: a
    resized pixel u' sits at u = (u' + 0.5) / ratio - 0.5 in the original)."""
    ratios = np.broadcast_to(np.asarray(ratio, dtype=np.float64), (2,))
    linear = matrix[:, :2]
    shift = matrix[:, 2] + linear @ (0.5 / ratios - 0.5)
    return np.concatenate([linear / ratios, shift[:, None]], 1)


def shrink_first(pixels: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """When `matrix` shrinks, resize the source by area first so the warp does not alias (a warp
    samples, it does not average); the matrix is adjusted to the resized source."""
    import cv2  # heavy: only when faces are restored

    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    height, width = pixels.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale >= 1 or size[0] >= width:
        return pixels, matrix
    ratios = (size[0] / width, size[1] / height)
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), for_resized_source(matrix, ratios)


def warp_face(image: Image.Image, matrix: np.ndarray, size: int = FACE_SIZE) -> Image.Image:
    """The size x size RGB face square that `matrix` (picture -> square) cuts out of `image`."""
    import cv2  # heavy: only when faces are restored

    pixels, matrix = shrink_first(np.asarray(image.convert("RGB")), matrix)
    flags = cv2.INTER_CUBIC if abs(np.linalg.det(matrix[:, :2])) > 1 else cv2.INTER_LINEAR
    warped = cv2.warpAffine(pixels, matrix, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=OUTSIDE_GRAY)
    return Image.fromarray(warped, "RGB")


def paste_aligned(image: Image.Image, restored: Image.Image, matrix: np.ndarray) -> Image.Image:
    """`restored` (the face square, any size) warped back into `image` by the inverse of `matrix`
    (picture -> square at FACE_SIZE) through the warped feathered mask; outside the warped square the
    pixels are unchanged. The mode and any alpha of `image` are kept."""
    import cv2  # heavy: only when faces are restored

    side = restored.width
    inverse = for_resized_source(invert_transform(matrix), side / FACE_SIZE)  # square -> picture
    face = np.concatenate([np.asarray(restored.convert("RGB"), dtype=np.float32),
                           np.asarray(feather_mask(side), dtype=np.float32)[:, :, None]], 2)
    face, inverse = shrink_first(face, inverse)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    back = cv2.warpAffine(face, inverse, (image.width, image.height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    weight = np.clip(back[:, :, 3:] / 255.0, 0.0, 1.0)
    mixed = np.where(weight > 0, back[:, :, :3] * weight + base * (1 - weight), base)
    out = Image.fromarray(np.clip(mixed, 0, 255).round().astype(np.uint8), "RGB")
    if image.mode == "RGBA":
        out.putalpha(image.getchannel("A"))
    elif image.mode != "RGB":
        out = out.convert(image.mode)
    return out
