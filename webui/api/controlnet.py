"""sd-webui-controlnet's units in A1111 request bodies: `alwayson_scripts.controlnet.args` ->
`GenerationRequest.control_units`.

Clients send `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` (the key in any case)
with the extension's field names: `image` (or `input_image`: base64, a data: URL, an
{"image", "mask"} object or an [image, mask] pair), `mask` (or `mask_image`), `module`,
`model` (a listed title "name [hash]", a file name or a stem: the hash may be the old style
the extension used), `weight`, `resize_mode`, `processor_res`, `threshold_a`, `threshold_b`,
`guidance_start`, `guidance_end`, `control_mode`, `pixel_perfect`; names or indices where the
extension accepts both, -1 for "the preprocessor's default". A unit with `enabled: false` is
dropped. Fields with no effect here are accepted and named once in the warnings.

Every bad field is a 422 naming `controlnet.args[<i>].<field>`, `i` the unit's place in `args`;
`api_field` maps the engine's later `control_units[<j>]...` errors back to the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image

from pipelines.core.checks import RequestError, check_flag
from pipelines.core.control import NO_MODEL, NO_MODULE, ControlUnit
from pipelines.core.control_infotext import control_model_title, match_control_model
from pipelines.core.control_modules import find_preprocessor, unit_thresholds
from pipelines.core.engine_api import EngineAPI, ModelFileInfo
from pipelines.core.uploads import UploadLimits

from .errors import bad_field
from .images import decode_image

SCRIPT_NAME = "controlnet"  # the alwayson_scripts key, any case ("ControlNet" is the script's title)
ARGS_FIELD = f"{SCRIPT_NAME}.args"

# the extension's older names for some fields (its `ext_compat_keys`, and Forge's mask_image)
ALIASES = {"input_image": "image", "mask_image": "mask", "lowvram": "low_vram", "guidance": "guidance_end"}
UNIT_FIELDS = ("enabled", "module", "model", "weight", "resize_mode", "processor_res", "threshold_a",
               "threshold_b", "guidance_start", "guidance_end", "control_mode", "pixel_perfect")
# fields the extension has that change nothing here, with the value that needs no warning
NO_EFFECT = {"low_vram": False, "hr_option": "Both", "save_detected_map": False, "inpaint_crop_input_image": True,
             "is_ui": False, "input_mode": "simple", "batch_images": "", "output_dir": "", "loopback": False,
             "advanced_weighting": None, "effective_region_mask": None, "ipadapter_input": None,
             "pulid_mode": "Fidelity", "guess_mode": False}
_REQUEST_FIELD_RE = re.compile(r"^control_units(?:\[(\d+)\])?(.*)$")


@dataclass(frozen=True)
class ApiUnits:
    units: tuple[ControlUnit, ...] = ()
    arg_indices: tuple[int, ...] = ()  # each unit's index in `args` (disabled ones are dropped)


def arg_field(index: int, field: str | None = None) -> str:
    return f"{ARGS_FIELD}[{index}]" + (f".{field}" if field else "")


def api_field(request_field: str, arg_indices: tuple[int, ...]) -> str | None:
    """`control_units[j].weight` (a GenerationRequest / engine error) -> `controlnet.args[i].weight`;
    None for a field that is not about control units."""
    match = _REQUEST_FIELD_RE.match(request_field or "")
    if match is None:
        return None
    if match.group(1) is None:
        return ARGS_FIELD + match.group(2)
    index = int(match.group(1))
    return arg_field(arg_indices[index] if index < len(arg_indices) else index) + match.group(2)


def split_scripts(scripts: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """(the controlnet entry or None, the other alwayson_scripts)."""
    ours, others = None, {}
    for name, value in (scripts or {}).items():
        if isinstance(name, str) and name.strip().lower() == SCRIPT_NAME:
            ours = value
        else:
            others[name] = value
    return ours, others


def _args(value: Any) -> list:
    args = value.get("args", []) if isinstance(value, Mapping) else value
    if args is None:
        return []
    if not isinstance(args, (list, tuple)):
        raise bad_field(ARGS_FIELD, "must be a list of ControlNet units (objects)")
    return list(args)


def _renamed(index: int, raw: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The unit's fields under their own names, and {own name: the key the client sent}."""
    if not isinstance(raw, Mapping):
        raise bad_field(arg_field(index), "must be an object with the ControlNet unit's fields")
    values: dict[str, Any] = {}
    sent: dict[str, str] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name in values and value not in (None, "") and values[name] not in (None, ""):
            raise bad_field(arg_field(index, key), f"give either {sent[name]!r} or {key!r}, not both")
        if name not in values or value not in (None, ""):
            values[name], sent[name] = value, key
    return values, sent


