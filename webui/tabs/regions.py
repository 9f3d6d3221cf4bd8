"""The "Regional prompts" accordion of the txt2img, img2img and Inpaint tabs (layout-to-image).

`add_regions(ui, mode, fields)` adds two ways to lay the picture out, as `core.regions` runs them:
- the prompt's own syntax (Regional Prompter's ADDCOL / ADDROW): `regional_mode`,
  `regional_ratios` and `regional_base_ratios`, request fields under their own names;
- drawn regions: `region_fields.REGION_ROWS` rows, each a prompt, a weight and a box (percent sliders) or a
  painted mask (a sketch canvas of the picture's aspect), under `region_fields.region_field(i, ...)`
  names; `convert.generation_request` turns the rows with a prompt into `request.regions`.
A preview draws the layout the job will use over the canvas, in colours, as the values change.
Paste parameters restore the syntax settings and box regions (the infotext has no masks).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from pipelines.core.regions import REGIONAL_MODES
from pipelines.core.request import RequestError
from webui import convert, region_fields
from webui.common import QUIET, Page, native_size

SYNTAX_HINT = ("**In the prompt:** `a garden ADDCOMM sunny ADDBASE blue sky ADDCOL a tree ADDROW red flowers`: "
               "ADDCOL starts the next column, ADDROW the next row (ADDCOMM: common to all, ADDBASE: the base). "
               "**Or draw regions** below; the prompt is then the base prompt for the rest of the picture. "
               "Painted masks are not stored in the PNG.")
SYNTAX_LABELS = {"regional_mode": "Split first", "regional_ratios": "Ratios",
                 "regional_base_ratios": "Base ratio"}


def add_regions(ui: Page, mode: str, fields: dict[str, Any], sized_for: str | None = None) -> None:
    """The accordion; adds the syntax settings and the rows' components to `fields`."""
    p = mode
    canvas = region_fields.preview_size(*([native_size(ui.engine, sized_for)] * 2))
    with gr.Accordion("Regional prompts", open=False, elem_id=f"{p}_regions"):
        gr.Markdown(SYNTAX_HINT, elem_id=f"{p}_regions_hint")
        with gr.Row():
            fields["regional_mode"] = gr.Radio(
                list(REGIONAL_MODES), value=convert.request_default("regional_mode"), elem_id=f"{p}_regional_mode",
                label=SYNTAX_LABELS["regional_mode"], info="Columns: rows of cells; Rows: columns of cells")
            fields["regional_ratios"] = gr.Textbox(
                value=convert.request_default("regional_ratios"), label=SYNTAX_LABELS["regional_ratios"],
                placeholder="1,1 or 1,2,1;2,1,1 (empty: equal)", elem_id=f"{p}_regional_ratios", min_width=140)
            fields["regional_base_ratios"] = gr.Textbox(
                value=convert.request_default("regional_base_ratios"), label=SYNTAX_LABELS["regional_base_ratios"],
                info="with ADDBASE", elem_id=f"{p}_regional_base_ratios", min_width=120)
        with gr.Tabs(elem_id=f"{p}_region_tabs"):
            shapes = [_row(p, index, fields, canvas) for index in range(region_fields.REGION_ROWS)]
        preview = gr.Image(region_fields.blank_preview(*canvas), label="Layout preview", type="pil",
                           interactive=False, format="png", height=260, elem_id=f"{p}_regions_preview")
        problem = gr.Markdown(visible=False, elem_id=f"{p}_regions_problem")
    ui.components[f"{mode}_regions"] = dict(preview=preview, problem=problem)
    _wire(mode, fields, shapes, preview, problem)


