"""Control units: steering a generation with spatially aligned images (ControlNet, T2I-Adapter).

A `ControlUnit` is one unit of A1111's sd-webui-controlnet extension, with its field names:
an image, a preprocessor (`module`), a control model, and how strongly and when it acts.
`GenerationRequest.control_units` holds them; the UI and the API build them by name. Each
unit checks its own fields and names the bad one (`weight`, `guidance_end`, ...); whoever
builds several prefixes the unit (`controlnet.args[1].weight` in the API).

Torch-free, so the UI can import it. The preprocessors' table is `core.control_modules`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipelines.core.checks import RequestError, check_choice, check_flag, check_int, check_number, check_range_of

# sd-webui-controlnet's names, in its order (its API also accepts the index)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
NO_MODEL = "None"  # the model list's first entry: no control model
NO_MODULE = "none"  # the preprocessor that passes the image through as it is
DEFAULT_MAX_UNITS = 3  # units shown in the UI and accepted per request; --controlnet-max-units raises it

# field -> (minimum, maximum); the UI's sliders and the checks use the same table
UNIT_LIMITS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 2.0),
    "guidance_start": (0.0, 1.0),
    "guidance_end": (0.0, 1.0),
    "processor_res": (64, 2048),
}


@dataclass(frozen=True)
class ControlUnit:
    enabled: bool = True
    image: Image.Image | None = None  # None: the job's input image (img2img / inpaint)
    mask: Image.Image | None = None  # optional: white = where the unit acts (inpaint preprocessors)
    module: str = NO_MODULE  # the preprocessor (core.control_modules.PREPROCESSORS)
    model: str = NO_MODEL  # a name from the engine's control model list
    weight: float = 1.0
    guidance_start: float = 0.0  # the share of the steps before the unit starts acting
    guidance_end: float = 1.0  # ... and after which it stops
    control_mode: str = CONTROL_MODES[0]
    resize_mode: str = CONTROL_RESIZE_MODES[1]  # the extension's default: Crop and Resize
    pixel_perfect: bool = False  # preprocessor resolution from the output size instead of processor_res
    processor_res: int = 512
    threshold_a: float | None = None  # None: the preprocessor's default (core.control_modules)
    threshold_b: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "enabled", check_flag("enabled", self.enabled))
        set_(self, "pixel_perfect", check_flag("pixel_perfect", self.pixel_perfect))
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Image.Image):
                raise RequestError(name, "must be an image")
        for name in ("module", "model"):
            value = getattr(self, name)
            if value is None or value == "":
                set_(self, name, NO_MODULE if name == "module" else NO_MODEL)
            elif not isinstance(value, str):
                raise RequestError(name, "must be a name from the list")
        for name in ("weight", "guidance_start", "guidance_end"):
            set_(self, name, check_range_of(UNIT_LIMITS, name, check_number(name, getattr(self, name))))
        set_(self, "processor_res", check_int("processor_res", self.processor_res))
        check_range_of(UNIT_LIMITS, "processor_res", self.processor_res)
        if self.guidance_start > self.guidance_end:
            raise RequestError("guidance_start", f"must not be after guidance_end ({self.guidance_start:g} > "
                                                 f"{self.guidance_end:g})")
        set_(self, "control_mode", choice_by_name_or_index("control_mode", self.control_mode, CONTROL_MODES))
        set_(self, "resize_mode", choice_by_name_or_index("resize_mode", self.resize_mode, CONTROL_RESIZE_MODES))
        for name in ("threshold_a", "threshold_b"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, check_number(name, value))

    @property
    def active(self) -> bool:
        """Whether the unit does anything: enabled, with a model, and acting on some step."""
        return self.enabled and self.model != NO_MODEL and self.weight > 0 and self.guidance_end > 0

    def replace(self, **changes: Any) -> "ControlUnit":
        return dataclasses.replace(self, **changes)


def choice_by_name_or_index(field: str, value: Any, choices: tuple[str, ...]) -> str:
    """A choice given by name (any case) or by its index, as sd-webui-controlnet accepts both."""
    if isinstance(value, bool):
        raise RequestError(field, f"unknown value {value!r}; choose one of: {', '.join(choices)}")
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(choices):
        return choices[int(value)]
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
        aliases = {"resize": "Just Resize", "inner_fit": "Crop and Resize", "outer_fit": "Resize and Fill",
                   "prompt": "My prompt is more important", "control": "ControlNet is more important"}
        alias = aliases.get(value.strip().lower())
        if alias in choices:
            return alias
    check_choice(field, value, choices)
    return value  # not reached: check_choice raised


def check_units(units: Any, max_units: int | None = None) -> tuple[ControlUnit, ...]:
    """A request's units as a tuple; errors name `control_units[i]`."""
    if units is None:
        return ()
    if isinstance(units, ControlUnit) or not isinstance(units, (list, tuple)):
        raise RequestError("control_units", "must be a list of control units")
    for index, unit in enumerate(units):
        if not isinstance(unit, ControlUnit):
            raise RequestError(f"control_units[{index}]", "must be a control unit")
    if max_units is not None and len(units) > max_units:
        raise RequestError("control_units", f"at most {max_units} units are allowed, got {len(units)} "
                                            "(the server's --controlnet-max-units raises the limit)")
    return tuple(units)