def is_enabled(index: int, raw: Any) -> bool:
    if not isinstance(raw, Mapping):
        return True  # not a unit: _renamed names it
    try:
        enabled = raw.get("enabled")
        return True if enabled is None else check_flag("enabled", enabled)  # absent or null: on, as the extension
    except RequestError as exc:
        raise bad_field(arg_field(index, "enabled"), exc.message) from None


def _decode(field: str, value: Any, limits: UploadLimits) -> Image.Image | None:
    return None if value is None or value == "" else decode_image(field, value, limits)


def unit_images(index: int, values: Mapping[str, Any], sent: Mapping[str, str], limits: UploadLimits,
                warnings: list[str]) -> tuple[Image.Image | None, Image.Image | None]:
    """(image, mask) from the forms the extension accepts; None where there is none."""
    image_key, mask_key = sent.get("image", "image"), sent.get("mask", "mask")
    image, mask = values.get("image"), values.get("mask")
    if isinstance(image, (list, tuple)):
        if image and isinstance(image[0], Mapping):  # [{"image", "mask"}, ...]: several inputs
            if len(image) > 1:
                warnings.append(f"{arg_field(index, image_key)}: only the first of {len(image)} images is used")
            image = image[0]
        elif len(image) == 2:  # [image, mask]
            image = {"image": image[0], "mask": image[1]}
        else:
            raise bad_field(arg_field(index, image_key), "must be an image, {\"image\", \"mask\"} or [image, mask]")
    if isinstance(image, Mapping):
        decoded = _decode(arg_field(index, f"{image_key}.image"), image.get("image"), limits)
        inner_mask = _decode(arg_field(index, f"{image_key}.mask"), image.get("mask"), limits)
        if decoded is None and inner_mask is not None:
            raise bad_field(arg_field(index, f"{image_key}.image"), "a mask needs its image")
        return decoded, inner_mask.convert("L") if inner_mask is not None else None
    decoded = _decode(arg_field(index, image_key), image, limits)
    mask_image = _decode(arg_field(index, mask_key), mask, limits)
    return decoded, mask_image.convert("L") if mask_image is not None else None


def find_control_model(engine: EngineAPI, name: str) -> ModelFileInfo | None:
    """The listed control model `name` means (`control_infotext.match_control_model`)."""
    for refresh in (False, True):  # a file dropped in since the last listing is found on the second look
        file = match_control_model(engine.control_models(refresh=refresh), name)
        if file is not None:
            return file
    return None


