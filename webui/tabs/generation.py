"""The txt2img, img2img and Inpaint tabs: one layout with the mode as a parameter, and their handlers.

How values reach the engine: each tab keeps a dict `name -> component` (`ui.fields[mode]`)
whose names are `GenerationRequest` fields (or a few UI-only names, see `webui.convert`). The
Generate event passes that dict to Gradio as `inputs_kwargs`, so the handler receives
`**{name: value}` and builds `GenerationRequest(**...)`; positions never matter.

Width and height follow the session's checkpoint (its native size). Gradio 6 mounts tabs
lazily and drops updates sent to components of a tab not on screen, so each tab remembers
which checkpoint its sizes were set for (`sized_for`) and catches up when it is selected
(`resize`); a checkpoint pick resizes the tab on screen.
"""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from pipelines.core.request import INPAINT_FILLS, LIMITS, MAX_SEED, OUTPAINT_SIDES, RESIZE_MODES, RequestError
from webui import convert
from webui.common import (
    CONTROL_GROUP,
    GENERATE_LABEL,
    QUEUED_GROUP,
    QUIET,
    Page,
    busy_button,
    checkpoint_infos,
    gallery_items,
    idle_button,
    loaded_text,
    native_size,
    output_gallery,
    pick,
    request_error,
    saving,
    selected_infotext,
    show_notices,
    slider,
    snap_size,
    tool_button,
    unchanged,
)
from webui.tabs import controlnet, extensions, hires, image_prompts, networks, pnginfo, recommended, regions, speed

BRUSH_COLORS = ["#ffffff", "#000000"]  # white paints the mask; black takes it back
BRUSH_SHARE = 24 / 512  # the brush's width as a share of the image's longer side (24 px at 512)


