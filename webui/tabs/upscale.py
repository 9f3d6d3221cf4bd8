"""The Upscale tab (A1111's Extras), with SD upscale in an accordion.

`UpscaleTab(ui).build()` lays out the tab inside the `gr.Tab` the app opened; its handlers
`upscale` and `sd_upscale` are what the app exposes under the same names. Values reach the
engine by name, like the generation tabs: component names are `UpscaleRequest` fields, plus
the UI-only `source` (which sub-tab: one image, several files, a folder), `batch_files`,
`batch_folder` and `upscale_mode`, translated here and in `webui.convert`.

SD upscale's tiles start at the checkpoint's native size and follow the session's checkpoint
as the generation tabs' sizes do (`sized_for`: Gradio drops updates to a tab not on screen, so
the tab catches up when selected). An image dropped in with generation parameters starts the
SD upscale prompt from its own, unless the user has written one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from pipelines.core.metadata_read import read_image_metadata
from pipelines.core.request import GenerationRequest, RequestError, UpscaleRequest
from webui import convert
from webui.common import (
    CONTROL_GROUP,
    QUEUED_GROUP,
    QUIET,
    Page,
    engine_choices,
    gallery_items,
    native_size,
    output_gallery,
    pick,
    request_error,
    saving,
    show_notices,
    slider,
    unchanged,
)
from webui.tabs import pnginfo

log = logging.getLogger(__name__)

SOURCES = ("Single image", "Batch", "Batch from folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SD_UPSCALE_SAMPLER = "Euler a"  # what the SD upscale accordion starts with
TILE_OVERLAP_SHARE = 64 / 512  # A1111's SD upscale: 64 px shared by its 512 px tiles
# What an SD upscale request takes from the accordion (the rest are its own settings).
SD_UPSCALE_FIELDS = ("prompt", "negative_prompt", "steps", "sampler", "denoising_strength", "cfg_scale",
                     "seed", "width", "height")
_DEFAULTS = UpscaleRequest.__dataclass_fields__
DEFAULT_UPSCALER = _DEFAULTS["upscaler"].default


class UpscaleTab:
    """Builds the Upscale tab into `ui` (`ui.fields["upscale"]`, `ui.fields["sd_upscale"]`)
    and runs its jobs."""

    def __init__(self, ui: Page):
        self.ui = ui
        self.engine = ui.engine

    def build(self, sized_for: str | None = None) -> None:
        """The tab's components and events; SD upscale's tiles native to checkpoint `sized_for`."""
        ui = self.ui
        names = [n for n in engine_choices(self.engine.upscaler_names, "upscaler names") if n != "None"]
        fields: dict[str, Any] = {}
        with gr.Row(equal_height=False):
            with gr.Column():
                fields["source"] = gr.Radio(list(SOURCES), value=SOURCES[0], label="Source",
                                            elem_id="upscale_source")
                fields["image"] = gr.Image(label="Input image", type="pil", image_mode=None,
                                           sources=["upload", "clipboard"], height=360, elem_id="upscale_image")
                fields["batch_files"] = gr.File(label="Images", file_count="multiple", file_types=["image"],
                                                elem_id="upscale_batch_files", visible=False)
                fields["batch_folder"] = gr.File(label="Folder (its images are upscaled)", file_count="directory",
                                                 elem_id="upscale_batch_folder", visible=False)
                fields["upscaler"] = gr.Dropdown(names, value=pick(DEFAULT_UPSCALER, names), label="Upscaler",
                                                 elem_id="upscale_upscaler")
                fields["upscale_mode"] = gr.Radio(list(convert.UPSCALE_MODES), value=convert.UPSCALE_MODES[0],
                                                  label="Resize", elem_id="upscale_mode")
                with gr.Group(visible=True) as by_group:
                    fields["scale"] = gr.Slider(1, 8, value=2, step=0.05, label="Scale by", elem_id="upscale_scale")
                with gr.Row(visible=False) as to_group:
                    fields["target_width"] = gr.Number(value=1024, label="Width", precision=0, minimum=8,
                                                       maximum=8192, elem_id="upscale_width")
                    fields["target_height"] = gr.Number(value=1024, label="Height", precision=0, minimum=8,
                                                        maximum=8192, elem_id="upscale_height")
                with gr.Row():
                    fields["upscaler_2"] = gr.Dropdown(["None", *names], value="None", label="Upscaler 2",
                                                       elem_id="upscale_upscaler_2")
                    fields["upscaler_2_visibility"] = slider("upscaler_2_visibility", value=0.0, step=0.01,
                                                             label="Upscaler 2 visibility",
                                                             elem_id="upscale_upscaler_2_visibility")
                with gr.Row():  # A1111's Extras: face restoration after upscaling (models/GFPGAN, models/Codeformer)
                    for name, label in (("gfpgan_visibility", "GFPGAN visibility"),
                                        ("codeformer_visibility", "CodeFormer visibility"),
                                        ("codeformer_weight", "CodeFormer weight (0 = max effect, 1 = min effect)")):
                        fields[name] = slider(name, value=_DEFAULTS[name].default, step=0.01, label=label,
                                              elem_id=f"upscale_{name}")
                with gr.Accordion("Tiling (neural upscalers)", open=False, elem_id="upscale_tiling"):
                    fields["tile_size"] = gr.Slider(0, 1024, value=_DEFAULTS["tile_size"].default, step=16,
                                                    label="Tile size (0 = whole image; halved automatically "
                                                          "when memory runs out)", elem_id="upscale_tile_size")
                    fields["tile_overlap"] = slider("tile_overlap", value=_DEFAULTS["tile_overlap"].default, step=4,
                                                    label="Tile overlap", elem_id="upscale_tile_overlap")
                with gr.Row():
                    button = gr.Button("Upscale", variant="primary", elem_id="upscale_button", scale=3)
                    interrupt = gr.Button("Interrupt", elem_id="upscale_interrupt", scale=1)
                sd_fields, sd_button = self._sd_upscale_options(names, native_size(self.engine, sized_for))
            with gr.Column():
                gallery = output_gallery("upscale_gallery", 1)
                send = pnginfo.send_buttons("upscale")  # wired by the app once every tab is built
                info = gr.Textbox(label="Info", lines=2, interactive=False, elem_id="upscale_info")
        last = gr.State(None)  # {"selected": i}: the image "Send to" takes
        gallery.select(select_image, outputs=last, **QUIET)
        sized_for = gr.State(sized_for)  # the checkpoint the tiles were sized for
        prompted = gr.State(None)  # {"prompt": ..., "negative_prompt": ...} the last image put in
        ui.fields["upscale"] = fields
        ui.components["upscale"] = dict(button=button, gallery=gallery, info=info, interrupt=interrupt,
                                        send=send, last=last, sized_for=sized_for, prompted=prompted)
        fields["source"].change(
            lambda chosen: tuple(gr.update(visible=chosen == name) for name in SOURCES),
            inputs=fields["source"], outputs=[fields["image"], fields["batch_files"], fields["batch_folder"]],
            queue=False, **QUIET)
        fields["upscale_mode"].change(
            lambda how: (gr.update(visible=how == convert.UPSCALE_MODES[0]),
                         gr.update(visible=how == convert.UPSCALE_MODES[1])),
            inputs=fields["upscale_mode"], outputs=[by_group, to_group], queue=False, **QUIET)
        button.click(self.upscale, inputs_kwargs=fields, outputs=[gallery, info], concurrency_id=QUEUED_GROUP,
                     concurrency_limit=ui.runner.capacity(), api_name="upscale")
        sd_inputs = {**sd_fields, "image": fields["image"], "checkpoint": ui.components["checkpoint"]}
        sd_button.click(self.sd_upscale, inputs_kwargs=sd_inputs, outputs=[gallery, info],
                        concurrency_id=QUEUED_GROUP, concurrency_limit=ui.runner.capacity(), api_name="sd_upscale")
        ui.fields["sd_upscale"] = sd_inputs
        interrupt.click(ui.runner.interrupt, concurrency_id=CONTROL_GROUP, concurrency_limit=None, **QUIET)
        prompts = [sd_fields["prompt"], sd_fields["negative_prompt"]]
        fields["image"].change(prompt_from_image, inputs=[fields["image"], *prompts, prompted],
                               outputs=[*prompts, prompted], queue=False, **QUIET)
        # a checkpoint picked while this tab is on screen resizes the tiles now (else on selection)
        checkpoint = ui.components["checkpoint"]
        checkpoint.input(self.on_checkpoint_pick, inputs_kwargs={
            "checkpoint": checkpoint, "sized_for": sized_for, "current_tab": ui.components["current_tab"]},
            outputs=self.sizing_components(), queue=False, **QUIET)

    # --- tiles follow the checkpoint ----------------------------------------------------------
    def sizing_components(self) -> list:
        sd = self.ui.fields["sd_upscale"]
        return [sd["width"], sd["height"], sd["sd_overlap"], self.ui.components["upscale"]["sized_for"]]

    def resize(self, checkpoint: str | None, sized_for: str | None = None) -> dict:
        """{component: value} setting the tiles (and their overlap) to the checkpoint's native
        size, if not yet."""
        if not checkpoint or checkpoint == sized_for:
            return {}
        native = native_size(self.engine, checkpoint)
        width, height, overlap, state = self.sizing_components()
        return {width: native, height: native, overlap: tile_overlap(native), state: checkpoint}

    def on_checkpoint_pick(self, checkpoint: str | None = None, sized_for: str | None = None,
                           current_tab: str | None = None) -> dict:
        return self.resize(checkpoint, sized_for) if current_tab == "upscale" else {}

    def _sd_upscale_options(self, names: list[str], native: int) -> tuple[dict[str, Any], gr.Button]:
        """An accordion under the upscale controls: img2img the upscaled image tile by tile with the
        header's checkpoint (A1111's "SD upscale" script), in tiles of `native` pixels to start with."""
        samplers = engine_choices(self.engine.sampler_names, "sampler names")
        fields: dict[str, Any] = {}
        with gr.Accordion("SD upscale (upscale, then img2img tile by tile)", open=False, elem_id="sd_upscale"):
            fields["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="sd_upscale_prompt")
            fields["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1,
                                                   elem_id="sd_upscale_neg_prompt")
            with gr.Row():
                fields["sd_upscaler"] = gr.Dropdown(names, value=pick(DEFAULT_UPSCALER, names), label="Upscaler",
                                                    elem_id="sd_upscale_upscaler")
                fields["sd_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Scale by",
                                               elem_id="sd_upscale_scale")
                fields["sd_overlap"] = gr.Slider(0, 256, value=tile_overlap(native), step=8, label="Tile overlap",
                                                 elem_id="sd_upscale_overlap")
            with gr.Row():
                fields["width"] = slider("width", value=native, step=8, label="Tile width",
                                         elem_id="sd_upscale_width", elem_classes="sdui-snap")
                fields["height"] = slider("height", value=native, step=8, label="Tile height",
                                          elem_id="sd_upscale_height", elem_classes="sdui-snap")
            with gr.Row():
                fields["sampler"] = gr.Dropdown(samplers, value=pick(SD_UPSCALE_SAMPLER, samplers),
                                                label="Sampling method", elem_id="sd_upscale_sampler")
                fields["steps"] = slider("steps", value=20, step=1, label="Sampling steps",
                                         elem_id="sd_upscale_steps")
                fields["denoising_strength"] = slider("denoising_strength", value=0.2, step=0.01,
                                                      label="Denoising strength", elem_id="sd_upscale_denoising")
                fields["cfg_scale"] = slider("cfg_scale", value=7.0, step=0.5, label="CFG scale",
                                             elem_id="sd_upscale_cfg")
                fields["seed"] = gr.Number(value=-1, label="Seed", precision=0, elem_id="sd_upscale_seed")
            button = gr.Button("SD upscale", variant="primary", elem_id="sd_upscale_button")
        return fields, button

    # --- handlers ---------------------------------------------------------------------------
    def upscale(self, request: gr.Request = None, progress=gr.Progress(), **fields) -> tuple:
        try:
            req = dataclasses.replace(upscale_request(fields), save_options=saving(self.engine))
        except RequestError as exc:
            raise request_error(exc) from None
        result = self.ui.runner.run("Upscale", request, progress if request is not None else None,
                                    lambda **job: self.engine.upscale(req, **job))
        if result is None:  # did not run (queue full, interrupted while waiting): said in a toast
            return unchanged(2)
        show_notices(result)
        infotexts = list(result.infotexts or [])
        info = infotexts[0] if infotexts else ""
        if not info and result.images:
            image, source = result.images[0], req.all_images[0]
            info = f"{req.upscaler}: {source.width}x{source.height} → {image.width}x{image.height}"
        if len(result.images) > 1:
            info = f"{len(result.images)} images upscaled. First: {info}"
        return gallery_items(result), info

    def sd_upscale(self, request: gr.Request = None, progress=gr.Progress(), image=None, checkpoint=None,
                   sd_upscaler=DEFAULT_UPSCALER, sd_scale=2.0, sd_overlap=64, **fields) -> tuple:
        if image is None:
            raise gr.Error("Input image: choose an image first (Single image).", print_exception=False)
        values = {name: fields[name] for name in SD_UPSCALE_FIELDS if name in fields}
        if values.get("seed") in (None, ""):
            values["seed"] = -1
        values = {k: (int(v) if isinstance(v, float) and v.is_integer() and k not in ("denoising_strength",
                                                                                       "cfg_scale") else v)
                  for k, v in values.items()}
        try:
            req = GenerationRequest(mode="img2img", init_image=convert.flatten(image), checkpoint=checkpoint or None,
                                    save_options=saving(self.engine), **values)
        except RequestError as exc:
            raise request_error(exc) from None
        result = self.ui.runner.run(
            "SD upscale", request, progress if request is not None else None,
            lambda **job: self.engine.sd_upscale(req, upscaler=sd_upscaler, scale=float(sd_scale),
                                                 overlap=int(sd_overlap), **job))
        if result is None:  # did not run (queue full, interrupted while waiting): said in a toast
            return unchanged(2)
        show_notices(result)
        infotexts = list(result.infotexts or [])
        return gallery_items(result), (infotexts[0] if infotexts else "")


def tile_overlap(tile: int) -> int:
    """SD upscale's overlap for tiles of `tile` px: A1111's share of its tile, on the slider's step of 8."""
    return max(8, int(round(tile * TILE_OVERLAP_SHARE / 8)) * 8)


