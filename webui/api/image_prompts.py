"""The API's own `image_prompts` field of txt2img / img2img bodies -> ControlUnits (IP-Adapter).

    "image_prompts": [{"image": "<base64>", "model": "ip-adapter_sd15", "weight": 1.0, "start": 0.0, "end": 1.0}]

`model` is an IP-Adapter as GET /controlnet/model_list lists it (file name, title or stem);
`weight`, `start` and `end` are optional (1, 0, 1). Each entry becomes the same ControlUnit the
page's "Image prompt (IP-Adapter)" accordion makes (`control_fields.image_prompt_unit`), after the
`alwayson_scripts.controlnet` units: they count as units, as in sd-webui-controlnet. Every bad
entry is a 422 naming `image_prompts[i].<field>`; `api_field` maps the engine's later
`control_units[j]...` errors about them back to the same names.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from pipelines.core.control import ControlUnit
from pipelines.core.engine_api import EngineAPI
from pipelines.core.request import RequestError
from pipelines.core.uploads import UploadLimits
from webui.control_fields import IMAGE_PROMPT_FIELDS, image_prompt_unit, is_image_prompt_model

from .controlnet import find_control_model, resolve_model
from .errors import bad_field
from .images import decode_image

FIELD = "image_prompts"
_UNIT_TO_PROMPT = {unit: prompt for prompt, unit in IMAGE_PROMPT_FIELDS.items()}
_REQUEST_FIELD_RE = re.compile(r"^control_units\[(\d+)\](?:\.(\w+))?$")


def entry_field(index: int, field: str | None = None) -> str:
    return f"{FIELD}[{index}]" + (f".{field}" if field else "")


def image_prompt_units(engine: EngineAPI, entries: Any, *, limits: UploadLimits,
                       control_count: int) -> tuple[ControlUnit, ...]:
    """The body's image prompts as units (None: none); `control_count`: the ControlNet units before them."""
    if entries is None:
        return ()
    if not isinstance(entries, (list, tuple)):
        raise bad_field(FIELD, "must be a list of {image, model, weight, start, end}")
    limit = engine.max_control_units
    if control_count + len(entries) > limit:
        raise bad_field(FIELD, f"at most {limit} units per request on this server (ControlNet units and image "
                               f"prompts together; its --controlnet-max-units); got {control_count} + {len(entries)}")
    return tuple(_unit(engine, index, entry, limits) for index, entry in enumerate(entries))


def _unit(engine: EngineAPI, index: int, entry: Any, limits: UploadLimits) -> ControlUnit:
    if not isinstance(entry, Mapping):
        raise bad_field(entry_field(index), "must be an object with image, model, weight, start and end")
    values = dict(entry)
    if values.get("image") not in (None, ""):
        values["image"] = decode_image(entry_field(index, "image"), values["image"], limits)
    if values.get("model") not in (None, ""):
        values["model"] = _adapter(engine, entry_field(index, "model"), values["model"])
    try:
        return image_prompt_unit(values)
    except RequestError as exc:
        raise bad_field(entry_field(index, exc.field), exc.message) from None


def _adapter(engine: EngineAPI, field: str, value: Any) -> str:
    """The listed IP-Adapter's file name; a 422 for an unknown model or one that is no IP-Adapter."""
    name = resolve_model(engine, field, value)
    file = find_control_model(engine, name)
    if file is None or not is_image_prompt_model(file):
        raise bad_field(field, f"{name} is not an IP-Adapter (a ControlNet / T2I-Adapter model goes into "
                               f"alwayson_scripts.controlnet)")
    return name


def api_field(request_field: str, control_count: int) -> str | None:
    """`control_units[j].guidance_start` about image prompt j - `control_count` -> `image_prompts[k].start`;
    None for any other field."""
    match = _REQUEST_FIELD_RE.match(request_field or "")
    if match is None or int(match.group(1)) < control_count:
        return None
    field = match.group(2)
    return entry_field(int(match.group(1)) - control_count, _UNIT_TO_PROMPT.get(field, field) if field else None)
