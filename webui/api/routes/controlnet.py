"""sd-webui-controlnet's own routes, under /controlnet: version, model_list, module_list,
settings and detect, in the extension's shapes, so its clients and plugins find what they expect.
The units themselves travel in txt2img / img2img's alwayson_scripts (`api/controlnet.py`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from PIL import Image

from pipelines.core.checks import RequestError
from pipelines.core.control import CONTROL_RESIZE_MODES, ControlUnit
from pipelines.core.control_infotext import control_model_title
from pipelines.core.control_modules import find_preprocessor, module_list, modules_detail, unit_thresholds
from pipelines.core.engine_api import EngineAPI

from .. import images
from ..bodies import ControlNetDetectRequest
from ..controlnet import check_module
from ..errors import bad_field
from ..translate import upload_limits

PREFIX = "/controlnet"
# external_code.get_api_version() of sd-webui-controlnet 1.1.4xx: what its clients check
API_VERSION = 2
JUST_RESIZE = CONTROL_RESIZE_MODES[0]

# a unit field the engine names -> the detect body's field (images and masks get their index)
_DETECT_FIELDS = {"module": "controlnet_module", "processor_res": "controlnet_processor_res",
                  "threshold_a": "controlnet_threshold_a", "threshold_b": "controlnet_threshold_b",
                  "image": "controlnet_input_images", "mask": "controlnet_masks"}


def detect_field(field: str, index: int) -> str:
    name = _DETECT_FIELDS.get(field, field)
    return f"{name}.{index}" if field in ("image", "mask") else name


def detect_size(image: Image.Image, resolution: int | None) -> tuple[int, int]:
    """The map's size: the image scaled so its short side is `resolution` (None: as it is), as
    the extension's detect returns it."""
    if resolution is None:
        return image.size
    scale = resolution / min(image.size)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def _default(value: float) -> float | None:
    return None if value < 0 else value  # -1: the module's default


def detect_unit(engine: EngineAPI, body: ControlNetDetectRequest, index: int) -> ControlUnit:
    """The unit detect runs for image `index`: the body's module, resolution and thresholds."""
    limits = upload_limits(engine)
    image = images.decode_image(f"controlnet_input_images.{index}", body.controlnet_input_images[index], limits)
    mask = None
    if index < len(body.controlnet_masks) and body.controlnet_masks[index] not in (None, ""):
        mask = images.decode_image(f"controlnet_masks.{index}", body.controlnet_masks[index], limits).convert("L")
    values: dict[str, Any] = dict(module=body.controlnet_module, image=image, mask=mask, resize_mode=JUST_RESIZE,
                                  threshold_a=_default(body.controlnet_threshold_a),
                                  threshold_b=_default(body.controlnet_threshold_b))
    if _default(body.controlnet_processor_res) is not None:
        values["processor_res"] = body.controlnet_processor_res
    try:
        unit = ControlUnit(**values)
        unit_thresholds(unit)  # within the module's sliders
    except RequestError as exc:
        raise bad_field(detect_field(exc.field, index), exc.message) from None
    return unit


def add_controlnet_routes(router: APIRouter, engine: EngineAPI) -> None:
    @router.get("/version")
    def version():
        """The sd-webui-controlnet API version this server speaks."""
        return {"version": API_VERSION}

    @router.get("/model_list")
    def model_list(update: bool = True):
        """Usable control models (models/ControlNet) by title, "name [hash]"; update=true (the
        extension's default) rescans the folder. "None" is not listed, as in the extension."""
        files = engine.control_models(refresh=update)
        return {"model_list": [control_model_title(f) for f in files if not f.details.get("error")]}

    @router.get("/module_list")
    def module_list_route(alias_names: bool = False):
        """Preprocessor names (the UI's labels with alias_names=true) and their sliders."""
        return {"module_list": module_list(alias_names), "module_detail": modules_detail(alias_names)}

    @router.get("/settings")
    def settings():
        """How many units a request may enable (the extension's setting names, old and new)."""
        count = engine.max_control_units
        return {"control_net_unit_count": count, "control_net_max_models_num": count}

    @router.post("/detect")
    def detect(body: ControlNetDetectRequest):
        """The preprocessor's maps of the images, as base64 PNGs: {"images": [...], "info": "Success"}."""
        module = check_module(engine, "controlnet_module", body.controlnet_module)
        body = body.model_copy(update={"controlnet_module": module})
        if not body.controlnet_input_images:
            raise bad_field("controlnet_input_images", "no image: send a list of base64 images")
        resolution_used = find_preprocessor(module).resolution is not None
        maps = []
        for index in range(len(body.controlnet_input_images)):
            unit = detect_unit(engine, body, index)
            width, height = detect_size(unit.image, unit.processor_res if resolution_used else None)
            try:
                maps.append(engine.preprocess_control(unit, width, height))
            except RequestError as exc:
                raise bad_field(detect_field(exc.field, index), exc.message) from None
        return {"images": [images.encode_png(image) for image in maps], "info": "Success"}
