"""A control unit's image, made into the map its control model reads (the preprocessors).

`prepare_control_image` is one unit's whole preparation: it picks the image (the unit's own, or
the job's input image), runs the preprocessor at the unit's resolution (or the pixel-perfect
one), then fits the map to the output size with the unit's resize mode:
- "Just Resize" stretches it to width x height;
- "Crop and Resize" scales it to cover the output and crops the centre;
- "Resize and Fill" scales it to fit inside and fills the borders with the median colour of
  the map's edge (as sd-webui-controlnet does; an inpaint mask's border is filled as masked).

Built in, no weights: the rows of `core.control_modules` whose `needs` is None (canny, invert,
threshold, scribble_xdog, lineart_standard, blur, tile, shuffle, colour grid, recolor, inpaint).
Depth (MiDaS / DPT, Depth Anything) runs through transformers from a model folder (config.json,
weights, preprocessor_config.json) in models/ControlNet-annotators/<folder>/ or in A1111's
extensions/sd-webui-controlnet/annotator/downloads/<folder>/, offline. The other networks are
named with the files they need; a RequestError on `module` says which file goes where.

Inpaint ControlNet (modules "inpaint", "inpaint_only"): the map is the image with the masked
pixels black; what the model reads is `inpaint_control_tensor` (diffusers' convention: the
image in [0, 1] with masked pixels set to -1). `prepare_control_mask` fits the mask the same
way as the image.

Images here are RGB uint8 arrays (height, width, 3) between the PIL edges. cv2, torch and
transformers load on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core.checks import RequestError
from pipelines.core.control import CONTROL_RESIZE_MODES, ControlUnit
from pipelines.core.control_modules import (
    IMAGE_PROMPT_MODULES,
    INPAINT_MODULES,
    PREPROCESSORS,
    AnnotatorFiles,
    Preprocessor,
    find_preprocessor,
    pixel_perfect_resolution,
    resolve_resolution,
    resolve_thresholds,
)
from pipelines.core.settings import Paths

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = CONTROL_RESIZE_MODES
# where sd-webui-controlnet keeps its annotator weights, relative to the A1111 root (models/..)
A1111_DOWNLOADS = Path("extensions", "sd-webui-controlnet", "annotator", "downloads")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # either one is the weights file
MASKED = 128  # a mask pixel at or above this is masked (white: the part to repaint)


# --- where annotator weights live --------------------------------------------------------------

def annotator_folders(paths: Paths, needs: AnnotatorFiles) -> tuple[Path, Path]:
    """Ours (models/ControlNet-annotators/<folder>) first, then A1111's extension's."""
    return (paths.folder("annotators") / needs.folder,
            Path(paths.models_dir).parent / A1111_DOWNLOADS / needs.folder)


def _holds(folder: Path, needs: AnnotatorFiles) -> bool:
    for name in needs.files:
        alternatives = TRANSFORMERS_WEIGHTS if needs.transformers and name in TRANSFORMERS_WEIGHTS else (name,)
        if not any((folder / alternative).is_file() for alternative in alternatives):
            return False
    return True


def find_annotator(paths: Paths, needs: AnnotatorFiles) -> Path | None:
    return next((folder for folder in annotator_folders(paths, needs) if _holds(folder, needs)), None)


def _missing_message(row: Preprocessor, paths: Paths) -> str:
    needs = row.needs
    ours, a1111 = annotator_folders(paths, needs)
    files = ", ".join(needs.files)
    what = f"a transformers model folder ({files})" if needs.transformers else files
    message = (f"{row.name} needs {what} in {ours} (or in {a1111}, sd-webui-controlnet's folder); "
               f"get it from {needs.source}")
    expected = {*needs.files, *TRANSFORMERS_WEIGHTS}
    others = sorted(entry.name for folder in (ours, a1111) if folder.is_dir() for entry in folder.iterdir()
                    if entry.name not in expected)
    if needs.transformers and others:  # e.g. the extension's original .pt, which only its own code reads
        message += f" ({', '.join(others)} found there cannot be read: the transformers format is needed)"
    return message


def require_annotator(row: Preprocessor, paths: Paths) -> Path:
    """The folder holding `row`'s weights, or a RequestError on `module` saying which file goes where."""
    folder = find_annotator(paths, row.needs)
    if folder is None:
        raise RequestError("module", _missing_message(row, paths))
    if row.name not in NETWORKS:
        raise RequestError("module", f"{row.name}: its weights are in {folder}, but this preprocessor is not "
                                     "built in yet; make the map elsewhere and use the preprocessor 'none'")
    return folder