class GenerationTabs:
    """Builds the generation tabs into `ui` and answers their events."""

    def __init__(self, ui: Page):
        self.ui = ui
        self.engine = ui.engine

    # --- sizes follow the checkpoint --------------------------------------------------------
    def sizing_components(self, mode: str) -> list:
        return [self.ui.fields[mode]["width"], self.ui.fields[mode]["height"], self.ui.components[mode]["sized_for"]]

    def resize(self, mode: str, checkpoint: str | None, sized_for: str | None = None) -> dict:
        """{component: value} setting the tab's size to the checkpoint's native one, if not yet."""
        if not checkpoint or checkpoint == sized_for:
            return {}
        native = native_size(self.engine, checkpoint)
        width, height, state = self.sizing_components(mode)
        return {width: native, height: native, state: checkpoint}

    def tab_select_handler(self, mode: str) -> Callable[..., dict]:
        def select_tab(checkpoint=None, sized_for=None):
            return {self.ui.components["current_tab"]: mode, **self.resize(mode, checkpoint, sized_for)}

        select_tab.__name__ = f"select_{mode}"
        return select_tab

    # --- layout -----------------------------------------------------------------------------
    def build(self, mode: str, sized_for: str | None) -> None:
        """One tab's components (inside its gr.Tab) and events; sizes native to `sized_for`."""
        ui = self.ui
        p = mode  # elem_id prefix
        header = ui.components
        # per session like the checkpoint: the header's VAE and clip skip go into each request by name
        fields: dict[str, Any] = {"checkpoint": header["checkpoint"], "vae": header["vae"],
                                  "text_encoders": header["text_encoders"], "clip_skip": header["clip_skip"]}
        with gr.Row(elem_id=f"{p}_toprow"):
            with gr.Column(scale=6):
                fields["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{p}_prompt",
                                              placeholder="Prompt (A1111 syntax)")
                fields["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2,
                                                       elem_id=f"{p}_neg_prompt")
            with gr.Column(scale=1, min_width=180):
                generate = gr.Button(GENERATE_LABEL, variant="primary", size="lg", elem_id=f"{p}_generate")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", size="sm", elem_id=f"{p}_interrupt")
                    skip = gr.Button("Skip", size="sm", elem_id=f"{p}_skip")
                read_params = gr.Button("Read parameters", size="sm", elem_id=f"{p}_read_params")
        networks.build(self.engine, fields, p)  # styles, LoRA and embeddings pickers
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                brush_size = self._image_inputs(mode, fields)
                self._sampling(mode, fields, native_size(self.engine, sized_for))
                with gr.Row(equal_height=True):
                    fields["seed"] = gr.Number(value=-1, label="Seed", precision=0, minimum=-1, maximum=MAX_SEED,
                                               elem_id=f"{p}_seed", scale=4)
                    random_seed = tool_button("dice", f"{p}_random_seed")
                    reuse_seed = tool_button("reuse", f"{p}_reuse_seed")
                seed_extras(fields, p)
                controlnet.add_units(ui, mode, fields)  # controlnet_<i>_* fields: request.control_units
                image_prompts.add_prompts(ui, mode, fields)  # image_prompt_<i>_*: more control_units (IP-Adapter)
                regions.add_regions(ui, mode, fields, sized_for)  # regional_*, region_<i>_*: the layout
                extensions.add_sections(ui, mode, fields)  # their values become request.extension_args
            with gr.Column(scale=1):
                gallery = output_gallery(f"{p}_gallery", ui.options.gallery_columns)
                send = pnginfo.send_buttons(mode)  # wired by the app once every tab is built
                infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                      elem_id=f"{p}_infotext", buttons=["copy"])
        last = gr.State(value=None)  # {"seeds": [...], "infotexts": [...], "selected": i}
        ui.fields[mode] = fields
        ui.components[mode] = dict(generate=generate, interrupt=interrupt, skip=skip, gallery=gallery,
                                   infotext=infotext, last=last, random_seed=random_seed,
                                   reuse_seed=reuse_seed, read_params=read_params, sized_for=gr.State(sized_for),
                                   send=send)
        self._wire(mode, brush_size)

    def _image_inputs(self, mode: str, fields: dict[str, Any]) -> gr.Slider | None:
        """img2img's input image; Inpaint's editor and mask settings (returns its brush size)."""
        p = mode
        brush_size = None
        if mode == "img2img":
            fields["init_image"] = gr.Image(label="Input image", type="pil", image_mode="RGB",
                                            sources=["upload", "clipboard"], height=360, elem_id=f"{p}_image")
        elif mode == "inpaint":
            fields["inpaint_image"] = gr.ImageMask(
                label="Image (paint the part to change)", type="pil", image_mode="RGBA",
                sources=["upload", "clipboard"], format="png", height=420, layers=False,
                transforms=(), brush=gr.Brush(default_size=24, colors=BRUSH_COLORS, color_mode="defaults"),
                elem_id=f"{p}_image", elem_classes="sdui-mask-editor",  # Undo keeps the image: webui.app
            )
            brush_size = gr.Slider(1, 200, value=24, step=1, label="Brush size", elem_id=f"{p}_brush_size")
            fields["mask_blur"] = slider("mask_blur", elem_id=f"{p}_mask_blur", step=1)
            with gr.Row():
                fields["mask_mode"] = gr.Radio(list(convert.MASK_MODES), value=convert.MASK_MODES[0],
                                               label="Mask mode", elem_id=f"{p}_mask_mode")
                fields["inpainting_fill"] = gr.Radio(
                    list(INPAINT_FILLS), value=convert.request_default("inpainting_fill"),
                    label="Masked content", elem_id=f"{p}_fill")
            with gr.Row():
                fields["inpaint_area"] = gr.Radio(list(convert.INPAINT_AREAS), value=convert.INPAINT_AREAS[0],
                                                  label="Inpaint area", elem_id=f"{p}_area")
                fields["inpaint_full_res_padding"] = slider(
                    "inpaint_full_res_padding", step=4, elem_id=f"{p}_padding")
        if mode != "txt2img":
            fields["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=convert.request_default("resize_mode"),
                                             label="Resize mode", elem_id=f"{p}_resize_mode")
            if mode == "inpaint":
                fields["soft_inpainting"] = gr.Checkbox(
                    False, label=convert.LABELS["soft_inpainting"], elem_id=f"{p}_soft_inpainting",
                    info="grey in the mask changes a pixel part of the way (differential diffusion)")
            with gr.Accordion("Outpainting", open=False, elem_id=f"{p}_outpaint"):
                gr.Markdown("Grows the canvas by these pixels and paints the new area; the picture's own size plus "
                            "the sides becomes the output size.")
                with gr.Row():
                    for side in OUTPAINT_SIDES:
                        fields[side] = slider(side, step=8, elem_id=f"{p}_{side}", min_width=120)
        return brush_size

    def _sampling(self, mode: str, fields: dict[str, Any], native: int) -> None:
        """Sampler, steps, size, batch, CFG; hires fix (txt2img) or denoising strength."""
        p = mode
        with gr.Row():
            samplers = list(self.engine.sampler_names())
            schedules = list(self.engine.schedule_types())
            fields["sampler"] = gr.Dropdown(samplers, value=pick(convert.request_default("sampler"), samplers),
                                            label="Sampling method", elem_id=f"{p}_sampler")
            fields["schedule_type"] = gr.Dropdown(
                schedules, value=pick(convert.request_default("schedule_type"), schedules),
                label="Schedule type", elem_id=f"{p}_schedule")
            use_recommended = recommended.button(p)
        fields["steps"] = slider("steps", step=1, elem_id=f"{p}_steps")
        with gr.Row():
            with gr.Column(scale=3):
                # sdui-snap: a typed size snaps to the step (webui.app's script), as A1111's sliders
                fields["width"] = slider("width", value=native, step=8, elem_id=f"{p}_width", elem_classes="sdui-snap")
                fields["height"] = slider("height", value=native, step=8, elem_id=f"{p}_height",
                                          elem_classes="sdui-snap")
            with gr.Column(scale=1, min_width=140):
                fields["batch_count"] = slider("batch_count", step=1, elem_id=f"{p}_batch_count")
                fields["batch_size"] = slider("batch_size", step=1, elem_id=f"{p}_batch_size")
        fields["cfg_scale"] = slider("cfg_scale", step=0.5, elem_id=f"{p}_cfg_scale")
        fields["tiling"] = gr.Checkbox(value=convert.request_default("tiling"), label=convert.LABELS["tiling"],
                                       elem_id=f"{p}_tiling", info="seamless: the picture repeats without a seam")
        fields["tiny_vae_decode"] = gr.Checkbox(
            value=convert.request_default("tiny_vae_decode"), label="Fast decode (TAESD)",
            elem_id=f"{p}_tiny_vae_decode", info="the tiny autoencoder of models/VAE-approx decodes: faster, "
                                                 "a little softer")
        self._face_restoration(fields, p)
        speed.build(fields, p)
        self._refiner(fields, p)
        self._flow_settings(fields, p)
        if mode == "txt2img":
            hires.build(self.engine, fields, p)
        else:
            fields["denoising_strength"] = slider("denoising_strength", step=0.01, elem_id=f"{p}_denoising")
        recommended.wire(self.engine, fields, use_recommended)  # after every field it may set

    def _face_restoration(self, fields: dict[str, Any], p: str) -> None:
        """"Restore faces" (A1111's checkbox, in sight); the model and CodeFormer's weight in a
        closed accordion under it."""
        names = [r["name"] for r in self.engine.face_restorers()]
        fields["restore_faces"] = gr.Checkbox(
            value=convert.request_default("restore_faces"), label=convert.LABELS["restore_faces"],
            elem_id=f"{p}_restore_faces",
            info="find faces and restore them (GFPGAN / CodeFormer / RestoreFormer)" if names
            else "no face restoration model: put one in models/GFPGAN or models/Codeformer")
        with gr.Accordion("Face restoration options", open=False, elem_id=f"{p}_face_restoration"):
            with gr.Row():
                fields["face_restorer"] = gr.Dropdown(["Automatic", *names], value="Automatic",
                                                      allow_custom_value=True, label=convert.LABELS["face_restorer"],
                                                      elem_id=f"{p}_face_restorer")
                fields["code_former_weight"] = slider("code_former_weight", step=0.01,
                                                      elem_id=f"{p}_code_former_weight")

    def _refiner(self, fields: dict[str, Any], p: str) -> None:
        """A1111 1.6's Refiner accordion: the checkpoint the last steps run on ("None": no refiner)
        and the share of the steps after which it takes over."""
        names = [info.name for info in checkpoint_infos(self.engine)]
        with gr.Accordion("Refiner", open=False, elem_id=f"{p}_refiner"):
            with gr.Row():
                fields["refiner_checkpoint"] = gr.Dropdown(["None", *names], value="None",
                                                           label=convert.LABELS["refiner_checkpoint"],
                                                           elem_id=f"{p}_refiner_checkpoint")
                fields["refiner_switch_at"] = slider("refiner_switch_at", step=0.01,
                                                     elem_id=f"{p}_refiner_switch_at")

    def _flow_settings(self, fields: dict[str, Any], p: str) -> None:
        """SD 3 / Flux: Forge's Distilled CFG Scale (Flux dev's guidance) and the schedule's Shift;
        0 (`convert.ZERO_MEANS_MODELS_OWN`): the model's own."""
        with gr.Accordion("SD 3 / Flux", open=False, elem_id=f"{p}_flow_settings"):
            with gr.Row():
                for name, info in (("distilled_cfg_scale", "Flux's guidance; 0: its own (dev 3.5, Kontext 2.5, "
                                                           "Fill 30). Real CFG runs only with CFG scale above 1"),
                                   ("shift", "the flow schedule's shift; 0: the model's own")):
                    fields[name] = gr.Number(value=0, minimum=0, maximum=LIMITS[name][1], label=convert.LABELS[name],
                                             info=info, elem_id=f"{p}_{name}")

    def _wire(self, mode: str, brush_size: gr.Slider | None) -> None:
        ui = self.ui
        fields, parts = ui.fields[mode], ui.components[mode]
        last, seed = parts["last"], fields["seed"]
        # The button says a job runs (and takes no click) until it ends, whatever the outcome
        # (Gradio's page runs .then only after a success: .failure too).
        job = parts["generate"].click(busy_button, outputs=parts["generate"], queue=False, **QUIET).then(
            self.generate_handler(mode), inputs_kwargs=fields,
            outputs=[parts["gallery"], parts["infotext"], last, ui.components["loaded"]],
            show_progress="full", show_progress_on=[parts["gallery"]], concurrency_id=QUEUED_GROUP,
            concurrency_limit=ui.runner.capacity(), api_name=mode,
        )
        job.then(idle_button, outputs=parts["generate"], queue=False, **QUIET)
        job.failure(idle_button, outputs=parts["generate"], queue=False, **QUIET)
        # Own unlimited group: never waits behind the running job (queue=True so gr.Info shows).
        parts["interrupt"].click(ui.runner.interrupt, concurrency_id=CONTROL_GROUP, concurrency_limit=None,
                                 **QUIET)
        parts["skip"].click(ui.runner.skip, concurrency_id=CONTROL_GROUP, concurrency_limit=None, **QUIET)
        parts["gallery"].select(self.select_image, inputs_kwargs={"last": last},
                                outputs=[parts["infotext"], last], **QUIET)
        parts["random_seed"].click(lambda: -1, outputs=seed, queue=False, **QUIET)
        parts["reuse_seed"].click(self.reuse_seed, inputs_kwargs={"last": last}, outputs=seed, queue=False,
                                  **QUIET)
        # offer only the schedules this sampler can run, instead of failing at Generate
        fields["sampler"].change(self.schedule_choices, inputs_kwargs={"sampler": fields["sampler"],
                                                                       "current": fields["schedule_type"]},
                                 outputs=fields["schedule_type"], queue=False, **QUIET)
        if brush_size is not None:
            brush_size.change(self.brush_update, inputs_kwargs={"size": brush_size},
                              outputs=fields["inpaint_image"], **QUIET)
            # a new image gets a brush in proportion, on the slider and in the editor
            fields["inpaint_image"].upload(self.brush_for_image, inputs_kwargs={"editor": fields["inpaint_image"]},
                                           outputs=[brush_size, fields["inpaint_image"]], **QUIET)
        parts["read_params"].click(
            self.read_parameters_handler(mode),
            inputs_kwargs={"prompt": fields["prompt"], "last": last, "checkpoint": fields["checkpoint"]},
            outputs=list(dict.fromkeys([*fields.values(), parts["sized_for"]])), **QUIET)

    # --- handlers ---------------------------------------------------------------------------
    def generate_handler(self, mode: str) -> Callable[..., tuple]:
        """The Generate handler of a tab: component values arrive as keyword arguments by name."""

        def generate(request: gr.Request, progress=gr.Progress(), **fields):
            return self.generate(mode, fields, request=request, progress=progress)

        generate.__name__ = f"generate_{mode}"
        return generate

    def generate(self, mode: str, fields: dict[str, Any], request: gr.Request | None = None,
                 progress: Any = None) -> tuple:
        """Validate, run on the engine under this session's JobControl, return the tab outputs."""
        try:
            fields, extension_args = extensions.split_fields(self.ui, fields)
            fields.update({name: snap_size(fields[name]) for name in ("width", "height") if name in fields})
            req = convert.generation_request(mode, fields).replace(save_options=saving(self.engine))
            if extension_args:
                req = req.replace(extension_args={**req.extension_args, **extension_args})
        except RequestError as exc:
            raise request_error(exc) from None

        def start(**job):
            if job["on_progress"]:
                job["on_progress"](None)
            return self.engine.generate(req, **job)

        result = self.ui.runner.run("Generation", request, progress, start)
        if result is None:  # it did not run (queue full, or interrupted while waiting): the toast says so
            return unchanged(4)
        show_notices(result)
        infotexts = list(result.infotexts or [])
        last = {"seeds": list(result.seeds or []), "infotexts": infotexts, "selected": 0}
        return gallery_items(result), (infotexts[0] if infotexts else ""), last, loaded_text(self.engine)

    def read_parameters_handler(self, mode: str) -> Callable[..., dict]:
        def read_parameters(prompt=None, last=None, checkpoint=None):
            return self.read_parameters(mode, prompt, last, checkpoint)

        read_parameters.__name__ = f"read_parameters_{mode}"
        return read_parameters

    def read_parameters(self, mode: str, prompt: str | None, last: dict | None = None,
                        checkpoint: str | None = None) -> dict:
        """Fill the tab from A1111 parameters pasted into the prompt (or, with an empty prompt,
        from the selected image of the last result). Returns {component: value} by field name."""
        text = prompt or ""
        if not text.strip() and last:
            text = selected_infotext(last, last.get("selected", 0))
        values = convert.ui_values_from_infotext(text, find_checkpoint=self.engine.find_checkpoint,
                                                 control_models=self.engine.control_models(),
                                                 text_encoder_names=self.engine.text_encoder_names())
        if values is None:
            gr.Info("No generation parameters found: paste a text with a 'Steps: ...' line into the prompt.")
            return {}
        fields = self.ui.fields[mode]
        updates: dict = {}
        found = values.get("checkpoint")
        if found and found != checkpoint:
            # another checkpoint: this tab's size is for it (then the text's size, if it has one);
            # the other tabs catch up when selected
            updates.update(self.resize(mode, found))
            updates[fields["checkpoint"]] = found
        updates.update({fields[name]: value for name, value in values.items()
                        if name in fields and name != "checkpoint"})
        hint = values.get(convert.MODEL_HINT)
        if hint and not found:
            gr.Warning(f"Checkpoint {hint!r} from the parameters is not in the list; keeping {checkpoint}.")
        return updates

    @staticmethod
    def select_image(evt: gr.SelectData, last=None):
        if not last:
            return "", last
        index = evt.index if isinstance(evt.index, int) else 0
        return selected_infotext(last, index), {**last, "selected": index}

    def schedule_choices(self, sampler: str, current: str):
        allowed = list(self.engine.schedule_types(sampler))
        return gr.update(choices=allowed, value=current if current in allowed else allowed[0])

    @staticmethod
    def reuse_seed(last=None) -> int:
        seeds = (last or {}).get("seeds") or []
        if not seeds:
            gr.Info("Generate something first: there is no last seed yet.")
            return -1
        index = (last or {}).get("selected", 0)
        return int(seeds[index] if 0 <= index < len(seeds) else seeds[0])

    @staticmethod
    def brush_for_image(editor: dict | None = None):
        """The brush size for the editor's image: `BRUSH_SHARE` of its longer side."""
        background = (editor or {}).get("background")
        if background is None:
            return gr.skip(), gr.skip()
        size = brush_size_for(background.size)
        return size, GenerationTabs.brush_update(size)

    @staticmethod
    def brush_update(size: float):
        return gr.update(brush=gr.Brush(default_size=int(size), colors=BRUSH_COLORS, color_mode="defaults"))


def seed_extras(fields: dict[str, Any], p: str) -> None:
    """A1111's seed "Extra": variation seed and strength, and "Resize seed from" (0 x 0: off)."""
    with gr.Accordion("Extra seed options", open=False, elem_id=f"{p}_seed_extras"):
        with gr.Row():
            fields["subseed"] = gr.Number(value=-1, label=convert.LABELS["subseed"], precision=0, minimum=-1,
                                          maximum=MAX_SEED, elem_id=f"{p}_subseed")
            fields["subseed_strength"] = slider("subseed_strength", step=0.01, elem_id=f"{p}_subseed_strength")
        with gr.Row():
            fields["seed_resize_from_w"] = slider("seed_resize_from_w", step=8, elem_id=f"{p}_seed_resize_from_w")
            fields["seed_resize_from_h"] = slider("seed_resize_from_h", step=8, elem_id=f"{p}_seed_resize_from_h")


def brush_size_for(size: tuple[int, int]) -> int:
    """A brush as wide as `BRUSH_SHARE` of the image's longer side (at least 1 px)."""
    return max(1, round(max(size) * BRUSH_SHARE))
