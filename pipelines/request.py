"""The one request object every entry point builds, validated in one place.

UI, REST API, CLI and extensions all construct a `GenerationRequest`; nothing is passed
by position. Limits live in `LIMITS` so the UI sliders and the validation agree.
This module stays free of torch so the UI can import it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from PIL import Image

from . import samplers

MODES = ("txt2img", "img2img", "inpaint")
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
INPAINT_FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111 order: 0..3
MAX_SEED = 2**32 - 1

# field -> (minimum, maximum); the UI builds its sliders from this table.
LIMITS: dict[str, tuple[float, float]] = {
    "steps": (1, 150),
    "cfg_scale": (1.0, 30.0),
    "width": (64, 2048),
    "height": (64, 2048),
    "batch_size": (1, 8),
    "batch_count": (1, 100),
    "denoising_strength": (0.0, 1.0),
    "subseed_strength": (0.0, 1.0),
    "mask_blur": (0, 64),
    "inpaint_full_res_padding": (0, 256),
    "clip_skip": (1, 12),
}


class RequestError(ValueError):
    """A bad request field; `field` names it so UI and API can point at it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GenerationRequest:
    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    schedule_type: str = "Automatic"
    width: int | None = None  # None: the checkpoint's native size
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    # img2img / inpaint
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: str = "just resize"
    mask: Image.Image | None = None  # white = repaint
    mask_blur: int = 4
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False  # "only masked"
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    # models
    checkpoint: str | None = None  # a name from the registry; None = server default
    vae: str | None = None
    clip_skip: int = 1
    # extension arguments keyed by extension id
    extension_args: Mapping[str, Any] = field(default_factory=dict)
    save_images: bool = True

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_text("prompt", self.prompt)
        _check_text("negative_prompt", self.negative_prompt)
        for name in ("seed", "subseed", "steps", "batch_size", "batch_count", "mask_blur",
                     "inpaint_full_res_padding", "clip_skip", "width", "height"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _check_int(name, getattr(self, name)))
        for name in ("seed", "subseed"):
            value = getattr(self, name)
            if not (value == -1 or 0 <= value <= MAX_SEED):
                raise RequestError(name, f"must be -1 (random) or between 0 and {MAX_SEED}, got {value}")
        for name in ("steps", "batch_size", "batch_count", "mask_blur", "inpaint_full_res_padding", "clip_skip"):
            _check_range(name, getattr(self, name))
        for name in ("cfg_scale", "denoising_strength", "subseed_strength"):
            _check_range(name, _check_number(name, getattr(self, name)))
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_range(name, value)
            if value % 8:
                raise RequestError(name, f"must be a multiple of 8, got {value}")
        _check_choice("sampler", self.sampler, samplers.SAMPLER_NAMES)
        _check_choice("schedule_type", self.schedule_type, samplers.SCHEDULE_TYPES)
        allowed = samplers.allowed_schedule_types(self.sampler)
        if self.schedule_type not in allowed:
            raise RequestError("schedule_type", f"{self.sampler} does not support the {self.schedule_type} "
                                                f"schedule; choose one of: {', '.join(allowed)}")
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        _check_choice("inpainting_fill", self.inpainting_fill, INPAINT_FILLS)
        if self.mode in ("img2img", "inpaint") and not isinstance(self.init_image, Image.Image):
            raise RequestError("init_image", f"{self.mode} needs an input image")
        if self.mode == "inpaint" and not isinstance(self.mask, Image.Image):
            raise RequestError("mask", "inpaint needs a mask (paint over the part to change)")
        for name in ("checkpoint", "vae"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RequestError(name, "must be a name from the model list")
        if not isinstance(self.extension_args, Mapping):
            raise RequestError("extension_args", "must be a mapping of extension id to arguments")
        object.__setattr__(self, "extension_args", MappingProxyType(dict(self.extension_args)))

    @property
    def images_total(self) -> int:
        return self.batch_size * self.batch_count

    def replace(self, **changes: Any) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def with_resolved_seeds(self) -> "GenerationRequest":
        """Draw the random seeds (-1) once, so every image and the infotext agree."""
        seed = self.seed if self.seed != -1 else random.randrange(MAX_SEED)
        subseed = self.subseed if self.subseed != -1 else random.randrange(MAX_SEED)
        return self.replace(seed=seed, subseed=subseed)


@dataclass
class GenerationResult:
    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # where each image was saved ("" when not)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    request: GenerationRequest | None = None


@dataclass(frozen=True)
class UpscaleRequest:
    image: Image.Image
    upscaler: str = "Lanczos"
    scale: float = 2.0
    target_width: int | None = None  # both set: resize to exactly this size instead of by scale
    target_height: int | None = None
    save_images: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.image, Image.Image):
            raise RequestError("image", "an input image is needed")
        scale = _check_number("scale", self.scale)
        if not 1.0 <= scale <= 8.0:
            raise RequestError("scale", f"must be between 1 and 8, got {scale}")
        if (self.target_width is None) != (self.target_height is None):
            raise RequestError("target_width", "give both target width and height, or neither")
        for name in ("target_width", "target_height"):
            value = getattr(self, name)
            if value is not None and not 8 <= _check_int(name, value) <= 8192:
                raise RequestError(name, f"must be between 8 and 8192, got {value}")


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(name, "must be text")


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # sliders and JSON clients send 20.0 for 20
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be a whole number, got {value!r}")
    return value


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(name, f"must be a number, got {value!r}")
    return float(value)


def _check_range(name: str, value: float) -> None:
    low, high = LIMITS[name]
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low:g} and {high:g}, got {value:g}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise RequestError(name, f"unknown value {value!r}; choose one of: {', '.join(choices)}")