def preprocessor_status(paths: Paths) -> list[dict]:
    """Every preprocessor with whether it runs here: [{"name", "available", "missing"}]."""
    status = []
    for row in PREPROCESSORS.values():
        missing = ""
        if not row.built_in:
            try:
                require_annotator(row, paths)
            except RequestError as exc:
                missing = exc.message
        status.append({"name": row.name, "available": not missing, "missing": missing})
    return status


# --- the built-in preprocessors -------------------------------------------------------------------

def _cv2():
    import cv2  # optional at import time (opencv-python-headless): only when a map is made

    return cv2


def resize_short_side(image: np.ndarray, resolution: int | None) -> np.ndarray:
    """The image scaled so its short side is `resolution` (None: as it is)."""
    height, width = image.shape[:2]
    if resolution is None or min(height, width) == resolution:
        return image
    scale = resolution / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    cv2 = _cv2()
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return _gray_to_rgb(_cv2().Canny(image, int(low), int(high)))


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - image


def binarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """White where every channel is brighter than `threshold`, black elsewhere."""
    return _gray_to_rgb(np.where(image.min(axis=2) > threshold, 255, 0))


def scribble_xdog(image: np.ndarray, threshold: float) -> np.ndarray:
    """White lines where the image is darker than its blurred surroundings (difference of Gaussians)."""
    cv2 = _cv2()
    pixels = image.astype(np.float32)
    darkness = np.min(cv2.GaussianBlur(pixels, (0, 0), 5.0) - cv2.GaussianBlur(pixels, (0, 0), 0.5), axis=2)
    return _gray_to_rgb(np.where(2 * darkness > threshold, 255, 0))


def lineart_standard(image: np.ndarray) -> np.ndarray:
    """Dark strokes on a light ground as white lines on black, their strength normalised."""
    pixels = image.astype(np.float32)
    strength = np.min(_cv2().GaussianBlur(pixels, (0, 0), 6.0) - pixels, axis=2).clip(0, 255)
    visible = strength[strength > 8]
    scale = max(16.0, float(np.median(visible))) if visible.size else 16.0
    return _gray_to_rgb(strength / scale * 127)


def blur_gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    return _cv2().GaussianBlur(image, (0, 0), float(sigma))


def tile_resample(image: np.ndarray, rate: float) -> np.ndarray:
    """The image down-sampled by `rate` (below 1.1: as it is), for the tile model to add detail."""
    if rate < 1.1:
        return image
    height, width = image.shape[:2]
    cv2 = _cv2()
    return cv2.resize(image, (max(1, int(width / rate)), max(1, int(height / rate))), interpolation=cv2.INTER_AREA)


