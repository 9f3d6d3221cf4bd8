"""Upscalers by name: the PIL resamplers and neural models from models/ESRGAN/ (spandrel).

An upscaler is anything with `name`, `scale` (its native factor, None for plain resamplers
that do any factor) and `upscale(image, scale) -> image`. A neural one runs its native
factor (repeatedly when more is asked) and may return a size that is not exactly `scale`
times; `upscale_image` fixes the size up, so every upscaler honours the same contract for
the UI, the API and hires fix.

Neural models: any architecture spandrel detects, from `.safetensors` or from `.pth`/`.pt`
read with `torch.load(weights_only=True)` only (spandrel's own loader uses a restricted
unpickler instead; we hand it the state dict). They run tile by tile (`tiling.run_tiled`).
`ModelUpscaler` objects are built by the engine from its registry listing; loaded models
live in a small `UpscalerModels` cache the engine owns, so this module holds no state.

No torch at import time: names and the plain resamplers need none. torch and spandrel load on first use.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from pipelines.core.request import RequestError, scaled_size
from pipelines.generate import tiling

log = logging.getLogger(__name__)

DEFAULT_TILE = 256
DEFAULT_OVERLAP = 16
MAX_PASSES = 3  # a 4x model asked for 8x runs twice, then resamples down


@runtime_checkable
class Upscaler(Protocol):
    name: str
    scale: float | None

    def upscale(self, image: Image.Image, scale: float) -> Image.Image: ...



@dataclass(frozen=True)
class PILUpscaler:
    """A plain Pillow resampler: any factor, no model."""

    name: str
    resample: Image.Resampling
    scale: float | None = None

    def upscale(self, image: Image.Image, scale: float) -> Image.Image:
        return image.resize(scaled_size(image.size, scale), self.resample)


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
        target_w, target_h = scaled_size(image.size, factor)

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


# --- neural upscalers (spandrel) ------------------------------------------------------------

class UpscalerLoadError(ValueError):
    """A model file that cannot be used as an upscaler (unsafe pickle, unknown architecture...)."""


def read_state_dict(path: Path, mmap: bool = False) -> dict:
    """Tensors of an upscaler file, by content: safetensors, else a torch pickle read with
    `torch.load(weights_only=True)`, never retried without it."""
    import torch  # heavy: this module stays torch-free at import (see the module doc)

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        from safetensors.torch import load_file  # heavy: imports torch

        try:
            return load_file(str(path))
        except Exception as exc:
            raise UpscalerLoadError(f"{path.name}: not a readable .safetensors file ({exc})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head[:2] == b"PK")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UpscalerLoadError(f"{path.name}: refused to load: not a plain weights file "
                                f"({type(exc).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise UpscalerLoadError(f"{path.name}: holds no state dict")
    return data


def _detect(state_dict: dict, name: str):
    import spandrel  # heavy, and optional until a neural upscaler is used

    try:
        descriptor = spandrel.MAIN_REGISTRY.load(spandrel.canonicalize_state_dict(state_dict))
    except spandrel.UnsupportedModelError:
        raise UpscalerLoadError(f"{name}: no architecture spandrel knows matches this file") from None
    except Exception as exc:
        raise UpscalerLoadError(f"{name}: could not be built ({type(exc).__name__}: {exc})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise UpscalerLoadError(f"{name}: is a {descriptor.architecture.name} {descriptor.purpose} model, "
                                "not an upscaler")
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise UpscalerLoadError(f"{name}: takes {descriptor.input_channels} channels; only RGB or grey work here")
    return descriptor


def load_model_file(path: Path):
    """A spandrel ImageModelDescriptor (on the CPU, eval mode) for an upscaler file."""
    return _detect(read_state_dict(path), Path(path).name).eval()


def describe_model_file(path: Path) -> dict:
    """Listing facts without loading weights: architecture and native scale (the model is
    built on the meta device, so this costs a header read and no allocation)."""
    import torch  # heavy: only when a model file is described

    state_dict = read_state_dict(path, mmap=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op"
            with torch.device("meta"):
                descriptor = _detect(state_dict, Path(path).name)
    except UpscalerLoadError as exc:
        if "could not be built" not in str(exc):
            raise
        # some architectures compute values while being built (e.g. drop-path rates with
        # .item()), which the meta device cannot: build this one for real, once
        descriptor = _detect(state_dict, Path(path).name)
    return {"architecture": descriptor.architecture.name, "scale": int(descriptor.scale),
            "tiling": descriptor.tiling.name.lower()}


class UpscalerModels:
    """Loaded upscaler models, least recently used dropped beyond `capacity`."""

    def __init__(self, device: Any = "cpu", capacity: int = 2,
                 loader: Callable[[Path], Any] = load_model_file):
        self.device = device
        self.capacity = capacity
        self.loader = loader
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path):
        import torch  # heavy: only when a model is loaded

        path = Path(path)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            descriptor = self.loader(path)
            device = torch.device(self.device)
            if device.type == "cuda" and getattr(descriptor, "supports_half", False):
                descriptor = descriptor.to(device, torch.float16)
            else:
                descriptor = descriptor.to(device)
            self._models[key] = descriptor
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return descriptor

    def loaded(self) -> list[str]:
        with self._lock:
            return [Path(k[0]).name for k in self._models]

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


@dataclass
class TileOptions:
    tile: int = DEFAULT_TILE  # 0: the whole image at once
    overlap: int = DEFAULT_OVERLAP
    on_tile: Callable[[Any], None] | None = None  # tiling.TileReport per tile
    cancelled: Callable[[], bool] | None = None


@dataclass
class ModelUpscaler:
    """A model file from the upscaler folder; loads through `models` on first use."""

    name: str
    path: Path
    scale: float | None
    models: UpscalerModels
    architecture: str | None = None
    options: TileOptions = field(default_factory=TileOptions)
    last_tile: int | None = None  # the tile size that worked last time (after OOM reductions)

    def with_options(self, options: TileOptions) -> "ModelUpscaler":
        return ModelUpscaler(self.name, self.path, self.scale, self.models, self.architecture, options)

    def upscale(self, image: Image.Image, scale: float) -> Image.Image:
        try:
            model = self.models.get(self.path)
        except UpscalerLoadError as exc:
            raise RequestError("upscaler", str(exc)) from None
        native = max(1, int(model.scale))
        passes = 1
        while native ** passes < scale - 1e-6 and passes < MAX_PASSES:
            passes += 1
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        out = image.convert("L" if model.input_channels == 1 else "RGB")
        for _ in range(passes):
            out = self._run(model, out)
        if alpha is not None:
            out = out.convert("RGBA")
            out.putalpha(alpha.resize(out.size, Image.Resampling.LANCZOS))
        return out

    def _run(self, model, image: Image.Image) -> Image.Image:
        import torch  # heavy: only when a model runs

        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[..., None]
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None].to(model.device, model.dtype)
        options = self.options
        tile = options.tile
        if getattr(model.tiling, "name", "") == "INTERNAL":
            tile = 0  # the model tiles itself
        minimum = max(tiling.MIN_TILE, int(getattr(model.size_requirements, "minimum", 0)))
        if 0 < tile < minimum:
            tile = minimum
        result, used = tiling.run_tiled(model, tensor, int(model.scale), tile, options.overlap,
                                        on_tile=options.on_tile, cancelled=options.cancelled,
                                        min_tile=minimum)
        self.last_tile = used
        if result.shape[-1] == 1:
            return Image.fromarray(result[..., 0], "L").convert("RGB")
        return Image.fromarray(result, "RGB")


def model_upscalers(files: Iterable[Any], models: UpscalerModels) -> list[ModelUpscaler]:
    """Upscalers for registry ModelFiles of the esrgan kind; unusable files are left out."""
    result = []
    for f in files:
        details = getattr(f, "details", {}) or {}
        if "error" in details:
            log.warning("upscaler %s left out: %s", f.name, details["error"])
            continue
        name = Path(f.name).with_suffix("").as_posix()
        result.append(ModelUpscaler(name=name, path=Path(f.path), scale=details.get("scale"), models=models,
                                    architecture=details.get("architecture")))
    return result


def blend(first: Image.Image, second: Image.Image, weight: float) -> Image.Image:
    """`second` mixed into `first` with `weight` (0: only first, 1: only second)."""
    if second.size != first.size:
        second = second.resize(first.size, Image.Resampling.LANCZOS)
    mode = "RGBA" if "A" in first.getbands() else "RGB"
    return Image.blend(first.convert(mode), second.convert(mode), float(weight))
