"""The ControlNet accordion of the txt2img, img2img and Inpaint tabs (sd-webui-controlnet's units).

`add_units(ui, mode, fields)` builds `engine.max_control_units` units as tabs. Each unit's
components join the tab's `fields` under `control_fields.control_field(i, <ControlUnit field>)`
("controlnet_0_weight"), so the Generate handler receives them by name and
`convert.generation_request` turns them into `request.control_units`; paste parameters fill
them the same way. Choices come from the engine (preprocessors, control models); the
preprocessor sliders' labels, ranges and visibility from `core.control_modules`.

The control image is not stored in the PNG: the accordion says so.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.core.control import CONTROL_MODES, CONTROL_RESIZE_MODES, NO_MODEL, NO_MODULE, UNIT_LIMITS, ControlUnit
from pipelines.core.control_infotext import control_model_title
from pipelines.core.engine_api import EngineAPI
from pipelines.core.request import RequestError
from webui import control_fields, convert
from webui.common import QUIET, Page, call_engine, engine_choices, tool_button

NOT_STORED_NOTE = ("The control image is not stored in the PNG: pasted parameters restore each unit's "
                   "settings, not its image.")
SLIDERS = ("processor_res", "threshold_a", "threshold_b")  # the preprocessor's own sliders


def add_units(ui: Page, mode: str, fields: dict[str, Any]) -> None:
    """The ControlNet accordion with one tab per unit; adds the units' components to `fields`."""
    engine = ui.engine
    count = int(engine.max_control_units)
    if count <= 0:
        return
    preprocessors = preprocessor_table(engine)
    models = model_choices(engine)
    parts: list[dict[str, Any]] = []
    with gr.Accordion("ControlNet", open=False, elem_id=f"{mode}_controlnet"):
        gr.Markdown(NOT_STORED_NOTE, elem_id=f"{mode}_controlnet_note")
        with gr.Tabs(elem_id=f"{mode}_controlnet_units"):
            for index in range(count):
                with gr.Tab(control_fields.unit_title(index), elem_id=f"{mode}_controlnet_unit_{index}"):
                    parts.append(_unit(mode, index, fields, preprocessors, models))
    ui.components[f"{mode}_controlnet"] = parts
    for index, unit in enumerate(parts):
        _wire_unit(ui, mode, index, unit, fields)


def preprocessor_table(engine: EngineAPI) -> dict[str, dict]:
    """name -> the engine's status of that preprocessor ({"name", "available", "missing"})."""
    table = {row["name"]: row for row in engine_choices(engine.control_preprocessors, "control preprocessors")}
    return table or {NO_MODULE: {"name": NO_MODULE, "available": True, "missing": ""}}


def model_choices(engine: EngineAPI, refresh: bool = False) -> list[tuple[str, str]]:
    """(label, value) pairs of the model dropdown: "None", then each control model by the title
    sd-webui-controlnet lists it by ("stem [hash]"), its value the file's name."""
    infos = engine_choices(lambda: engine.control_models(refresh=refresh), "control models")
    return [(NO_MODEL, NO_MODEL), *((control_model_title(info), info.name) for info in infos)]


def preprocessor_choices(table: dict[str, dict]) -> list[tuple[str, str]]:
    """Every preprocessor by the extension's label ("softedge_hed" for "hed"), the ones without
    their weights marked, not hidden: picking one says which file goes where."""
    labels = {name: control_fields.preprocessor_label(name) for name in table}
    return [(labels[name] if row.get("available", True) else f"{labels[name]} (weights missing)", name)
            for name, row in table.items()]


def slider_updates(module: str | None, pixel_perfect: bool) -> list:
    """The three sliders as the preprocessor wants them: label, range, default, and hidden when
    unused (the resolution also under Pixel Perfect, which picks it from the output size)."""
    updates = []
    for slider in SLIDERS:
        spec = control_fields.preprocessor_slider(module, slider)
        if spec is None:
            updates.append(gr.update(visible=False))
            continue
        label, low, high, default, step = spec
        hidden = slider == "processor_res" and pixel_perfect
        updates.append(gr.update(label=label, minimum=low, maximum=high, value=default, step=step,
                                 visible=not hidden))
    return updates


