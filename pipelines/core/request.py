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

from pipelines.core import samplers
from pipelines.core.checks import (
    RequestError,
    check_choice,
    check_flag,
    check_int,
    check_number,
    check_text,
)
from pipelines.core.control import ControlUnit, check_units
from pipelines.core.limits import LIMITS, in_limits  # noqa: F401 - re-exported: the UI's sliders read them here
from pipelines.core.limits import check_limit as _check_range
from pipelines.core.module_choice import check_text_encoders
from pipelines.core.regions import DEFAULT_BASE_RATIO, Region, checked_request_regions
from pipelines.core.result import GenerationResult  # noqa: F401 - re-exported: callers take it with the request
from pipelines.core.save_formats import SaveOptions
from pipelines.core.upscale_request import UpscaleRequest, scaled_size  # noqa: F401 - re-exported with the request

MODES = ("txt2img", "img2img", "inpaint")
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
INPAINT_FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111 order: 0..3
MAX_SEED = 2**32 - 1
OUTPAINT_SIDES = ("outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down")

# The first choice of the hires fix's sampler, schedule type and checkpoint lists, in A1111's
# words: "the first pass's". A request's hr_sampler / hr_schedule_type set to one means None.
HR_SAME_SAMPLER = "Use same sampler"
HR_SAME_SCHEDULER = "Use same scheduler"
HR_SAME_CHECKPOINT = "Use same checkpoint"
# A1111's latent upscale modes for hires fix: name -> (torch interpolate mode, antialias).
# The first pass's latents are interpolated; any other hires upscaler name is a pixel upscaler.
LATENT_UPSCALE_MODES: Mapping[str, tuple[str, bool]] = MappingProxyType({
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
})
HR_DEFAULT_UPSCALER = "Latent"