def prompt_from_image(image: Image.Image | None = None, prompt: str | None = "", negative_prompt: str | None = "",
                      prompted: dict | None = None) -> tuple:
    """An image put into the tab: its own prompts (A1111, ComfyUI, ... parameters saved in it)
    go into SD upscale's boxes where the box is empty or still holds the previous image's;
    what the user wrote stays. Returns (prompt, negative prompt, what this image put in)."""
    found = image_prompts(image)
    if found is None:
        return gr.update(), gr.update(), prompted
    before = prompted or {}
    boxes = {"prompt": prompt or "", "negative_prompt": negative_prompt or ""}
    kept = {name: not (text.strip() == "" or text == before.get(name)) for name, text in boxes.items()}
    new = {name: boxes[name] if kept[name] else found[name] for name in boxes}
    return new["prompt"], new["negative_prompt"], {name: found[name] for name in boxes}


def image_prompts(image: Image.Image | None) -> dict | None:
    """{"prompt", "negative_prompt"} from an image's saved generation parameters; None without."""
    if not isinstance(image, Image.Image):
        return None
    meta = read_image_metadata(image)
    if not meta.found or not meta.fields.get("Prompt", "").strip():
        return None
    return {"prompt": meta.fields["Prompt"], "negative_prompt": meta.fields.get("Negative prompt", "")}