def missing_text(table: dict[str, dict], module: str | None) -> dict:
    """The picked preprocessor's "which file goes where", shown only when it lacks its weights."""
    row = table.get(module or NO_MODULE) or {}
    missing = "" if row.get("available", True) else (row.get("missing") or "its weights are missing")
    return gr.update(value=f"**{module}** cannot run here: {missing}" if missing else "", visible=bool(missing))


def _unit(mode: str, index: int, fields: dict[str, Any], preprocessors: dict[str, dict],
          models: list[tuple[str, str]]) -> dict[str, Any]:
    """One unit's components: its ControlUnit fields go into `fields`, the rest is returned."""
    def name(field: str) -> str:
        return control_fields.control_field(index, field)

    p = f"{mode}_{name('')}".rstrip("_")  # elem_id prefix: txt2img_controlnet_0
    labels = control_fields.CONTROL_LABELS
    defaults = ControlUnit(enabled=False)
    with gr.Row(equal_height=False):
        fields[name("image")] = gr.Image(label=labels["image"], type="pil", sources=["upload", "clipboard"],
                                         height=260, elem_id=f"{p}_image")
        with gr.Column(min_width=160):
            preview = gr.Image(label="Preprocessor preview", type="pil", interactive=False, height=212,
                               format="png", elem_id=f"{p}_preview")
            preview_button = gr.Button("Preview", size="sm", elem_id=f"{p}_preview_button")
    with gr.Row():
        fields[name("enabled")] = gr.Checkbox(defaults.enabled, label=labels["enabled"], elem_id=f"{p}_enabled")
        fields[name("pixel_perfect")] = gr.Checkbox(
            defaults.pixel_perfect, label=labels["pixel_perfect"], elem_id=f"{p}_pixel_perfect",
            info="resolution from the output size")
    if mode != "txt2img":
        fields[name(control_fields.USE_INPUT)] = gr.Checkbox(
            False, label=labels[control_fields.USE_INPUT], elem_id=f"{p}_use_input",
            info="instead of the control image; also used while none is uploaded")
    with gr.Row(equal_height=True):
        fields[name("module")] = gr.Dropdown(preprocessor_choices(preprocessors), value=_first_module(preprocessors),
                                             label=labels["module"], elem_id=f"{p}_module", scale=2, min_width=140,
                                             allow_custom_value=True)  # a pasted unknown one: named when run
        fields[name("model")] = gr.Dropdown(models, value=defaults.model, label=labels["model"],
                                            allow_custom_value=True, elem_id=f"{p}_model", scale=3, min_width=160)
        refresh = tool_button("refresh", f"{p}_refresh")
    missing = gr.Markdown(visible=False, elem_id=f"{p}_missing")
    fields[name("weight")] = _limit_slider("weight", defaults.weight, 0.05, elem_id=f"{p}_weight")
    with gr.Row():
        for field in ("guidance_start", "guidance_end"):
            fields[name(field)] = _limit_slider(field, getattr(defaults, field), 0.01, elem_id=f"{p}_{field}")
    fields[name("processor_res")] = _preprocessor_slider(_first_module(preprocessors), "processor_res",
                                                         f"{p}_processor_res")
    with gr.Row():
        for slider in ("threshold_a", "threshold_b"):
            fields[name(slider)] = _preprocessor_slider(_first_module(preprocessors), slider, f"{p}_{slider}")
    with gr.Row():
        fields[name("control_mode")] = gr.Radio(list(CONTROL_MODES), value=defaults.control_mode,
                                                label=labels["control_mode"], elem_id=f"{p}_control_mode")
        fields[name("resize_mode")] = gr.Radio(list(CONTROL_RESIZE_MODES), value=defaults.resize_mode,
                                               label=labels["resize_mode"], elem_id=f"{p}_resize_mode")
    return dict(preview=preview, refresh=refresh, preview_button=preview_button, missing=missing,
                preprocessors=preprocessors)


def _first_module(preprocessors: dict[str, dict]) -> str:
    return NO_MODULE if NO_MODULE in preprocessors else next(iter(preprocessors))


def _limit_slider(field: str, value: float, step: float, elem_id: str) -> gr.Slider:
    low, high = UNIT_LIMITS[field]
    return gr.Slider(low, high, value=value, step=step, label=control_fields.CONTROL_LABELS[field], elem_id=elem_id)


