"""The PNG Info tab: drop an image, see how it was made, send its settings to a tab.

`build(ui, tabs)` lays out the tab inside the `gr.Tab` the app opened; `tabs` is the
`gr.Tabs` the "Send to" buttons switch. Reading is `pipelines.core.metadata_read` (this app's,
A1111's, ComfyUI's, InvokeAI's and Fooocus' metadata, all in A1111 terms); sending reuses the
"Read parameters" path (`ui.read_parameters`) on the A1111 text shown in the tab, so
whatever the user edits there is what gets sent. The "Send to" rows under the galleries
(`send_buttons`, `wire_gallery_sends`) send the selected image the same way, with the
parameters saved in it.

The image arrives as the uploaded file's path (`type="filepath"`): Gradio then hands over
the file as uploaded, with its text chunks and EXIF intact.
"""

from __future__ import annotations

import logging

import gradio as gr
from PIL import Image, UnidentifiedImageError

from pipelines.core.metadata_read import ImageMetadata, read_image_metadata
from webui import convert
from webui.common import QUIET, Page, selected_infotext

log = logging.getLogger(__name__)

NOTHING_FOUND = "No generation parameters found in this image."
TARGETS = (("txt2img", "Send to txt2img"), ("img2img", "Send to img2img"), ("inpaint", "Send to Inpaint"),
           ("upscale", "Send to Upscale"))
# What the SD upscale accordion takes from an image's parameters (its size, seed and
# denoising strength mean other things there).
SD_UPSCALE_FIELDS = ("prompt", "negative_prompt", "sampler", "steps", "cfg_scale")


def describe(path: str | None) -> tuple[str, list[list[str]], str, str]:
    """(summary line, [field, value] rows, A1111 parameters text, raw metadata) for a file."""
    if not path:
        return "", [], "", ""
    try:
        meta = read_image_metadata(path)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.info("PNG Info cannot read %s: %s", path, exc)
        return "**Not an image this tab can read.**", [], "", ""
    rows = [[key, value] for key, value in meta.fields.items() if not _derived(key, meta.fields)]
    return summary(meta), rows, meta.infotext, meta.raw


def _derived(key: str, fields: dict[str, str]) -> bool:
    """"Size-1"/"Size-2": the parser's split of "Size", not something the image says."""
    return key[-2:] in ("-1", "-2") and key[:-2] in fields


def summary(meta: ImageMetadata) -> str:
    if not meta.found:
        return f"**{NOTHING_FOUND}**" + (" Its other metadata is shown below." if meta.raw else "")
    return f"**Format:** {meta.format}"


def build(ui: Page, tabs: gr.Tabs) -> None:
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Image (PNG, JPEG or WebP)", type="filepath", image_mode=None,
                             sources=["upload", "clipboard"], height=420, elem_id="pnginfo_image")
            with gr.Row():
                buttons = {mode: gr.Button(label, elem_id=f"pnginfo_send_{mode}", size="sm")
                           for mode, label in TARGETS}
        with gr.Column():
            found = gr.Markdown("", elem_id="pnginfo_format")
            table = gr.Dataframe(headers=["Field", "Value"], datatype=["str", "str"], column_count=2,
                                 interactive=False, wrap=True, column_widths=["25%", "75%"],
                                 elem_id="pnginfo_fields", label="Parameters")
            infotext = gr.Textbox(label="As A1111 parameters (what Send to uses)", lines=4,
                                  elem_id="pnginfo_infotext", buttons=["copy"])
            with gr.Accordion("Raw metadata", open=False, elem_id="pnginfo_raw_accordion"):
                raw = gr.Textbox(label="Raw metadata", lines=8, max_lines=30, interactive=False,
                                 elem_id="pnginfo_raw", buttons=["copy"])
    ui.components["pnginfo"] = dict(image=image, found=found, table=table, infotext=infotext, raw=raw,
                                       buttons=buttons)
    image.change(describe, inputs=image, outputs=[found, table, infotext, raw], show_progress="hidden",
                 api_name="pnginfo")
    checkpoint, current_tab = ui.components["checkpoint"], ui.components["current_tab"]
    for mode, button in buttons.items():
        targets = _target_components(ui, mode)
        # Switch first, then fill: Gradio drops values sent to a tab that is not mounted.
        button.click(_constant_tab(mode), outputs=[tabs, current_tab], **QUIET).then(
            send_handler(ui, mode), inputs_kwargs={"text": infotext, "image": image, "checkpoint": checkpoint},
            outputs=targets, **QUIET)


def send_buttons(source: str) -> dict[str, gr.Button]:
    """The "Send to" row under `source`'s gallery: img2img, Inpaint, Upscale (and txt2img from img2img)."""
    with gr.Row(elem_id=f"{source}_send_row"):
        return {mode: gr.Button(label, elem_id=f"{source}_send_{mode}", size="sm", min_width=100)
                for mode, label in TARGETS if mode != "txt2img" or source == "img2img"}