def _smooth_noise(height: int, width: int, rng: np.random.Generator, cell: int = 256) -> np.ndarray:
    """Two channels of smooth noise in [0, 1]: random values on a coarse grid, upscaled cubically."""
    cv2 = _cv2()
    coarse = rng.random((height // cell + 2, width // cell + 2, 2)).astype(np.float32)
    noise = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell:cell + height, cell:cell + width]
    low, high = noise.min(axis=(0, 1)), noise.max(axis=(0, 1))
    return (noise - low) / np.maximum(high - low, 1e-6)


def shuffle(image: np.ndarray, seed: int) -> np.ndarray:
    """The image's content moved along a random smooth flow: colours and textures kept, layout
    lost. The same seed gives the same shuffle."""
    height, width = image.shape[:2]
    flow = _smooth_noise(height, width, np.random.default_rng(seed))
    cv2 = _cv2()
    map_x, map_y = flow[..., 0] * (width - 1), flow[..., 1] * (height - 1)
    return cv2.remap(image, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT)


def color_grid(image: np.ndarray) -> np.ndarray:
    """The image's colours in 64-pixel cells (T2I-Adapter's colour model)."""
    height, width = image.shape[:2]
    cv2 = _cv2()
    cells = cv2.resize(image, (max(1, width // 64), max(1, height // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (width, height), interpolation=cv2.INTER_NEAREST)


def recolor(image: np.ndarray, gamma: float, channel: str) -> np.ndarray:
    """The image's lightness ("luminance": L of Lab) or brightness ("intensity": V of HSV) as grey,
    gamma-corrected: the recolor model paints the colours back."""
    cv2 = _cv2()
    code = cv2.COLOR_RGB2LAB if channel == "luminance" else cv2.COLOR_RGB2HSV
    index = 0 if channel == "luminance" else 2
    value = cv2.cvtColor(image, code)[:, :, index].astype(np.float32) / 255.0
    return _gray_to_rgb(np.power(value, float(gamma)) * 255.0)


def _mask_array(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The mask as booleans (True: masked) at `size` (width, height)."""
    gray = mask.convert("L")
    if gray.size != size:
        gray = gray.resize(size, Image.Resampling.NEAREST)
    return np.asarray(gray) >= MASKED


def masked_black(image: np.ndarray, mask: Image.Image | None, module: str) -> np.ndarray:
    """The inpaint map: the image with its masked pixels black (the -1 of the model's input, shown)."""
    if mask is None:
        raise RequestError("mask", f"{module} needs a mask: draw one (white where to repaint), or use the "
                                   "unit in the inpaint tab where the job's mask is used")
    result = image.copy()
    result[_mask_array(mask, (image.shape[1], image.shape[0]))] = 0
    return result


# name -> f(image at its resolution, threshold_a, threshold_b, mask, seed) -> map
BUILT_IN: dict[str, Callable[..., np.ndarray]] = {
    "none": lambda image, a, b, mask, seed: image,
    # image prompts: the CLIP vision encoder reads the image itself (generate/ip_adapter.py)
    **{name: (lambda image, a, b, mask, seed: image) for name in IMAGE_PROMPT_MODULES},
    "invert": lambda image, a, b, mask, seed: invert(image),
    "canny": lambda image, a, b, mask, seed: canny(image, a, b),
    "threshold": lambda image, a, b, mask, seed: binarize(image, a),
    "scribble_xdog": lambda image, a, b, mask, seed: scribble_xdog(image, a),
    "lineart_standard": lambda image, a, b, mask, seed: lineart_standard(image),
    "blur_gaussian": lambda image, a, b, mask, seed: blur_gaussian(image, a),
    "tile_resample": lambda image, a, b, mask, seed: tile_resample(image, a),
    "shuffle": lambda image, a, b, mask, seed: shuffle(image, seed),
    "color": lambda image, a, b, mask, seed: color_grid(image),
    "recolor_luminance": lambda image, a, b, mask, seed: recolor(image, a, "luminance"),
    "recolor_intensity": lambda image, a, b, mask, seed: recolor(image, a, "intensity"),
    **{name: (lambda image, a, b, mask, seed, name=name: masked_black(image, mask, name)) for name in INPAINT_MODULES},
}


# --- networks through transformers ----------------------------------------------------------

@lru_cache(maxsize=1)  # one depth model in memory at a time; unload_annotators() frees it
def _depth_model(folder: str, device: str):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation  # heavy: only for a depth map

    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise RequestError("module", f"the depth model in {folder} could not be loaded: {exc}") from None
    return processor, model.to(device).eval()


def unload_annotators() -> None:
    _depth_model.cache_clear()


def depth_map(image: np.ndarray, folder: Path, resolution: int | None, device: str = "cpu") -> np.ndarray:
    """Relative depth (near: white) at the image's size, from a transformers depth model."""
    import torch  # heavy: only for a depth map

    processor, model = _depth_model(str(folder), device)
    options = {}
    if resolution is not None:  # the processor's own rules (aspect ratio, size multiple) still apply
        options["size"] = {"height": resolution, "width": resolution}
    inputs = processor(images=Image.fromarray(image), return_tensors="pt", **options).to(device)
    with torch.inference_mode():
        predicted = model(**inputs).predicted_depth
    depth = torch.nn.functional.interpolate(predicted[:, None].float(), size=image.shape[:2], mode="bicubic",
                                            align_corners=False)[0, 0].cpu().numpy()
    low, span = float(depth.min()), float(depth.max() - depth.min())
    return _gray_to_rgb((depth - low) / span * 255.0 if span > 0 else np.zeros_like(depth))


NETWORKS = {"depth": depth_map, "depth_anything": depth_map, "depth_anything_v2": depth_map}


# --- one map, one unit ------------------------------------------------------------------------

def preprocess(image: Image.Image, module: str, resolution: int | None, threshold_a: float | None,
               threshold_b: float | None, *, paths: Paths, mask: Image.Image | None = None, seed: int = 0,
               device: str = "cpu") -> Image.Image:
    """The map `module` makes of `image` (RGB), at `resolution` on the short side where the module
    has that slider. None or -1 for a resolution or threshold means the module's default;
    `seed` makes shuffle repeatable. RequestError on `module` (unknown, or its weights missing),
    on a threshold out of its range, or on `mask` for an inpaint module without one."""
    row = find_preprocessor(module)
    resolution = resolve_resolution(row.name, resolution)
    low, high = resolve_thresholds(row.name, threshold_a, threshold_b)
    folder = None if row.built_in else require_annotator(row, paths)
    pixels = resize_short_side(np.asarray(image.convert("RGB")), resolution if row.built_in else None)
    if folder is not None:
        result = NETWORKS[row.name](pixels, folder, resolution, device)
    else:
        result = BUILT_IN[row.name](pixels, low, high, mask, seed)
    return Image.fromarray(np.ascontiguousarray(result, dtype=np.uint8), "RGB")


def _is_binary(image: Image.Image) -> bool:
    return bool(np.isin(np.asarray(image), (0, 255)).all())


def _scaled(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size`; a black-and-white map (edges, scribbles) stays black and white, and
    lines thinner than a pixel of the smaller map are kept."""
    if image.size == size:
        return image
    shrinking = size[0] * size[1] < image.size[0] * image.size[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    resized = image.resize(size, resample)
    if _is_binary(image):
        cut = 64 if shrinking else 128
        resized = resized.point(lambda value: 255 if value >= cut else 0)
    return resized


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    pixels = np.asarray(image)
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]], axis=0)
    return tuple(int(v) for v in np.atleast_1d(np.median(edges, axis=0)))


def fit_to_size(image: Image.Image, width: int, height: int, resize_mode: str,
                fill: tuple[int, ...] | int | None = None) -> Image.Image:
    """`image` fitted to width x height by sd-webui-controlnet's resize modes (see the module's
    docstring). `fill` replaces the median border colour of "Resize and Fill"."""
    if resize_mode not in CONTROL_RESIZE_MODES:
        raise RequestError("resize_mode", f"unknown value {resize_mode!r}; choose one of: "
                                          f"{', '.join(CONTROL_RESIZE_MODES)}")
    if resize_mode == JUST_RESIZE:
        return _scaled(image, (width, height))
    scales = (width / image.width, height / image.height)
    scale = min(scales) if resize_mode == RESIZE_AND_FILL else max(scales)
    scaled_w, scaled_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if resize_mode == CROP_AND_RESIZE:
        scaled_w, scaled_h = max(scaled_w, width), max(scaled_h, height)
        left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
        return _scaled(image, (scaled_w, scaled_h)).crop((left, top, left + width, top + height))
    scaled_w, scaled_h = min(scaled_w, width), min(scaled_h, height)
    colour = _border_colour(image) if fill is None else fill
    if isinstance(colour, tuple) and len(colour) == 1:
        colour = colour[0]  # a one-band image ("L") takes a plain number
    canvas = Image.new(image.mode, (width, height), colour)
    canvas.paste(_scaled(image, (scaled_w, scaled_h)), ((width - scaled_w) // 2, (height - scaled_h) // 2))
    return canvas


def unit_source(unit: ControlUnit, init_image: Image.Image | None) -> Image.Image:
    """The image a unit works on: its own, else the job's input image (img2img / inpaint)."""
    image = unit.image if unit.image is not None else init_image
    if image is None:
        raise RequestError("image", "the unit has no image: upload one, or use the unit in img2img or "
                                    "inpaint, where the job's input image is used")
    return image


def unit_mask(unit: ControlUnit, init_mask: Image.Image | None) -> Image.Image | None:
    """The unit's mask: its own, else the job's inpaint mask when the unit uses the job's image."""
    if unit.mask is not None:
        return unit.mask
    return init_mask if unit.image is None else None


def unit_resolution(unit: ControlUnit, image: Image.Image, width: int, height: int) -> int:
    if unit.pixel_perfect:
        return pixel_perfect_resolution(image.size, width, height, unit.resize_mode)
    return unit.processor_res


def prepare_control_image(unit: ControlUnit, width: int, height: int, init_image: Image.Image | None = None,
                          *, paths: Paths, init_mask: Image.Image | None = None, seed: int = 0,
                          device: str = "cpu") -> Image.Image:
    """The map the unit's control model reads, width x height, RGB: the UI's preview too."""
    image = unit_source(unit, init_image)
    detected = preprocess(image, unit.module, unit_resolution(unit, image, width, height), unit.threshold_a,
                          unit.threshold_b, paths=paths, mask=unit_mask(unit, init_mask), seed=seed, device=device)
    return fit_to_size(detected, width, height, unit.resize_mode)


def prepare_control_mask(unit: ControlUnit, width: int, height: int,
                         init_mask: Image.Image | None = None) -> Image.Image | None:
    """The unit's mask ("L", white = repaint) fitted like its image; "Resize and Fill"'s borders
    are masked, so the model paints them. None when the unit has no mask."""
    mask = unit_mask(unit, init_mask)
    if mask is None:
        return None
    binary = mask.convert("L").point(lambda value: 255 if value >= MASKED else 0)
    return fit_to_size(binary, width, height, unit.resize_mode, fill=255)


def inpaint_control_tensor(image: Image.Image, mask: Image.Image) -> np.ndarray:
    """What the inpaint ControlNet reads (diffusers' convention, as its inpaint examples build it):
    float32 (1, 3, height, width), the image's RGB in [0, 1] and -1 on every masked pixel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels = pixels.copy()
    pixels[_mask_array(mask, image.size)] = -1.0
    return pixels.transpose(2, 0, 1)[None]
