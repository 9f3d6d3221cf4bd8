"""The Upscale tab (A1111's Extras) and the hires fix options of the txt2img tab.

`build(webui)` lays out the tab inside the `gr.Tab` the app opened and returns the upscale
handler (the app keeps it as `webui.upscale`). Values reach the engine by name, like the
generation tabs: component names are `UpscaleRequest` fields, plus the UI-only `source`
(which sub-tab: one image, several files, a folder), `batch_files`, `batch_folder` and
`upscale_mode`, translated here and in `webui.convert`.

`hires_options(webui, fields, prefix)` adds the hires fix accordion to a txt2img tab; its
component names are `GenerationRequest` hr_* fields, so `convert.generation_request` passes
them through unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from PIL import Image

from pipelines.core.request import HR_SAME_SAMPLER, LIMITS, RequestError, UpscaleRequest

from . import convert

log = logging.getLogger(__name__)

SOURCES = ("Single image", "Batch", "Batch from folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LATENT_FALLBACK = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                   "Latent (nearest)", "Latent (nearest-exact)")
SAME_SCHEDULE = "Use same scheduler"
_DEFAULTS = UpscaleRequest.__dataclass_fields__


def _names(engine: Any, method: str, fallback: list[str]) -> list[str]:
    if not hasattr(engine, method):
        return list(fallback)
    try:
        return list(getattr(engine, method)())
    except Exception:  # a listing must never break the page
        log.exception("%s failed", method)
        return list(fallback)


def _slider(name: str, default: float, step: float, label: str, elem_id: str, **kwargs) -> gr.Slider:
    low, high = LIMITS[name]
    return gr.Slider(low, high, value=default, step=step, label=label, elem_id=elem_id, **kwargs)


def build(webui: Any) -> Callable[..., tuple]:
    """Lay out the Upscale tab; returns its handler."""
    from .app import QUEUED_GROUP, _pick

    engine = webui.engine
    names = [n for n in _names(engine, "upscaler_names", ["Lanczos", "Nearest", "Bicubic"]) if n != "None"]
    fields: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column():
            fields["source"] = gr.Radio(list(SOURCES), value=SOURCES[0], label="Source", elem_id="upscale_source")
            fields["image"] = gr.Image(label="Input image", type="pil", image_mode=None,
                                       sources=["upload", "clipboard"], height=360, elem_id="upscale_image")
            fields["batch_files"] = gr.File(label="Images", file_count="multiple", file_types=["image"],
                                            elem_id="upscale_batch_files", visible=False)
            fields["batch_folder"] = gr.File(label="Folder (its images are upscaled)", file_count="directory",
                                             elem_id="upscale_batch_folder", visible=False)
            fields["upscaler"] = gr.Dropdown(names, value=_pick("Lanczos", names), label="Upscaler",
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
                fields["upscaler_2_visibility"] = _slider("upscaler_2_visibility", 0.0, 0.01,
                                                          "Upscaler 2 visibility", "upscale_upscaler_2_visibility")
            with gr.Accordion("Tiling (neural upscalers)", open=False, elem_id="upscale_tiling"):
                fields["tile_size"] = gr.Slider(0, 1024, value=_DEFAULTS["tile_size"].default, step=16,
                                                label="Tile size (0 = whole image; halved automatically "
                                                      "when memory runs out)", elem_id="upscale_tile_size")
                fields["tile_overlap"] = _slider("tile_overlap", _DEFAULTS["tile_overlap"].default, 4,
                                                 "Tile overlap", "upscale_tile_overlap")
            with gr.Row():
                button = gr.Button("Upscale", variant="primary", elem_id="upscale_button", scale=3)
                interrupt = gr.Button("Interrupt", elem_id="upscale_interrupt", scale=1)
            sd = _sd_upscale_options(webui, names)
        with gr.Column():
            gallery = gr.Gallery(label="Output", columns=1, height=480, format="png", object_fit="contain",
                                 elem_id="upscale_gallery", interactive=False)
            info = gr.Textbox(label="Info", lines=2, interactive=False, elem_id="upscale_info")
    webui.fields["upscale"] = fields
    webui.components["upscale"] = dict(button=button, gallery=gallery, info=info, interrupt=interrupt)
    fields["source"].change(
        lambda chosen: tuple(gr.update(visible=chosen == name) for name in SOURCES),
        inputs=fields["source"], outputs=[fields["image"], fields["batch_files"], fields["batch_folder"]],
        queue=False, show_progress="hidden", api_visibility="undocumented")
    fields["upscale_mode"].change(
        lambda how: (gr.update(visible=how == convert.UPSCALE_MODES[0]),
                     gr.update(visible=how == convert.UPSCALE_MODES[1])),
        inputs=fields["upscale_mode"], outputs=[by_group, to_group], queue=False, show_progress="hidden",
        api_visibility="undocumented")
    handler = make_handler(webui)
    button.click(handler, inputs_kwargs=fields, outputs=[gallery, info], concurrency_id=QUEUED_GROUP,
                 concurrency_limit=webui.queue_capacity(), api_name="upscale")
    sd_inputs = {**sd["fields"], "image": fields["image"], "checkpoint": webui.components["checkpoint"]}
    webui.sd_upscale = make_sd_upscale_handler(webui)
    sd["button"].click(webui.sd_upscale, inputs_kwargs=sd_inputs, outputs=[gallery, info],
                       concurrency_id=QUEUED_GROUP, concurrency_limit=webui.queue_capacity(), api_name="sd_upscale")
    webui.fields["sd_upscale"] = sd_inputs
    interrupt.click(webui.interrupt, concurrency_id="control", concurrency_limit=None, show_progress="hidden",
                    api_visibility="undocumented")
    return handler


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


def make_handler(webui: Any) -> Callable[..., tuple]:
    def upscale(request: gr.Request = None, progress=gr.Progress(), **fields):
        from .app import _gallery_items, show_notices, unchanged

        try:
            req = upscale_request(fields)
        except RequestError as exc:
            raise gr.Error(convert.error_message(exc), print_exception=False) from None
        result = webui.run_job("Upscale", request, progress if request is not None else None,
                               lambda **job: webui.engine.upscale(req, **job))
        if result is None:  # did not run (queue full, interrupted while waiting): said in a toast
            return unchanged(2)
        show_notices(result)
        infotexts = list(result.infotexts or [])
        info = infotexts[0] if infotexts else ""
        if not info and result.images:
            image = result.images[0]
            info = f"{req.upscaler}: {req.all_images[0].width}x{req.all_images[0].height} → {image.width}x{image.height}"
        if len(result.images) > 1:
            info = f"{len(result.images)} images upscaled. First: {info}"
        return _gallery_items(result), info

    return upscale


# --- SD upscale ------------------------------------------------------------------------------

SD_UPSCALE_FIELDS = ("prompt", "negative_prompt", "steps", "sampler", "denoising_strength", "cfg_scale",
                     "seed", "width", "height")


def _sd_upscale_options(webui: Any, names: list[str]) -> dict:
    """An accordion under the upscale controls: img2img the upscaled image tile by tile with the
    header's checkpoint (A1111's "SD upscale" script)."""
    from .app import _pick

    samplers = _names(webui.engine, "sampler_names", [])
    fields: dict[str, Any] = {}
    with gr.Accordion("SD upscale (upscale, then img2img tile by tile)", open=False, elem_id="sd_upscale"):
        fields["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="sd_upscale_prompt")
        fields["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="sd_upscale_neg_prompt")
        with gr.Row():
            fields["sd_upscaler"] = gr.Dropdown(names, value=_pick("Lanczos", names), label="Upscaler",
                                                elem_id="sd_upscale_upscaler")
            fields["sd_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Scale by", elem_id="sd_upscale_scale")
            fields["sd_overlap"] = gr.Slider(0, 256, value=64, step=8, label="Tile overlap",
                                             elem_id="sd_upscale_overlap")
        with gr.Row():
            fields["width"] = _slider("width", 512, 8, "Tile width", "sd_upscale_width")
            fields["height"] = _slider("height", 512, 8, "Tile height", "sd_upscale_height")
        with gr.Row():
            fields["sampler"] = gr.Dropdown(samplers, value=_pick("Euler a", samplers) if samplers else None,
                                            label="Sampling method", elem_id="sd_upscale_sampler")
            fields["steps"] = _slider("steps", 20, 1, "Sampling steps", "sd_upscale_steps")
            fields["denoising_strength"] = _slider("denoising_strength", 0.2, 0.01, "Denoising strength",
                                                   "sd_upscale_denoising")
            fields["cfg_scale"] = _slider("cfg_scale", 7.0, 0.5, "CFG scale", "sd_upscale_cfg")
            fields["seed"] = gr.Number(value=-1, label="Seed", precision=0, elem_id="sd_upscale_seed")
        button = gr.Button("SD upscale", variant="primary", elem_id="sd_upscale_button")
    return {"fields": fields, "button": button}


def make_sd_upscale_handler(webui: Any) -> Callable[..., tuple]:
    def sd_upscale(request: gr.Request = None, progress=gr.Progress(), image=None, checkpoint=None,
                   sd_upscaler="Lanczos", sd_scale=2.0, sd_overlap=64, **fields):
        from pipelines.core.request import GenerationRequest

        from .app import _gallery_items, show_notices, unchanged

        if image is None:
            raise gr.Error("Input image: choose an image first (Single image).", print_exception=False)
        values = {name: fields[name] for name in SD_UPSCALE_FIELDS if name in fields}
        if values.get("seed") in (None, ""):
            values["seed"] = -1
        values = {k: (int(v) if isinstance(v, float) and v.is_integer() and k != "denoising_strength"
                      and k != "cfg_scale" else v) for k, v in values.items()}
        try:
            req = GenerationRequest(mode="img2img", init_image=convert.flatten(image), checkpoint=checkpoint or None,
                                    **values)
        except RequestError as exc:
            raise gr.Error(convert.error_message(exc), print_exception=False) from None
        result = webui.run_job("SD upscale", request, progress if request is not None else None,
                               lambda **job: webui.engine.sd_upscale(req, upscaler=sd_upscaler, scale=float(sd_scale),
                                                                     overlap=int(sd_overlap), **job))
        if result is None:  # did not run (queue full, interrupted while waiting): said in a toast
            return unchanged(2)
        show_notices(result)
        infotexts = list(result.infotexts or [])
        return _gallery_items(result), (infotexts[0] if infotexts else "")

    return sd_upscale


# --- hires fix options (txt2img) -------------------------------------------------------------

def hires_options(webui: Any, fields: dict[str, Any], prefix: str) -> None:
    """The hires fix accordion of a txt2img tab; adds hr_* components to `fields`."""
    from .app import _pick

    engine = webui.engine
    upscaler_names = _names(engine, "hires_upscaler_names",
                            [*LATENT_FALLBACK, *_names(engine, "upscaler_names", [])])
    samplers = [HR_SAME_SAMPLER, *_names(engine, "sampler_names", [])]
    schedules = [SAME_SCHEDULE, *_names(engine, "schedule_types", [])]
    p = prefix
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{p}_hires"):
        fields["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix (generate, upscale, then a second "
                                                       "img2img pass)", elem_id=f"{p}_enable_hr")
        with gr.Row():
            fields["hr_upscaler"] = gr.Dropdown(upscaler_names, value=_pick("Latent", upscaler_names),
                                                label="Upscaler", elem_id=f"{p}_hr_upscaler")
            fields["hr_second_pass_steps"] = _slider("hr_second_pass_steps", 0, 1, "Hires steps (0 = same)",
                                                     f"{p}_hires_steps")
            fields["hr_denoising_strength"] = _slider("hr_denoising_strength", 0.7, 0.01, "Denoising strength",
                                                      f"{p}_hr_denoising_strength")
        with gr.Row():
            fields["hr_scale"] = _slider("hr_scale", 2.0, 0.05, "Upscale by", f"{p}_hr_scale")
            fields["hr_resize_x"] = _slider("hr_resize_x", 0, 8, "Resize width to (0 = by scale)", f"{p}_hr_resize_x")
            fields["hr_resize_y"] = _slider("hr_resize_y", 0, 8, "Resize height to", f"{p}_hr_resize_y")
        with gr.Row():
            fields["hr_sampler"] = gr.Dropdown(samplers, value=HR_SAME_SAMPLER, label="Hires sampling method",
                                               elem_id=f"{p}_hr_sampler")
            fields["hr_schedule_type"] = gr.Dropdown(schedules, value=SAME_SCHEDULE, label="Hires schedule type",
                                                     elem_id=f"{p}_hr_schedule")
        fields["hr_prompt"] = gr.Textbox(label="Hires prompt (empty = same)", lines=2, elem_id=f"{p}_hr_prompt")
        fields["hr_negative_prompt"] = gr.Textbox(label="Hires negative prompt (empty = same)", lines=2,
                                                  elem_id=f"{p}_hr_neg_prompt")
