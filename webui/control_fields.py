"""The ControlNet units' and image prompts' components in the generation tabs: their names, and
UI values <-> ControlUnit.

Pure translations like `webui.convert` (no gradio, no torch); `convert.generation_request` and
`convert.ui_values_from_infotext` call these for the `controlnet_<i>_<field>` components and the
`image_prompt_<i>_<field>` ones (the "Image prompt (IP-Adapter)" accordion, `webui.tabs.image_prompts`).
An image prompt is a ControlUnit with an ip-adapter module (sd-webui-controlnet's way); the API's
`image_prompts` entries have the same fields and are translated by the same `image_prompt_unit`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

from PIL import Image

from pipelines.core import control_infotext, control_modules, infotext
from pipelines.core.control import NO_MODEL, NO_MODULE, ControlUnit
from pipelines.core.control_modules import IMAGE_PROMPT_MODULES
from pipelines.core.engine_api import ModelFileInfo
from pipelines.core.request import RequestError
from webui.images import flatten

# The one home of the unit components' names: unit i's component for a ControlUnit field is
# "controlnet_<i>_<field>" ("controlnet_0_weight"); "controlnet_<i>_use_input" is the UI-only
# "Use the img2img input" checkbox (the unit's image becomes None: the job's input image).
USE_INPUT = "use_input"
CONTROL_UNIT_FIELDS = frozenset(f.name for f in dataclasses.fields(ControlUnit)) | {USE_INPUT}
_CONTROL_NAME = re.compile(r"controlnet_(\d+)_(\w+)$")
_ENGINE_UNIT_FIELD = re.compile(r"control_units\[(\d+)\](?:\.(\w+))?$")  # how the engine names a unit's field
CONTROL_LABELS = {
    "enabled": "Enable", "image": "Control image", "mask": "Mask", "module": "Preprocessor", "model": "Model",
    "weight": "Control weight", "guidance_start": "Starting control step", "guidance_end": "Ending control step",
    "control_mode": "Control mode", "resize_mode": "Resize mode", "pixel_perfect": "Pixel Perfect",
    "processor_res": "Preprocessor resolution", "threshold_a": "Threshold A", "threshold_b": "Threshold B",
    USE_INPUT: "Use the img2img input",
}


def control_field(index: int, field: str) -> str:
    return f"controlnet_{index}_{field}"


def split_control_field(name: str) -> tuple[int, str] | None:
    """(unit index, ControlUnit field) of a unit component's name; None for any other name."""
    match = _CONTROL_NAME.match(name)
    if match is None or match.group(2) not in CONTROL_UNIT_FIELDS:
        return None
    return int(match.group(1)), match.group(2)


def unit_title(index: int) -> str:
    return f"ControlNet Unit {index}"


def control_unit_where(field: str) -> str | None:
    """"ControlNet Unit i: Label (field)" for a unit component's name or the engine's
    `control_units[i].field`, "Image prompt i: Label (field)" for an image prompt's component;
    None for a field of no unit."""
    if field == "control_units":
        return "ControlNet units and image prompts (control_units)"
    prompt = split_image_prompt_field(field)
    if prompt is not None:
        return f"{image_prompt_title(prompt[0])}: {IMAGE_PROMPT_LABELS[prompt[1]]} ({prompt[1]})"
    match = _ENGINE_UNIT_FIELD.match(field)
    found = (int(match.group(1)), match.group(2) or "") if match else split_control_field(field)
    if found is None:
        return None
    index, name = found
    label = CONTROL_LABELS.get(name)
    return f"{unit_title(index)}: {label} ({name})" if label else f"{unit_title(index)}: {name}".rstrip(": ")


def preprocessor_slider(module: str | None, slider: str) -> control_modules.Slider | None:
    """(label, minimum, maximum, default, step) of a preprocessor's slider ("processor_res",
    "threshold_a", "threshold_b") from core.control_modules; None when it has none."""
    preprocessor = known_preprocessor(module or NO_MODULE)
    if preprocessor is None:
        return None
    return getattr(preprocessor, "resolution" if slider == "processor_res" else slider)


def known_preprocessor(module: str) -> control_modules.Preprocessor | None:
    """The table's row for a name or a label ("depth_midas" is "depth"); None when unknown."""
    try:
        return control_modules.find_preprocessor(module)
    except RequestError:
        return None


def preprocessor_label(module: str) -> str:
    row = known_preprocessor(module)
    return row.label if row is not None else module