def _preprocessor_slider(module: str, slider: str, elem_id: str) -> gr.Slider:
    """A preprocessor slider as `module` wants it; hidden (over the unit's limits) when it has none."""
    spec = control_fields.preprocessor_slider(module, slider)
    if spec is None:
        low, high = UNIT_LIMITS.get(slider, (0, 255))
        spec = (control_fields.CONTROL_LABELS[slider], low, high, low, 1)
    label, low, high, default, step = spec
    return gr.Slider(low, high, value=default, step=step, label=label, elem_id=elem_id,
                     visible=control_fields.preprocessor_slider(module, slider) is not None)


# --- events ---------------------------------------------------------------------------------

def _wire_unit(ui: Page, mode: str, index: int, unit: dict[str, Any], fields: dict[str, Any]) -> None:
    def field(name: str) -> Any:
        return fields[control_fields.control_field(index, name)]

    sliders = [field(slider) for slider in SLIDERS]
    table = unit["preprocessors"]

    def module_changed(module=None, pixel_perfect=False):
        return [*slider_updates(module, pixel_perfect), missing_text(table, module)]

    def pixel_perfect_changed(module=None, pixel_perfect=False):
        # only the resolution's visibility follows; its value stays for when Pixel Perfect is off again
        return gr.update(visible=control_fields.preprocessor_slider(module, "processor_res") is not None
                         and not pixel_perfect)

    def refresh(current=None):
        return refresh_models(ui.engine, current)

    for handler in (module_changed, pixel_perfect_changed, refresh):
        handler.__name__ = f"{mode}_controlnet_{index}_{handler.__name__}"
    options = {"module": field("module"), "pixel_perfect": field("pixel_perfect")}
    field("module").change(module_changed, inputs_kwargs=options, outputs=[*sliders, unit["missing"]], **QUIET)
    field("pixel_perfect").change(pixel_perfect_changed, inputs_kwargs=options, outputs=sliders[0], **QUIET)
    unit["refresh"].click(refresh, inputs_kwargs={"current": field("model")}, outputs=field("model"), **QUIET)
    inputs = {name: component for name, component in fields.items()
              if (control_fields.split_control_field(name) or (None,))[0] == index}
    inputs.update({name: fields[name] for name in ("width", "height", "init_image", "inpaint_image") if name in fields})
    unit["preview_button"].click(preview_handler(ui, mode, index), inputs_kwargs=inputs, outputs=unit["preview"],
                                 api_visibility="undocumented")


def refresh_models(engine: EngineAPI, current: str | None) -> dict:
    """The model dropdown re-read from models/ControlNet; the pick stays when it is still listed."""
    choices = model_choices(engine, refresh=True)
    values = [value for _, value in choices]
    return gr.update(choices=choices, value=current if current in values else NO_MODEL)


def preview_handler(ui: Page, mode: str, index: int):
    def preview(width=512, height=512, init_image=None, inpaint_image=None, **unit_fields):
        return preview_map(ui.engine, index, unit_fields, width, height, init_image, inpaint_image)

    preview.__name__ = f"{mode}_controlnet_{index}_preview"
    return preview


def preview_map(engine: EngineAPI, index: int, unit_fields: dict[str, Any], width: float, height: float,
                init_image: Any = None, inpaint_image: Any = None):
    """The unit's preprocessed map at the tab's size (enabled or not), as the job would use it."""
    values = {control_fields.split_control_field(name)[1]: value for name, value in unit_fields.items()}
    if inpaint_image is not None:
        init_image, _ = convert.editor_image_and_mask(inpaint_image)
    elif init_image is not None and init_image.mode != "RGB":
        init_image = convert.flatten(init_image)
    try:
        unit = control_fields.control_unit(index, {**values, "enabled": True})
    except RequestError as exc:
        raise gr.Error(convert.error_message(exc), print_exception=False) from None
    size = int(width or 512), int(height or 512)
    return call_engine("Preview", lambda: _preprocess(engine, index, unit, size, init_image))


def _preprocess(engine: EngineAPI, index: int, unit: ControlUnit, size: tuple[int, int], init_image: Any):
    try:
        return engine.preprocess_control(unit, size[0], size[1], init_image=init_image)
    except RequestError as exc:  # the engine names the unit's field: say which unit
        field = exc.field.rsplit(".", 1)[-1]
        raise RequestError(control_fields.control_field(index, field), exc.message) from None
