"""The "Image prompt (IP-Adapter)" accordion of the txt2img, img2img and Inpaint tabs.

`add_prompts(ui, mode, fields)` builds `engine.max_control_units` image prompts as tabs. Each
prompt's components join the tab's `fields` under `control_fields.image_prompt_field(i, <field>)`
("image_prompt_0_weight"): image, model (the IP-Adapters of the engine's control model list),
weight, start, end. `convert.generation_request` turns the prompts with an image into ControlUnits
with an ip-adapter module after the ControlNet units (`control_fields.image_prompt_units`), so
they count as units, as in sd-webui-controlnet; paste parameters fill them from the infotext's
"ControlNet i" entries that are image prompts (not their images).

The accordion says what is missing (no adapter, an adapter without its CLIP vision encoder) and
where those files go; its refresh button reads the folders again.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.core.control import UNIT_LIMITS, ControlUnit
from pipelines.core.engine_api import EngineAPI
from webui import control_fields
from webui.common import QUIET, Page, engine_choices, tool_button

NOTE = ("Each image steers the picture like a prompt (IP-Adapter). Image prompts count as ControlNet units: "
        "{count} in all per request. The images are not stored in the PNG: pasted parameters restore each "
        "prompt's model, weight, start and end.")


def add_prompts(ui: Page, mode: str, fields: dict[str, Any]) -> None:
    """The accordion with one tab per image prompt; adds the prompts' components to `fields`."""
    engine = ui.engine
    count = int(engine.max_control_units)
    if count <= 0:
        return
    infos = engine_choices(lambda: engine.control_models(), "control models")
    choices = control_fields.image_prompt_models(infos)
    status = status_text(engine, infos)
    with gr.Accordion("Image prompt (IP-Adapter)", open=False, elem_id=f"{mode}_image_prompts"):
        with gr.Row(equal_height=False):
            gr.Markdown(NOTE.format(count=count), elem_id=f"{mode}_image_prompts_note")
            refresh = tool_button("refresh", f"{mode}_image_prompts_refresh")
        missing = gr.Markdown(status, visible=bool(status), elem_id=f"{mode}_image_prompts_missing")
        with gr.Tabs(elem_id=f"{mode}_image_prompts_tabs"):
            for index in range(count):
                with gr.Tab(control_fields.image_prompt_title(index), elem_id=f"{mode}_image_prompt_{index}_tab"):
                    _prompt(mode, index, fields, choices)
    models = [fields[control_fields.image_prompt_field(index, "model")] for index in range(count)]

    def refresh_models(*current):
        return refreshed(engine, list(current))

    refresh_models.__name__ = f"{mode}_image_prompts_refresh"
    refresh.click(refresh_models, inputs=models, outputs=[*models, missing], **QUIET)
    ui.components[f"{mode}_image_prompts"] = dict(refresh=refresh, missing=missing)


def status_text(engine: EngineAPI, infos: list) -> str:
    return control_fields.image_prompt_status(infos, engine.paths.folder("ipadapter"),
                                              engine.paths.folder("clip_vision"))


def refreshed(engine: EngineAPI, current: list[str | None]) -> list:
    """Each model dropdown re-read from the folders (a pick that is still listed stays), then the status."""
    infos = engine_choices(lambda: engine.control_models(refresh=True), "control models")
    choices = control_fields.image_prompt_models(infos)
    values = [value for _, value in choices]
    status = status_text(engine, infos)
    updates = [gr.update(choices=choices, value=pick if pick in values else (values[0] if values else None))
               for pick in current]
    return [*updates, gr.update(value=status, visible=bool(status))]


def _prompt(mode: str, index: int, fields: dict[str, Any], choices: list[tuple[str, str]]) -> None:
    """One image prompt's components, into `fields` by name."""
    def name(field: str) -> str:
        return control_fields.image_prompt_field(index, field)

    p = f"{mode}_image_prompt_{index}"  # elem_id prefix
    labels = control_fields.IMAGE_PROMPT_LABELS
    defaults = ControlUnit()
    with gr.Row(equal_height=False):
        fields[name("image")] = gr.Image(label=labels["image"], type="pil", sources=["upload", "clipboard"],
                                         height=220, elem_id=f"{p}_image", min_width=160)
        with gr.Column(min_width=200):
            fields[name("model")] = gr.Dropdown(choices, value=choices[0][1] if choices else None,
                                                label=labels["model"], allow_custom_value=True,  # a pasted one
                                                elem_id=f"{p}_model")
            fields[name("weight")] = _slider("weight", defaults.weight, 0.05, f"{p}_weight")
            fields[name("start")] = _slider("guidance_start", defaults.guidance_start, 0.01, f"{p}_start",
                                            label=labels["start"])
            fields[name("end")] = _slider("guidance_end", defaults.guidance_end, 0.01, f"{p}_end", label=labels["end"])


def _slider(unit_field: str, value: float, step: float, elem_id: str, label: str | None = None) -> gr.Slider:
    low, high = UNIT_LIMITS[unit_field]
    return gr.Slider(low, high, value=value, step=step, label=label or control_fields.IMAGE_PROMPT_LABELS["weight"],
                     elem_id=elem_id, min_width=120)