def control_units(unit_values: Mapping[int, Mapping[str, Any]]) -> tuple[ControlUnit, ...]:
    """The request's units from each UI unit's values, up to the last enabled one. A disabled
    unit before it keeps its place as `ControlUnit(enabled=False)`, so `control_units[i]` is
    UI unit i (the engine's errors and the infotext name it), and its values are not checked."""
    enabled = sorted(index for index, unit in unit_values.items() if unit.get("enabled"))
    if not enabled:
        return ()
    return tuple(control_unit(index, unit_values[index]) if index in enabled else ControlUnit(enabled=False)
                 for index in range(enabled[-1] + 1))


def control_unit(index: int, values: Mapping[str, Any]) -> ControlUnit:
    """One unit from its UI values by ControlUnit field; a bad value names the unit's component."""
    fields = {name: value for name, value in values.items() if name != USE_INPUT}
    image = fields.get("image")
    if values.get(USE_INPUT) or image is None:
        fields["image"] = None  # the job's input image
    elif isinstance(image, Image.Image) and image.mode != "RGB":
        fields["image"] = flatten(image)
    for slider in ("threshold_a", "threshold_b"):
        if slider in fields and preprocessor_slider(fields.get("module"), slider) is None:
            fields[slider] = None  # a hidden slider's last value: this preprocessor has no such threshold
    try:
        return ControlUnit(**fields)
    except RequestError as exc:
        raise RequestError(control_field(index, exc.field), exc.message) from None


# --- image prompts (IP-Adapter) ---------------------------------------------------------------------

IMAGE_PROMPT_MODULE = "ip-adapter-auto"  # the engine reads the image with the encoder whose widths fit
# an image prompt's fields (the UI's `image_prompt_<i>_<field>`, the API's `image_prompts[i].<field>`)
# and the ControlUnit field each becomes
IMAGE_PROMPT_FIELDS = {"image": "image", "model": "model", "weight": "weight", "start": "guidance_start",
                       "end": "guidance_end"}
IMAGE_PROMPT_LABELS = {"image": "Image", "model": "IP-Adapter model", "weight": "Weight", "start": "Start",
                       "end": "End"}
_UNIT_TO_PROMPT = {unit: prompt for prompt, unit in IMAGE_PROMPT_FIELDS.items()}
_PROMPT_NAME = re.compile(r"image_prompt_(\d+)_(\w+)$")
NO_ADAPTER_HELP = ("put IP-Adapter files (e.g. ip-adapter_sd15.safetensors) into {adapters} (or the ControlNet "
                   "folder) and the CLIP vision encoder they read into {encoders}")


def image_prompt_field(index: int, field: str) -> str:
    return f"image_prompt_{index}_{field}"


def split_image_prompt_field(name: str) -> tuple[int, str] | None:
    """(prompt index, field) of an image prompt component's name; None for any other name."""
    match = _PROMPT_NAME.match(name)
    if match is None or match.group(2) not in IMAGE_PROMPT_FIELDS:
        return None
    return int(match.group(1)), match.group(2)


def image_prompt_title(index: int) -> str:
    return f"Image prompt {index + 1}"