def _row(p: str, index: int, fields: dict[str, Any], canvas: tuple[int, int]) -> tuple[gr.Radio, gr.Group, Any]:
    """Region row `index`'s components, into `fields` by name; (shape radio, box group, mask canvas)."""
    def name(field: str) -> str:
        return region_fields.region_field(index, field)

    labels, e = region_fields.REGION_LABELS, f"{p}_region_{index}"
    with gr.Tab(region_fields.region_title(index), elem_id=f"{e}_tab"):
        fields[name("prompt")] = gr.Textbox(label=labels["prompt"], lines=2, elem_id=f"{e}_prompt",
                                            placeholder="this region's prompt (empty: the row is off)")
        with gr.Row():
            fields[name("weight")] = gr.Slider(0, 1, value=1.0, step=0.05, label=labels["weight"],
                                               elem_id=f"{e}_weight", min_width=140,
                                               info="its prompt's share there; the rest is the base prompt's")
            fields[name("shape")] = gr.Radio(list(region_fields.SHAPES), value=region_fields.SHAPES[0],
                                             label=labels["shape"], elem_id=f"{e}_shape", min_width=140,
                                             info="painting the canvas picks Mask; clearing it, Box")
        defaults = dict(zip(region_fields.BOX_SIDES, region_fields.DEFAULT_BOX))
        with gr.Group(visible=True, elem_id=f"{e}_box") as box:
            for pair in (("left", "right"), ("top", "bottom")):
                with gr.Row():
                    for side in pair:
                        fields[name(side)] = gr.Slider(0, 100, value=defaults[side], step=1, label=labels[side],
                                                       elem_id=f"{e}_{side}", min_width=120)
        # always shown: a canvas mounted hidden measures itself wrongly once shown (Gradio 6)
        fields[name("mask")] = gr.Sketchpad(
            label=labels["mask"], type="pil",
            image_mode="RGBA", canvas_size=canvas, fixed_canvas=True, transforms=(), layers=False,
            brush=gr.Brush(default_size=24, colors=["#e03c3c"], color_mode="fixed"), height=280, elem_id=f"{e}_mask")
    return fields[name("shape")], box, fields[name("mask")]


def _wire(mode: str, fields: dict[str, Any], shapes: list, preview: gr.Image, problem: gr.Markdown) -> None:
    for index, (shape, box, mask) in enumerate(shapes):
        def shape_changed(value=None):
            return gr.update(visible=value != region_fields.SHAPES[1])

        def mask_painted(value=None):  # a painted canvas is the region; a cleared one gives the box back
            return region_fields.SHAPES[1] if region_fields.painted_mask(value) is not None else region_fields.SHAPES[0]

        shape_changed.__name__ = f"{mode}_region_{index}_shape"
        mask_painted.__name__ = f"{mode}_region_{index}_painted"
        shape.change(shape_changed, inputs_kwargs={"value": shape}, outputs=box, **QUIET)
        mask.change(mask_painted, inputs_kwargs={"value": mask}, outputs=shape, **QUIET)
    names = ["prompt", "width", "height", "regional_mode", "regional_ratios", "regional_base_ratios"]
    inputs = {name: fields[name] for name in names if name in fields}
    inputs.update({name: component for name, component in fields.items()
                   if region_fields.split_region_field(name) is not None})

    def show_layout(**values):
        return preview_and_problem(values)

    show_layout.__name__ = f"{mode}_regions_preview"
    # width/height on release only: their .change fires on every keystroke, before a typed value
    # snaps to the slider's step (63 -> 64), and Gradio refuses the unsnapped value with a toast
    triggers = [component.release if name in ("width", "height") else component.change
                for name, component in inputs.items() if name != "prompt"]
    gr.on(triggers, show_layout, inputs_kwargs=inputs, outputs=[preview, problem], trigger_mode="always_last",
          **QUIET)
    canvases = [mask for _, _, mask in shapes]
    if "width" in fields and "height" in fields:
        def resize_canvases(width=512, height=512):
            size = region_fields.preview_size(int(width or 512), int(height or 512))
            return [gr.update(canvas_size=size) for _ in canvases]

        resize_canvases.__name__ = f"{mode}_regions_canvas"
        gr.on([fields["width"].release, fields["height"].release], resize_canvases,
              inputs_kwargs={"width": fields["width"], "height": fields["height"]}, outputs=canvases, **QUIET)


def preview_and_problem(values: dict[str, Any]) -> tuple:
    """The layout preview of the tab's values, and what is wrong with them (hidden when nothing is)."""
    rows: dict[int, dict[str, Any]] = {}
    for name, value in values.items():
        found = region_fields.split_region_field(name)
        if found is not None:
            rows.setdefault(found[0], {})[found[1]] = value
    width, height = int(values.get("width") or 512), int(values.get("height") or 512)
    try:
        request = SimpleNamespace(
            prompt=values.get("prompt") or "", regions=region_fields.regions_from_ui(rows, width, height),
            width=width, height=height, regional_mode=values.get("regional_mode") or REGIONAL_MODES[0],
            regional_ratios=values.get("regional_ratios") or "",
            regional_base_ratios=values.get("regional_base_ratios") or convert.request_default("regional_base_ratios"))
        return region_fields.layout_preview(request), gr.update(value="", visible=False)
    except RequestError as exc:
        where = region_fields.region_where(exc.field)
        message = f"{where}: {exc.message}" if where else convert.error_message(exc)
        return gr.skip(), gr.update(value=f"**Not yet a layout:** {message}", visible=True)