def select_image(evt: gr.SelectData) -> dict:
    return {"selected": evt.index if isinstance(evt.index, int) else 0}


def _open_images(files: Any) -> list[Image.Image]:
    """Images among uploaded files (Gradio's temp copies); other files are skipped."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    images = []
    for item in files:
        path = Path(getattr(item, "name", None) or getattr(item, "path", None) or str(item))
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as opened:
                opened.load()
                images.append(opened.copy())
        except OSError:
            log.warning("not an image: %s", path.name)
    return images


def upscale_request(fields: dict[str, Any]) -> UpscaleRequest:
    """Component values -> UpscaleRequest (raises RequestError)."""
    values = dict(fields)
    source = values.pop("source", None) or SOURCES[0]
    batch_files = values.pop("batch_files", None)
    batch_folder = values.pop("batch_folder", None)
    if source not in SOURCES:
        raise RequestError("source", f"unknown value {source!r}; choose one of: {', '.join(SOURCES)}")
    if source != SOURCES[0]:
        images = _open_images(batch_files if source == SOURCES[1] else batch_folder)
        if not images:
            raise RequestError("images", "upload some images first" if source == SOURCES[1]
                               else "choose a folder that holds images")
        images = [image if image.mode in ("RGB", "L") else convert.flatten(image) for image in images]
        values["image"], values["images"] = images[0], tuple(images[1:])
    for name in ("tile_size", "tile_overlap"):
        if isinstance(values.get(name), float) and values[name].is_integer():
            values[name] = int(values[name])
    return convert.upscale_request(values)