def wire_gallery_sends(ui: Page, tabs: gr.Tabs, buttons: dict[str, gr.Button], gallery: gr.Gallery,
                       last: gr.State) -> None:
    """Each button sends the gallery's selected image (`last["selected"]`) and its parameters
    to its tab; once every target tab is built."""
    checkpoint, current_tab = ui.components["checkpoint"], ui.components["current_tab"]
    for mode, button in buttons.items():
        # Switch first, then fill: Gradio drops values sent to a tab that is not mounted.
        button.click(_gallery_tab(mode), inputs_kwargs={"gallery": gallery}, outputs=[tabs, current_tab],
                     **QUIET).success(
            gallery_send_handler(ui, mode), inputs_kwargs={"gallery": gallery, "last": last,
                                                           "checkpoint": checkpoint},
            outputs=_target_components(ui, mode), **QUIET)


def _gallery_tab(mode: str):
    def select(gallery=None):
        if not gallery:
            raise gr.Error("Nothing to send yet: the gallery is empty.", print_exception=False)
        return gr.Tabs(selected=mode), mode

    select.__name__ = f"gallery_show_{mode}"
    return select


def gallery_send_handler(ui: Page, mode: str):
    def send(gallery=None, last: dict | None = None, checkpoint: str | None = None) -> dict:
        path = selected_path(gallery, (last or {}).get("selected", 0))
        text = _saved_infotext(path) or (selected_infotext(last, last.get("selected", 0)) if last else "")
        return send_values(ui, mode, text, path, checkpoint)

    send.__name__ = f"gallery_send_{mode}"
    return send


def selected_path(gallery: list | None, index: int | None) -> str | None:
    """The file of the gallery's item at `index` (the first one when out of range); Gradio hands
    a gallery over as [(path, caption)]."""
    items = list(gallery or [])
    if not items:
        return None
    item = items[index] if isinstance(index, int) and 0 <= index < len(items) else items[0]
    return str(item[0] if isinstance(item, (tuple, list)) else item)


def _saved_infotext(path: str | None) -> str:
    """The parameters saved in the image file ("" when it has none)."""
    if not path:
        return ""
    try:
        return read_image_metadata(path).infotext or ""
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.info("cannot read the parameters of %s: %s", path, exc)
        return ""


def _constant_tab(mode: str):
    def select():
        return gr.Tabs(selected=mode), mode

    select.__name__ = f"pnginfo_show_{mode}"
    return select


def _target_components(ui: Page, mode: str) -> list:
    if mode == "upscale":
        sd = ui.fields["sd_upscale"]
        return [ui.fields["upscale"]["image"], sd["checkpoint"], *(sd[name] for name in SD_UPSCALE_FIELDS)]
    fields, parts = ui.fields[mode], ui.components[mode]
    return list(dict.fromkeys([*fields.values(), parts["sized_for"]]))


def send_handler(ui: Page, mode: str):
    def send(text: str | None = None, image: str | None = None, checkpoint: str | None = None) -> dict:
        return send_values(ui, mode, text, image, checkpoint)

    send.__name__ = f"pnginfo_send_{mode}"
    return send


def send_values(ui: Page, mode: str, text: str | None, image: str | None, checkpoint: str | None) -> dict:
    """{component: value} filling the target tab from an A1111 text, the image going to its
    input image (img2img, inpaint, upscale)."""
    if mode == "upscale":
        updates = _upscale_values(ui, text, checkpoint)
    else:
        updates = ui.read_parameters(mode, text or "", None, checkpoint) if (text or "").strip() else {}
    if image and mode != "txt2img":
        updates.update(_image_value(ui, mode, image))
    if not updates:
        gr.Info(NOTHING_FOUND)
    return updates


def _image_value(ui: Page, mode: str, path: str) -> dict:
    try:
        with Image.open(path) as opened:
            picture = convert.flatten(opened)
    except (OSError, UnidentifiedImageError) as exc:
        gr.Warning(f"The image could not be opened: {exc}")
        return {}
    if mode == "inpaint":
        editor = {"background": picture, "layers": [], "composite": picture}
        return {ui.fields["inpaint"]["inpaint_image"]: editor}
    if mode == "upscale":
        return {ui.fields["upscale"]["image"]: picture}
    return {ui.fields[mode]["init_image"]: picture}


def _upscale_values(ui: Page, text: str | None, checkpoint: str | None) -> dict:
    """The SD upscale accordion's prompt and sampling settings (and the header checkpoint)."""
    values = convert.ui_values_from_infotext(text or "", find_checkpoint=ui.engine.find_checkpoint)
    if values is None:
        return {}
    sd = ui.fields["sd_upscale"]
    updates = {sd[name]: values[name] for name in SD_UPSCALE_FIELDS if name in values}
    if values.get("checkpoint") and values["checkpoint"] != checkpoint:
        updates[sd["checkpoint"]] = values["checkpoint"]
    return updates
