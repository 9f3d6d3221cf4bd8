"""Pure translations between UI values and engine objects (no gradio, no torch).

Every generation tab hands its component values over *by name* (Gradio's `inputs_kwargs`);
`generation_request()` turns that mapping into a `GenerationRequest`. Names are either
`GenerationRequest` fields, passed through unchanged, or one of the few UI-only names in
`UI_ONLY_FIELDS`, which are translated here (an editor value into init image + mask, radio
labels into booleans), or a ControlNet unit's `controlnet_<i>_<field>` (collected into
`control_units`, see "ControlNet units" below).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Callable, Iterable, Mapping

from PIL import Image

from pipelines.core import infotext, module_choice
from pipelines.core.engine_api import ModelFileInfo
from pipelines.core.request import HR_SAME_CHECKPOINT, GenerationRequest, RequestError, UpscaleRequest
from webui import region_fields
from webui.control_fields import (
    control_unit_where,
    control_units,
    control_values_from_infotext,
    image_prompt_units,
    split_control_field,
    split_image_prompt_field,
)
from webui.images import flatten  # noqa: F401 - the tabs call it as convert.flatten

REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationRequest))

INPAINT_AREAS = ("Whole picture", "Only masked")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
UPSCALE_MODES = ("Scale by", "Scale to")
# in `ui_values_from_infotext`'s answer: the model the text named (found or not)
MODEL_HINT = "_model_hint"

# UI-only component names and the request fields they become.
UI_ONLY_FIELDS = {
    "inpaint_image": ("init_image", "mask"),
    "inpaint_area": ("inpaint_full_res",),
    "mask_mode": ("inpainting_mask_invert",),
}

# Labels shown next to components; errors name the field with its label.
LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "sampler": "Sampling method",
    "schedule_type": "Schedule type",
    "steps": "Sampling steps",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "subseed": "Variation seed",
    "subseed_strength": "Variation strength",
    "seed_resize_from_w": "Resize seed from width",
    "seed_resize_from_h": "Resize seed from height",
    "soft_inpainting": "Soft inpainting",
    "outpaint_left": "Outpaint left",
    "outpaint_right": "Outpaint right",
    "outpaint_up": "Outpaint up",
    "outpaint_down": "Outpaint down",
    "width": "Width",
    "height": "Height",
    "batch_count": "Batch count",
    "batch_size": "Batch size",
    "init_image": "Input image",
    "denoising_strength": "Denoising strength",
    "resize_mode": "Resize mode",
    "mask": "Mask",
    "mask_blur": "Mask blur",
    "inpainting_fill": "Masked content",
    "inpaint_full_res": "Inpaint area",
    "inpaint_full_res_padding": "Only masked padding, pixels",
    "inpainting_mask_invert": "Mask mode",
    "checkpoint": "Checkpoint",
    "vae": "VAE",
    "clip_skip": "Clip skip",
    "tiling": "Tiling",
    "restore_faces": "Restore faces",
    "face_restorer": "Face restoration model",
    "code_former_weight": "CodeFormer weight (0 = strongest, 1 = closest to the input)",
    "refiner_checkpoint": "Refiner checkpoint",
    "refiner_switch_at": "Switch at",
    "hr_checkpoint_name": "Hires checkpoint",
    "image": "Input image",
    "distilled_cfg_scale": "Distilled CFG Scale",
    "token_merging_ratio": "Token merging ratio",
    "deepcache_interval": "DeepCache interval",
    "deepcache_branch": "DeepCache branch",
    "deepcache_start": "DeepCache start",
    "skip_early_cond": "Skip Early CFG",
    "s_min_uncond": "NGMS (negative guidance minimum sigma)",
    "s_min_uncond_all": "NGMS all steps",
    "shift": "Shift",
    "upscaler": "Upscaler",
    "scale": "Scale by",
    "target_width": "Target width",
    "target_height": "Target height",
}


def request_default(name: str) -> Any:
    """The GenerationRequest default of a field, so the UI and the API start from the same values."""
    return GenerationRequest.__dataclass_fields__[name].default


def error_message(exc: RequestError) -> str:
    unit = control_unit_where(exc.field) or region_fields.region_where(exc.field)
    if unit is not None:
        return f"{unit}: {exc.message}"
    label = LABELS.get(exc.field)
    where = f"{label} ({exc.field})" if label else exc.field
    return f"{where}: {exc.message}"


def _seed(name: str, value: Any) -> Any:
    if value is None or value == "":
        return -1  # an emptied seed box means random
    return value


# number boxes whose 0 (or empty) asks for the model's own value (the request's None)
ZERO_MEANS_MODELS_OWN = ("shift", "distilled_cfg_scale")


def generation_request(mode: str, fields: Mapping[str, Any]) -> GenerationRequest:
    """Build a validated request from component values keyed by name (raises RequestError)."""
    values: dict[str, Any] = {}
    unit_values: dict[int, dict[str, Any]] = {}
    prompt_values: dict[int, dict[str, Any]] = {}  # image prompts (IP-Adapter)
    region_values: dict[int, dict[str, Any]] = {}  # drawn regions
    for name, value in fields.items():
        unit_field = split_control_field(name)
        prompt_field = split_image_prompt_field(name)
        region_field = region_fields.split_region_field(name)
        if unit_field is not None:
            index, field = unit_field
            unit_values.setdefault(index, {})[field] = value
        elif prompt_field is not None:
            prompt_values.setdefault(prompt_field[0], {})[prompt_field[1]] = value
        elif region_field is not None:
            region_values.setdefault(region_field[0], {})[region_field[1]] = value
        elif name == "inpaint_image":
            values["init_image"], values["mask"] = editor_image_and_mask(value)
        elif name == "inpaint_area":
            values["inpaint_full_res"] = _choice_index(name, value, INPAINT_AREAS) == 1
        elif name == "mask_mode":
            values["inpainting_mask_invert"] = _choice_index(name, value, MASK_MODES) == 1
        elif name in REQUEST_FIELDS:
            values[name] = value
        else:
            raise TypeError(f"UI component {name!r} maps to no GenerationRequest field")
    for name in ("seed", "subseed"):
        if name in values:
            values[name] = _seed(name, values[name])
    for name in ("prompt", "negative_prompt"):
        if name in values and values[name] is None:
            values[name] = ""  # an untouched textbox
    if values.get("checkpoint") in ("", None):
        values["checkpoint"] = None
    for name in ZERO_MEANS_MODELS_OWN:
        if name in values and not values[name]:
            values[name] = None
    if isinstance(values.get("init_image"), Image.Image) and values["init_image"].mode != "RGB":
        values["init_image"] = flatten(values["init_image"])
    if unit_values or prompt_values:  # the image prompts after the ControlNet units: they count as units
        values["control_units"] = control_units(unit_values) + image_prompt_units(prompt_values)
    if region_values:
        values["regions"] = region_fields.regions_from_ui(region_values, values.get("width"), values.get("height"))
    values["mode"] = mode
    return GenerationRequest(**values)


def upscale_request(fields: Mapping[str, Any]) -> UpscaleRequest:
    values = dict(fields)
    how = values.pop("upscale_mode", UPSCALE_MODES[0])
    if _choice_index("upscale_mode", how, UPSCALE_MODES) == 0:
        values.pop("target_width", None)
        values.pop("target_height", None)
    else:
        for name in ("target_width", "target_height"):
            value = values.get(name)
            if value in (None, ""):
                raise RequestError(name, "give a size in pixels")
            if isinstance(value, float) and value.is_integer():
                values[name] = int(value)  # gr.Number sends 1024.0
    image = values.get("image")
    if image is None:
        raise RequestError("image", "an input image is needed")
    if isinstance(image, Image.Image) and image.mode not in ("RGB", "L"):
        values["image"] = flatten(image)
    return UpscaleRequest(**values)


def _choice_index(name: str, value: Any, choices: tuple[str, ...]) -> int:
    if value not in choices:
        raise RequestError(name, f"unknown value {value!r}; choose one of: {', '.join(choices)}")
    return choices.index(value)


def editor_image_and_mask(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """Split a gr.ImageEditor/ImageMask value into (init image, mask).

    The value is a dict {"background": img, "layers": [img, ...], "composite": img}. The
    background is the uploaded picture; every pixel painted on any layer (alpha > 0) becomes
    white in the mask, everything else black. Layers are sized like the canvas; a layer of
    another size is stretched onto the background's size.
    """
    if value is None:
        return None, None
    if isinstance(value, Image.Image):  # a plain image: nothing painted
        return flatten(value), None
    background = value.get("background")
    layers = [layer for layer in (value.get("layers") or []) if layer is not None]
    if background is None:
        return None, None
    background = _as_pil(background)
    init_image = flatten(background)
    mask = Image.new("L", init_image.size, 0)
    for layer in layers:
        layer = _as_pil(layer)
        alpha = layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")
        painted = alpha.point(lambda a: 255 if a > 0 else 0)
        if painted.size != mask.size:
            painted = painted.resize(mask.size, Image.Resampling.NEAREST)
        mask.paste(255, (0, 0), painted)
    if mask.getbbox() is None:
        return init_image, None  # nothing painted: the request will say a mask is needed
    return init_image, mask


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str):
        return Image.open(image)
    return Image.fromarray(image)  # numpy


# --- Checkpoints table ------------------------------------------------------------------

CHECKPOINT_HEADERS = ["Name", "Family", "Size", "Short hash", "Modified"]


def human_size(size: int | float | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover


def modified(mtime: float | None) -> str:
    if not mtime:
        return ""
    return datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")


def checkpoint_rows(infos: Iterable[ModelFileInfo]) -> list[list[str]]:
    return [[info.name, info.family or "", human_size(info.size), info.short_hash or "", modified(info.mtime)]
            for info in infos]


def loaded_line(names: Iterable[str], loading: Iterable[str] = ()) -> str:
    names, loading = list(names), list(loading)
    if loading:
        done = f"**Loaded:** {', '.join(names)} · " if names else ""
        return f"{done}**Loading model…** {', '.join(loading)} (a job started now waits for it)"
    return "**Loaded:** " + (", ".join(names) if names else "nothing yet (loads on first use)")


def demo_note(info: ModelFileInfo, user_folder: Any) -> str:
    """A line under the header while the session's checkpoint is the shipped demo model:
    what it is, a prompt it knows, and where real checkpoints go."""
    details = info.details or {}
    if not details.get("demo"):
        return ""
    size = details.get("resolution") or 64
    example = details.get("trigger_words") or "a red circle on a blue background"
    return (f"**Demo model** `{info.name}` ({size}×{size}), trained by this project so that everything works "
            f"before you add a model. It knows coloured shapes: try *{example}*. Put your own `.safetensors` "
            f"checkpoints in `{user_folder}`: they replace the demo in the list.")


def engine_line(description: Mapping[str, Any] | None) -> str:
    if not description:
        return ""
    return " · ".join(f"{key}: {value}" for key, value in description.items())


# --- Pasted parameters -------------------------------------------------------------------

def ui_values_from_infotext(text: str, find_checkpoint: Callable[[str], ModelFileInfo | None] | None = None,
                            control_models: Iterable[ModelFileInfo] | None = None,
                            text_encoder_names: Iterable[str] = ()) -> dict[str, Any] | None:
    """UI component values (by name) from an A1111 parameters text; None when it has none.

    `find_checkpoint` is the engine's (`EngineAPI.find_checkpoint`, the one home of A1111's
    name rules); the checkpoint it finds for the text's "Model hash" (first) or "Model"
    becomes "checkpoint". `MODEL_HINT` carries the model the text named, so the caller can say
    when it is not there. "ControlNet i" entries fill unit i's components (not its image); a
    unit's model is matched in `control_models` (the engine's list), else kept as the text names it.
    """
    fields = infotext.request_fields_from_infotext(text or "")
    hints = {key: fields.pop(key) for key in ("model_name", "model_hash", "vae_name", "vae_hash") if key in fields}
    if not set(fields) - {"prompt", "negative_prompt"}:
        return None  # plain prompt text: nothing to restore, and the negative prompt stays
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "inpaint_full_res":
            values["inpaint_area"] = INPAINT_AREAS[int(bool(value))]
        elif name == "inpainting_mask_invert":
            values["mask_mode"] = MASK_MODES[int(bool(value))]
        elif name == "regions":  # box regions into the accordion's rows (the text has no masks)
            values.update(region_fields.region_values(value, region_fields.REGION_ROWS))
        elif name == "text_encoders":  # Forge's "Module N" stems: the listed files they mean (the header's pick)
            values[name] = module_choice.listed_names(value, text_encoder_names)
        elif name in OTHER_CHECKPOINTS:  # "name [hash]": the listed checkpoint, else the dropdown's "none"
            found = _find_model(find_checkpoint, value, *_title_parts(value)) if value else None
            values[name] = found.name if found is not None else OTHER_CHECKPOINTS[name]
        else:
            values[name] = value
    values.setdefault("refiner_checkpoint", OTHER_CHECKPOINTS["refiner_checkpoint"])  # no "Refiner": none
    if values.get("enable_hr"):  # hires fix without "Hires checkpoint": the first pass's
        values.setdefault("hr_checkpoint_name", OTHER_CHECKPOINTS["hr_checkpoint_name"])
    values.update(control_values_from_infotext(text, control_models or ()))
    model_hash, model_name = hints.get("model_hash"), hints.get("model_name")
    if model_hash or model_name:
        values[MODEL_HINT] = model_name or model_hash
        found = _find_model(find_checkpoint, model_hash, model_name)
        if found is not None:
            values["checkpoint"] = found.name
    return values


# request fields naming a second checkpoint, and their dropdowns' "none" choice
OTHER_CHECKPOINTS = {"refiner_checkpoint": "None", "hr_checkpoint_name": HR_SAME_CHECKPOINT}


def _title_parts(title: str) -> tuple[str | None, str]:
    """(hash, name) of A1111's "name [hash]" title; (None, title) for a plain name."""
    name, _, rest = title.rpartition(" [")
    if name and rest.endswith("]"):
        return rest[:-1].strip(), name.strip()
    return None, title


def _find_model(find_checkpoint: Callable[[str], ModelFileInfo | None] | None,
                *names: str | None) -> ModelFileInfo | None:
    """The first of `names` (hash, then name) that the engine finds among its checkpoints."""
    if find_checkpoint is None:
        return None
    for name in names:
        if name and name.strip():
            found = find_checkpoint(name.strip())
            if found is not None:
                return found
    return None