def image_prompt_unit(values: Mapping[str, Any]) -> ControlUnit:
    """One image prompt's ControlUnit from its fields by name; a RequestError names the prompt's own
    field (`image`, `model`, `weight`, `start`, `end`), which the caller prefixes."""
    unknown = sorted(set(values) - set(IMAGE_PROMPT_FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; an image prompt has {', '.join(IMAGE_PROMPT_FIELDS)}")
    fields = {IMAGE_PROMPT_FIELDS[name]: value for name, value in values.items() if value is not None}
    if fields.get("image") is None:
        raise RequestError("image", "an image prompt needs an image")
    if fields.get("model") in (None, "", NO_MODEL):
        raise RequestError("model", "choose an IP-Adapter model")
    if isinstance(fields["image"], Image.Image) and fields["image"].mode != "RGB":
        fields["image"] = flatten(fields["image"])
    try:
        return ControlUnit(module=IMAGE_PROMPT_MODULE, **fields)
    except RequestError as exc:
        raise RequestError(_UNIT_TO_PROMPT.get(exc.field, exc.field), exc.message) from None


def image_prompt_units(prompt_values: Mapping[int, Mapping[str, Any]]) -> tuple[ControlUnit, ...]:
    """The UI's image prompts with an image, in order, as units (they follow the ControlNet units in
    `control_units`); a bad value names the prompt's component (`image_prompt_<i>_<field>`)."""
    units = []
    for index in sorted(prompt_values):
        values = prompt_values[index]
        if values.get("image") is None:
            continue  # an empty prompt: the model dropdown's first adapter is no wish to use it
        try:
            units.append(image_prompt_unit(values))
        except RequestError as exc:
            raise RequestError(image_prompt_field(index, exc.field), exc.message) from None
    return tuple(units)


def is_image_prompt_model(info: ModelFileInfo) -> bool:
    """A usable IP-Adapter of the engine's control model list (`details.control_type`)."""
    details = info.details or {}
    return details.get("control_type") == "ip_adapter" and not details.get("error")


def image_prompt_models(infos: Iterable[ModelFileInfo]) -> list[tuple[str, str]]:
    """(label, value) of the adapter dropdown: each usable IP-Adapter by its title ("stem [hash]") and
    the family it was made for; its value the file's name."""
    choices = []
    for info in filter(is_image_prompt_model, infos):
        family = info.details.get("family_label")
        choices.append((f"{control_infotext.control_model_title(info)}" + (f" ({family})" if family else ""),
                        info.name))
    return choices


def image_prompt_status(infos: Iterable[ModelFileInfo], adapters: Any, encoders: Any) -> str:
    """Markdown for the accordion: what is missing for image prompts and where the files go
    (`adapters`, `encoders`: the folders); "" when every adapter has its encoder."""
    adapters_found = [info for info in infos if is_image_prompt_model(info)]
    if not adapters_found:
        return "**No IP-Adapter model found:** " + NO_ADAPTER_HELP.format(adapters=f"`{adapters}`",
                                                                           encoders=f"`{encoders}`") + "."
    missing = [info.details["missing"] for info in adapters_found if info.details.get("missing")]
    return "\n\n".join(f"**No image encoder:** {why} (on this server: `{encoders}`)." for why in missing)


def image_prompt_values_from_unit(index: int, unit: Mapping[str, Any], infos: list[ModelFileInfo]) -> dict[str, Any]:
    """Image prompt `index`'s component values from a pasted unit's fields (its image is not in the text)."""
    values = {image_prompt_field(index, prompt): unit[field] for prompt, field in IMAGE_PROMPT_FIELDS.items()
              if field in unit and prompt != "image"}
    model = values.get(image_prompt_field(index, "model"))
    if model not in (None, NO_MODEL):
        found = control_infotext.match_control_model(infos, model)
        values[image_prompt_field(index, "model")] = found.name if found is not None else model
    return values


def _is_pasted_image_prompt(unit: Mapping[str, Any], infos: list[ModelFileInfo]) -> bool:
    if not unit.get("enabled"):
        return False
    row = known_preprocessor(str(unit.get("module", NO_MODULE)))
    if row is not None and row.name in IMAGE_PROMPT_MODULES:
        return True
    found = control_infotext.match_control_model(infos, str(unit.get("model", NO_MODEL)))
    return found is not None and is_image_prompt_model(found)


def control_values_from_infotext(text: str, control_models: Iterable[ModelFileInfo]) -> dict[str, Any]:
    """Unit components' values from the text's "ControlNet i" entries: each unit the text has is
    enabled with its settings, a unit it skips (before a later one) is switched off; the image
    is left alone (the text has none) and units after the last one are not touched. An entry that
    is an image prompt (an ip-adapter module or model) fills the next image prompt instead, and its
    ControlNet unit is switched off."""
    infos = list(control_models)
    values: dict[str, Any] = {}
    prompts = 0
    for index, unit in enumerate(control_infotext.units_from_params(infotext.parse_infotext(text or ""))):
        if _is_pasted_image_prompt(unit, infos):
            values.update(image_prompt_values_from_unit(prompts, unit, infos))
            values[control_field(index, "enabled")] = False
            prompts += 1
            continue
        for name, value in unit.items():
            if name in ("image", "mask"):
                continue
            if name == "module":  # texts may carry the label ("softedge_hed"): the dropdown holds names
                row = known_preprocessor(value)
                value = row.name if row is not None else value  # unknown here: the unit names it when run
            elif name == "model" and value != NO_MODEL:
                # the listed file the text means; else the text itself: the unit names the missing model when run
                found = control_infotext.match_control_model(infos, value)
                value = found.name if found is not None else value
            values[control_field(index, name)] = value
    return values