@dataclass(frozen=True)
class GenerationRequest:
    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    # "Resize seed from": the noise of this size, centred (A1111); 0 (or any value <= 0): off
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    steps: int = 20
    cfg_scale: float = 7.0
    # flow models (SD 3.x, Flux): the schedule's timestep shift (Forge's "Shift"); None: the model's own
    shift: float | None = None
    # Flux dev's guidance input (Forge's "Distilled CFG Scale"); None: the model's default, 3.5
    distilled_cfg_scale: float | None = None
    # CFG cutoff (generate/guidance.py): steps that run without the negative prompt's pass
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0
    # DeepCache (generate/deep_cache.py): deep U-Net features reused between full steps
    deepcache_interval: int = 1
    deepcache_branch: int = 0
    deepcache_start: float = 0.2
    # token merging (generate/token_merging.py, A1111's "Token merging ratio"): 0 off
    token_merging_ratio: float = 0.0
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
    # soft inpainting (differential diffusion): a grey mask value is how much that pixel may change
    soft_inpainting: bool = False
    # outpainting: grow the input's canvas by this many pixels per side and paint the new area
    outpaint_left: int = 0
    outpaint_right: int = 0
    outpaint_up: int = 0
    outpaint_down: int = 0
    # models
    checkpoint: str | None = None  # a name from the registry; None = server default
    vae: str | None = None
    # Forge's "VAE / Text Encoder" pick: models/text_encoder files (SD 3, Flux) instead of the
    # automatic pairing; (): automatic. Checked against the listing and the family by the engine.
    text_encoders: tuple[str, ...] = ()
    clip_skip: int = 1
    tiling: bool = False  # seamless: circular padding in the U-Net and VAE for this job
    tiny_vae_decode: bool = False  # the final decode by TAESD of models/VAE-approx (generate/tiny_decode.py)
    # face restoration (GFPGAN / CodeFormer / RestoreFormer models): after decoding, before saving
    restore_faces: bool = False
    face_restorer: str | None = None  # a name from the engine's face_restorers(); None: the first one
    code_former_weight: float = 0.5
    # hires fix (txt2img): base pass at width x height, upscale, second img2img pass
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = HR_DEFAULT_UPSCALER  # a latent mode or an upscaler name (checked by the engine)
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_denoising_strength: float = 0.7
    hr_sampler: str | None = None  # None: the first pass's sampler
    hr_schedule_type: str | None = None
    hr_prompt: str = ""  # "": the first pass's prompt
    hr_negative_prompt: str = ""
    hr_checkpoint_name: str | None = None  # None (or HR_SAME_CHECKPOINT): the first pass's checkpoint
    # the refiner (A1111 1.6): the steps after refiner_switch_at (a share of them) run on this checkpoint
    refiner_checkpoint: str | None = None  # None (or "" / "None"): no refiner
    refiner_switch_at: float = 0.8
    # ControlNet / T2I-Adapter units (core.control): images that steer the denoising
    control_units: tuple[ControlUnit, ...] = ()
    # regional prompts (core.regions): boxes / masks with their own prompts, or the prompt's ADDCOL / ADDROW
    regions: tuple[Region, ...] = ()
    regional_mode: str = "Columns"  # the prompt syntax's first split (Regional Prompter's Matrix submode)
    regional_ratios: str = ""  # "1,1", "1,2,1;2,1,1"; "": equal parts
    regional_base_ratios: str = DEFAULT_BASE_RATIO  # with ADDBASE: the base prompt's share in each region
    # extension arguments keyed by extension id
    extension_args: Mapping[str, Any] = field(default_factory=dict)
    save_images: bool = True
    save_options: SaveOptions = SaveOptions()  # format, quality, file names: the server's settings when built

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_text("prompt", self.prompt)
        check_text("negative_prompt", self.negative_prompt)
        for name in ("seed", "subseed", "steps", "batch_size", "batch_count", "mask_blur",
                     "inpaint_full_res_padding", "clip_skip", "width", "height", "deepcache_interval",
                     "deepcache_branch", *OUTPAINT_SIDES):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(name, getattr(self, name)))
        for name in ("seed", "subseed"):
            value = getattr(self, name)
            if not (value == -1 or 0 <= value <= MAX_SEED):
                raise RequestError(name, f"must be -1 (random) or between 0 and {MAX_SEED}, got {value}")
        for name in ("steps", "batch_size", "batch_count", "mask_blur", "inpaint_full_res_padding", "clip_skip",
                     "deepcache_interval", "deepcache_branch", *OUTPAINT_SIDES):
            _check_range(name, getattr(self, name))
        for name in ("cfg_scale", "denoising_strength", "subseed_strength", "s_min_uncond", "skip_early_cond",
                     "deepcache_start", "token_merging_ratio"):
            _check_range(name, check_number(name, getattr(self, name)))
        for name in ("shift", "distilled_cfg_scale"):
            if getattr(self, name) is not None:
                _check_range(name, check_number(name, getattr(self, name)))
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_range(name, value)
            if value % 8:
                raise RequestError(name, f"must be a multiple of 8, got {value}")
        self._check_seed_resize()
        check_choice("sampler", self.sampler, samplers.SAMPLER_NAMES)
        check_choice("schedule_type", self.schedule_type, samplers.SCHEDULE_TYPES)
        allowed = samplers.allowed_schedule_types(self.sampler)
        if self.schedule_type not in allowed:
            raise RequestError("schedule_type", f"{self.sampler} does not support the {self.schedule_type} "
                                                f"schedule; choose one of: {', '.join(allowed)}")
        check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        check_choice("inpainting_fill", self.inpainting_fill, INPAINT_FILLS)
        if self.mode in ("img2img", "inpaint") and not isinstance(self.init_image, Image.Image):
            raise RequestError("init_image", f"{self.mode} needs an input image")
        if self.mode == "inpaint" and not isinstance(self.mask, Image.Image):
            raise RequestError("mask", "inpaint needs a mask (paint over the part to change)")
        for name in ("checkpoint", "vae"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RequestError(name, "must be a name from the model list")
        object.__setattr__(self, "text_encoders", check_text_encoders(self.text_encoders))
        if not isinstance(self.extension_args, Mapping):
            raise RequestError("extension_args", "must be a mapping of extension id to arguments")
        object.__setattr__(self, "extension_args", MappingProxyType(dict(self.extension_args)))
        for name in ("tiling", "soft_inpainting", "restore_faces", "s_min_uncond_all", "tiny_vae_decode"):
            object.__setattr__(self, name, check_flag(name, getattr(self, name)))
        if self.outpaints:
            grown = next(n for n in OUTPAINT_SIDES if getattr(self, n))
            if self.mode == "txt2img":
                raise RequestError(grown, "outpainting grows an input image: use img2img or inpaint")
            width, height, _ = self.outpaint_canvas()
            if not (in_limits("width", width) and in_limits("height", height)):
                raise RequestError(grown, f"the canvas would be {width}x{height}; each side must be between "
                                          f"{LIMITS['width'][0]} and {LIMITS['width'][1]}")
        if self.soft_inpainting and self.mode != "inpaint":
            raise RequestError("soft_inpainting", "is for inpaint: a mask's grey values say how much pixels change")
        if self.face_restorer is not None and not isinstance(self.face_restorer, str):
            raise RequestError("face_restorer", "must be a name from the face restorer list")
        _check_range("code_former_weight", check_number("code_former_weight", self.code_former_weight))
        self._check_hires()
        self._check_other_checkpoints()
        object.__setattr__(self, "control_units", check_units(self.control_units))
        object.__setattr__(self, "regions", checked_request_regions(self))
        if not isinstance(self.save_options, SaveOptions):
            raise RequestError("save_options", "must be the server's save settings (SaveOptions)")

    def _check_other_checkpoints(self) -> None:
        """refiner_checkpoint, hr_checkpoint_name: a model name, or None for "none" / "the first pass's"."""
        for name, off in (("refiner_checkpoint", ("", "None", "none")),
                          ("hr_checkpoint_name", ("", HR_SAME_CHECKPOINT))):
            value = getattr(self, name)
            if value in off:
                object.__setattr__(self, name, None)
            elif value is not None and not isinstance(value, str):
                raise RequestError(name, "must be a name from the model list")
        _check_range("refiner_switch_at", check_number("refiner_switch_at", self.refiner_switch_at))

    def _check_seed_resize(self) -> None:
        """Values <= 0 mean off (A1111's API sends -1) and become 0; a size needs both sides."""
        sides = ("seed_resize_from_w", "seed_resize_from_h")
        for name in sides:
            value = check_int(name, getattr(self, name))
            object.__setattr__(self, name, max(value, 0))
            if value > 0:
                _check_range(name, value)
                if value < 8:
                    raise RequestError(name, f"must be 0 (off) or at least 8 pixels, got {value}")
        width, height = (getattr(self, name) for name in sides)
        if (width > 0) != (height > 0):
            unset = sides[1] if width > 0 else sides[0]
            raise RequestError(unset, "resizing the seed needs both a width and a height; "
                                      "set this one too, or set both to 0 to turn it off")

    def _check_hires(self) -> None:
        if not isinstance(self.enable_hr, bool):
            if self.enable_hr in (0, 1):
                object.__setattr__(self, "enable_hr", bool(self.enable_hr))
            else:
                raise RequestError("enable_hr", f"must be true or false, got {self.enable_hr!r}")
        for name in ("hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
            _check_range(name, getattr(self, name))
        for name in ("hr_scale", "hr_denoising_strength"):
            _check_range(name, check_number(name, getattr(self, name)))
        for name in ("hr_prompt", "hr_negative_prompt", "hr_upscaler"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, "" if name != "hr_upscaler" else HR_DEFAULT_UPSCALER)
            check_text(name, getattr(self, name))
        if not self.hr_upscaler.strip():
            object.__setattr__(self, "hr_upscaler", HR_DEFAULT_UPSCALER)
        sampler = self.hr_sampler
        if sampler in ("", HR_SAME_SAMPLER):
            object.__setattr__(self, "hr_sampler", None)
        elif sampler is not None:
            check_choice("hr_sampler", sampler, samplers.SAMPLER_NAMES)
        schedule = self.hr_schedule_type
        if schedule in ("", HR_SAME_SCHEDULER):
            schedule = None
            object.__setattr__(self, "hr_schedule_type", None)
        if schedule is not None:
            check_choice("hr_schedule_type", schedule, samplers.SCHEDULE_TYPES)
        if schedule is not None and self.enable_hr:  # a disabled hires fix never blocks a request
            sampler = self.hr_sampler or self.sampler
            allowed = samplers.allowed_schedule_types(sampler)
            if schedule not in allowed:
                raise RequestError("hr_schedule_type", f"{sampler} does not support the {schedule} "
                                                       f"schedule; choose one of: {', '.join(allowed)}")
        if self.enable_hr:
            if self.mode != "txt2img":
                raise RequestError("enable_hr", "hires fix is for txt2img; use img2img to upscale an image")
            if self.width is not None and self.height is not None:
                width, height = self.hires_size(self.width, self.height)
                low, high = LIMITS["hr_size"]
                for name, value in (("hr_resize_x", width), ("hr_resize_y", height)):
                    if not low <= value <= high:
                        raise RequestError(name if (self.hr_resize_x or self.hr_resize_y) else "hr_scale",
                                           f"the hires size would be {width}x{height}; each side must be "
                                           f"between {low} and {high}")

    def __getstate__(self) -> dict:
        # pickled when a ZeroGPU worker runs the request; a mappingproxy does not pickle
        return {**self.__dict__, "extension_args": dict(self.extension_args)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, extension_args=MappingProxyType(dict(state["extension_args"])))

    def size_for(self, native_resolution: int) -> tuple[int, int]:
        """(width, height) of the first pass: the request's, or the checkpoint's native
        resolution for a side it leaves None; an outpainting request's grown canvas."""
        if self.outpaints:
            return self.outpaint_canvas()[:2]
        return self.width or native_resolution, self.height or native_resolution

    def outpaint_canvas(self) -> tuple[int, int, tuple[int, int, int, int]]:
        """(width, height, (left, right, up, down)) of the grown canvas, as A1111's "Outpainting mk2"
        grows it: the input image's own size plus the sides, rounded up to multiples of 8 on a
        growing side (right / down when both sides of an axis grow)."""
        left, right, up, down = (getattr(self, name) for name in OUTPAINT_SIDES)
        width, height = self.init_image.width + left + right, self.init_image.height + up + down
        extra_w, extra_h = -width % 8, -height % 8
        right, left = (right + extra_w, left) if right or not left else (right, left + extra_w)
        down, up = (down + extra_h, up) if down or not up else (down, up + extra_h)
        return width + extra_w, height + extra_h, (left, right, up, down)

    def hires_size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size for a first pass of width x height (multiples of 8).

        hr_resize_x/y both set: exactly that size (the upscaled image is cropped to its aspect);
        one set: the other follows the aspect ratio; neither: width and height times hr_scale."""
        x, y = self.hr_resize_x, self.hr_resize_y
        if x and y:
            w, h = x, y
        elif x:
            w, h = x, x * height / width
        elif y:
            w, h = y * width / height, y
        else:
            w, h = width * self.hr_scale, height * self.hr_scale
        return max(8, int(w) // 8 * 8), max(8, int(h) // 8 * 8)

    @property
    def outpaints(self) -> bool:
        return any(getattr(self, name) for name in OUTPAINT_SIDES)

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


def img2img_steps(steps: int, strength: float) -> int:
    """How many of `steps` an img2img pass runs: the tail of the schedule that denoising
    strength selects (diffusers' convention, as A1111's)."""
    return min(int(steps * strength), steps)