def resolve_model(engine: EngineAPI, field: str, value: Any) -> str:
    """The listed file name of the unit's model, or NO_MODEL; a 422 naming `field` otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", NO_MODEL.lower())):
        return NO_MODEL
    if not isinstance(value, str):
        raise bad_field(field, f"must be a model name from GET /controlnet/model_list, got {value!r}")
    file = find_control_model(engine, value)
    if file is None:
        titles = [control_model_title(f) for f in engine.control_models() if not f.details.get("error")]
        listed = ", ".join(titles) if titles else "none (put ControlNet / T2I-Adapter files in models/ControlNet)"
        raise bad_field(field, f"unknown control model {value!r}; available: {listed}")
    if file.details.get("error"):
        raise bad_field(field, f"{file.name} is not a usable control model: {file.details['error']}")
    return file.name


def check_module(engine: EngineAPI, field: str, value: Any) -> str:
    """The preprocessor's name (clients may send its label); a 422 for an unknown one or one
    whose weights this machine lacks (the message says which file goes where)."""
    try:
        name = find_preprocessor(value if value is not None else NO_MODULE).name
    except RequestError as exc:
        raise bad_field(field, exc.message) from None
    status = next((row for row in engine.control_preprocessors() if row.get("name") == name), None)
    if status is not None and not status.get("available", True):
        raise bad_field(field, status.get("missing") or f"{name} is not available on this server")
    return name


def _fallback(value: Any) -> Any:
    """-1 (any negative number) means the preprocessor's default, as in the extension."""
    negative = isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
    return None if negative else value


def parse_unit(engine: EngineAPI, index: int, raw: Mapping[str, Any], *, has_init_image: bool,
               limits: UploadLimits, ignored: dict[str, set[int]], warnings: list[str]) -> ControlUnit:
    """One enabled unit of `args` as a ControlUnit; a 422 naming `controlnet.args[index].<field>`."""
    values, sent = _renamed(index, raw)
    for key, value in values.items():
        if key in NO_EFFECT and value != NO_EFFECT[key] and value not in (None, "", 0, "0"):
            ignored.setdefault(sent[key], set()).add(index)
        elif key not in (*UNIT_FIELDS, "image", "mask", *NO_EFFECT):
            ignored.setdefault(sent[key], set()).add(index)
    fields = {name: values[name] for name in UNIT_FIELDS if values.get(name) is not None}
    for name in ("processor_res", "threshold_a", "threshold_b"):
        if name in fields and _fallback(fields[name]) is None:
            del fields[name]
    fields["module"] = check_module(engine, arg_field(index, sent.get("module", "module")), values.get("module"))
    fields["model"] = resolve_model(engine, arg_field(index, sent.get("model", "model")), values.get("model"))
    fields["image"], fields["mask"] = unit_images(index, values, sent, limits, warnings)
    try:
        unit = ControlUnit(**fields)
        unit_thresholds(unit)  # each threshold within its module's slider
    except RequestError as exc:
        raise bad_field(arg_field(index, sent.get(exc.field, exc.field)), exc.message) from None
    if unit.model == NO_MODEL:
        warnings.append(f"{arg_field(index, 'model')}: no control model chosen; the unit has no effect")
    elif unit.image is None and not has_init_image:
        raise bad_field(arg_field(index, sent.get("image", "image")),
                        "the unit needs an image (base64 PNG/JPEG/WebP); only img2img falls back on its input")
    return unit


def control_units(engine: EngineAPI, value: Any, *, has_init_image: bool, limits: UploadLimits,
                  warnings: list[str]) -> ApiUnits:
    """The enabled units of `alwayson_scripts.controlnet` (None: no units), checked."""
    args = _args(value)
    enabled = [index for index, raw in enumerate(args) if raw is not None and is_enabled(index, raw)]
    limit = engine.max_control_units
    if len(enabled) > limit:
        raise bad_field(arg_field(enabled[limit]), f"at most {limit} enabled ControlNet units per request on this "
                                                   f"server (its --controlnet-max-units); got {len(enabled)}")
    ignored: dict[str, set[int]] = {}
    units = tuple(parse_unit(engine, index, args[index], has_init_image=has_init_image, limits=limits,
                             ignored=ignored, warnings=warnings) for index in enabled)
    if ignored:
        listed = ", ".join(f"{key} (args {', '.join(map(str, sorted(at)))})" for key, at in ignored.items())
        warnings.append(f"{ARGS_FIELD}: accepted but no effect on this server: {listed}")
    return ApiUnits(units, tuple(enabled))
