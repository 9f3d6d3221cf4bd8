"""The ControlNet units' components in the generation tabs: their names, and UI values <-> ControlUnit.

Pure translations like `webui.convert` (no gradio, no torch); `convert.generation_request` and
`convert.ui_values_from_infotext` call these for the `controlnet_<i>_<field>` components.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

from PIL import Image

from pipelines.core import control_infotext, control_modules, infotext
from pipelines.core.control import NO_MODEL, NO_MODULE, ControlUnit
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
    `control_units[i].field`; None for a field of no unit."""
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




def control_values_from_infotext(text: str, control_models: Iterable[ModelFileInfo]) -> dict[str, Any]:
    """Unit components' values from the text's "ControlNet i" entries: each unit the text has is
    enabled with its settings, a unit it skips (before a later one) is switched off; the image
    is left alone (the text has none) and units after the last one are not touched."""
    infos = list(control_models)
    values: dict[str, Any] = {}
    for index, unit in enumerate(control_infotext.units_from_params(infotext.parse_infotext(text or ""))):
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
