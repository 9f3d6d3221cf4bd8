"""The Gradio Blocks UI, built from an injected engine.

`build_ui(engine, options)` creates everything: nothing happens at import time and no state
lives at module level. The returned `gr.Blocks` carries the `WebUI` object that built it as
`blocks.webui` (handlers, the per-session job registry, the named component maps), which is
what tests and the launcher use.

How values reach the engine: each generation tab keeps a dict `name -> component` whose names
are `GenerationRequest` fields (or a few UI-only names, see `webui.convert`). The Generate
event passes that dict to Gradio as `inputs_kwargs`, so the handler receives
`**{name: value}` and builds `GenerationRequest(**...)`; positions never matter.

Per-session state: the checkpoint dropdown in the header is an ordinary component, so its
value is per browser session; the last result of each tab (seeds, infotexts, selected image)
is a `gr.State`. Interrupt/Skip use `WebUI.jobs`, a `JobRegistry` keyed by
`gr.Request.session_hash` (see `webui.jobs`).

Concurrency: generate, upscale and SD upscale wait in the engine's one fair queue, shared
with the REST API (pipelines.core.jobs): their Gradio group ("queued") lets as many handlers in as
that queue holds, each shows "Waiting: N jobs ahead of you" until its turn, and a full queue
is a warning toast ("Queue full (N waiting), try again in a moment"), not an error. Loading a
checkpoint by hand keeps the group "generate" with limit 1. Interrupt/Skip are queued in their
own unlimited group ("control"), so they run at once, even while a job runs; they reach the
caller's job while it waits, too.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from pipelines.core.jobs import JobCancelled, QueueFull
from pipelines.core.request import INPAINT_FILLS, LIMITS, MAX_SEED, RESIZE_MODES, RequestError
from pipelines.core.uploads import UploadLimits
from pipelines.hosting.zerogpu import ZeroGPUError

from . import checkpoints_tab, convert, extensions_tab, networks_tab, pnginfo_tab, upscale_tab
from .jobs import JobRegistry
from .uploads import guard_uploads

log = logging.getLogger(__name__)

GENERATE_GROUP = "generate"
QUEUED_GROUP = "queued"  # handlers that wait in the engine's queue (see the module docstring)
GENERATION_MODES = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class UIOptions:
    title: str = "Stable Diffusion"
    gallery_columns: int = 4


CSS = """
#header { align-items: end; }
#loaded_line { font-size: 0.9em; opacity: 0.8; }
#footer { font-size: 0.85em; opacity: 0.7; text-align: center; }
.tool-button { max-width: 3em; min-width: 3em !important; }
"""


def build_ui(engine: Any, options: UIOptions | None = None) -> gr.Blocks:
    """Build the whole UI for `engine`; the WebUI object is reachable as `blocks.webui`."""
    return WebUI(engine, options or UIOptions()).build()


def _theme() -> gr.themes.Theme:
    # Local fonts only: the app must work fully offline (no Google Fonts request).
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )


class WebUI:
    """Owns the components and handlers of one built UI; created only by `build_ui`."""

    def __init__(self, engine: Any, options: UIOptions):
        self.engine = engine
        self.options = options
        self.jobs = JobRegistry()
        self.checkpoints_tab = checkpoints_tab.CheckpointsTab(engine, self._loaded_text, self._default_checkpoint)
        # tab -> {name: component}; the names are what the handlers receive.
        self.fields: dict[str, dict[str, gr.components.Component]] = {}
        self.components: dict[str, Any] = {}
        self.blocks: gr.Blocks | None = None
        self._initial_checkpoint: str | None = None

    # Arguments for Blocks.launch() that gradio 6 no longer takes in the Blocks constructor.
    def launch_kwargs(self) -> dict[str, Any]:
        # every waiting job holds a handler thread: Gradio's usual 40 on top of those
        return {"theme": _theme(), "css": CSS, "max_threads": 40 + (self.queue_capacity() or 0)}

    def queue_capacity(self) -> int | None:
        """Jobs the engine's queue holds at once (running + waiting); Gradio lets that many
        handlers of the "queued" group in. An engine without a queue: one at a time."""
        queue = getattr(self.engine, "queue", None)
        return queue.capacity() if queue is not None else 1

    # ------------------------------------------------------------------------------------------
    # layout
    # ------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        checkpoints = self._checkpoint_names()
        default_ckpt = self._default_checkpoint(checkpoints)
        self._initial_checkpoint = default_ckpt  # what the sliders were built for
        with gr.Blocks(title=self.options.title, analytics_enabled=False) as blocks:
            with gr.Row(elem_id="header", equal_height=False):
                checkpoint = gr.Dropdown(
                    choices=checkpoints, value=default_ckpt, label="Stable Diffusion checkpoint",
                    elem_id="checkpoint", scale=3, allow_custom_value=False,
                )
                vaes = self._vae_choices()
                vae = gr.Dropdown(choices=vaes, value=_pick("Automatic", vaes), label="SD VAE",
                                  elem_id="sd_vae", scale=2, allow_custom_value=False)
                # A1111 keeps clip skip beside the checkpoint too; per session, sent with each request
                low, high = LIMITS["clip_skip"]
                clip_skip = gr.Slider(low, high, value=convert.request_default("clip_skip"), step=1,
                                      label=convert.LABELS["clip_skip"], elem_id="clip_skip", scale=1,
                                      min_width=180)
                loaded = gr.Markdown(self._loaded_text(), elem_id="loaded_line")
            demo_note = gr.Markdown(self.demo_note(default_ckpt), elem_id="demo_note")
            # ticks only while a model is loading (switched on by the page load), to say when it is ready
            loading_timer = gr.Timer(1.0, active=False)
            loading_timer.tick(self.on_loading_tick, outputs=[loaded, loading_timer], show_progress="hidden",
                               api_visibility="undocumented", concurrency_limit=None)
            self.components.update(checkpoint=checkpoint, vae=vae, clip_skip=clip_skip, loaded=loaded,
                                   demo_note=demo_note, loading_timer=loading_timer)
            native = self._native(default_ckpt)
            # Width/height follow the session's checkpoint (its native size). Gradio 6 mounts tabs
            # lazily and drops updates sent to components of a tab not on screen, so each
            # generation tab remembers which checkpoint its sizes were set for (`sized_for`) and
            # catches up when it is selected; a checkpoint pick resizes the tab on screen.
            current_tab = gr.State("txt2img")
            self.components["current_tab"] = current_tab
            tabs: dict[str, gr.Tab] = {}
            with gr.Tabs(elem_id="tabs") as tab_switcher:
                for mode, label in (("txt2img", "txt2img"), ("img2img", "img2img"), ("inpaint", "Inpaint")):
                    with gr.Tab(label, id=mode, elem_id=f"tab_{mode}") as tabs[mode]:
                        self._generation_tab(mode, checkpoint, loaded, native)
                        self.components[mode]["sized_for"] = gr.State(default_ckpt)
                with gr.Tab("Upscale", id="upscale", elem_id="tab_upscale") as tabs["upscale"]:
                    self.upscale = upscale_tab.build(self)
                with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo") as tabs["pnginfo"]:
                    pnginfo_tab.build(self, tab_switcher)  # after the tabs its "Send to" buttons fill
                with gr.Tab("Checkpoints", id="checkpoints", elem_id="tab_checkpoints") as tabs["checkpoints"]:
                    self._checkpoints_tab(tabs["checkpoints"], checkpoint, loaded)
                extensions_tab.build_tabs(self, tabs, blocks)  # extensions' own tabs, then the Extensions tab
            footer = gr.Markdown(self._footer_text(), elem_id="footer")
            self.components["footer"] = footer

            sizing = [c for m in GENERATION_MODES for c in self._sizing_components(m)]
            for mode, tab in tabs.items():
                if mode in GENERATION_MODES:
                    tab.select(self.tab_select_handler(mode),
                               inputs_kwargs={"checkpoint": checkpoint,
                                              "sized_for": self.components[mode]["sized_for"]},
                               outputs=[current_tab, *self._sizing_components(mode)], show_progress="hidden",
                               api_visibility="undocumented")
                else:
                    tab.select(_constant(mode), outputs=current_tab, show_progress="hidden",
                               api_visibility="undocumented")
            for mode in GENERATION_MODES:
                fields, parts = self.fields[mode], self.components[mode]
                parts["read_params"].click(
                    self.read_parameters_handler(mode),
                    inputs_kwargs={"prompt": fields["prompt"], "last": parts["last"], "checkpoint": checkpoint},
                    outputs=list(dict.fromkeys([*fields.values(), parts["sized_for"]])),
                    show_progress="hidden", api_visibility="undocumented")
            # .input, not .change: a user's pick resizes; handlers that set the checkpoint
            # themselves (Load, Refresh, Read parameters) leave sizes to `sized_for`.
            checkpoint.input(self.on_checkpoint_pick, inputs_kwargs={"checkpoint": checkpoint,
                                                                     "current_tab": current_tab},
                             outputs=[*sizing, loaded, loading_timer], show_progress="hidden",
                             api_visibility="undocumented")
            # .change: whatever set the checkpoint (a pick, Load, Read parameters, a page load)
            checkpoint.change(self.demo_note, inputs=checkpoint, outputs=demo_note, queue=False,
                              show_progress="hidden", api_visibility="undocumented")
            # A new page gets the current list (it may have been refreshed since build time).
            blocks.load(self.on_page_load, outputs=[checkpoint, loaded, loading_timer,
                                                    *self._sizing_components("txt2img")],
                        show_progress="hidden", api_visibility="undocumented")
        guard_uploads(blocks, UploadLimits.of(getattr(self.engine, "settings", None)))
        blocks.webui = self  # type: ignore[attr-defined]
        self.blocks = blocks
        return blocks

    def _sizing_components(self, mode: str) -> list:
        return [self.fields[mode]["width"], self.fields[mode]["height"], self.components[mode]["sized_for"]]

    def _resize(self, mode: str, checkpoint: str | None, sized_for: str | None = None) -> dict:
        """{component: value} setting the tab's size to the checkpoint's native one, if not yet."""
        if not checkpoint or checkpoint == sized_for:
            return {}
        native = self._native(checkpoint)
        width, height, state = self._sizing_components(mode)
        return {width: native, height: native, state: checkpoint}

    def _generation_tab(self, mode: str, checkpoint, loaded, native: int) -> None:
        engine = self.engine
        p = mode  # elem_id prefix
        # per session like the checkpoint: the header's VAE and clip skip go into each request by name
        fields: dict[str, Any] = {"checkpoint": checkpoint, "vae": self.components["vae"],
                                  "clip_skip": self.components["clip_skip"]}
        with gr.Row(elem_id=f"{p}_toprow"):
            with gr.Column(scale=6):
                fields["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{p}_prompt",
                                              placeholder="Prompt (A1111 syntax)")
                fields["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2,
                                                       elem_id=f"{p}_neg_prompt")
            with gr.Column(scale=1, min_width=180):
                generate = gr.Button("Generate", variant="primary", size="lg", elem_id=f"{p}_generate")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", size="sm", elem_id=f"{p}_interrupt")
                    skip = gr.Button("Skip", size="sm", elem_id=f"{p}_skip")
                read_params = gr.Button("↙️ Read parameters", size="sm", elem_id=f"{p}_read_params")
        networks_tab.build(self, fields, p)  # styles, LoRA and embeddings pickers
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                if mode == "img2img":
                    fields["init_image"] = gr.Image(label="Input image", type="pil", image_mode="RGB",
                                                    sources=["upload", "clipboard"], height=360,
                                                    elem_id=f"{p}_image")
                elif mode == "inpaint":
                    fields["inpaint_image"] = gr.ImageMask(
                        label="Image (paint the part to change)", type="pil", image_mode="RGBA",
                        sources=["upload", "clipboard"], format="png", height=420, layers=False,
                        transforms=(), brush=gr.Brush(default_size=24, colors=["#ffffff", "#000000"],
                                                      color_mode="defaults"),
                        elem_id=f"{p}_image",
                    )
                    brush_size = gr.Slider(1, 200, value=24, step=1, label="Brush size",
                                           elem_id=f"{p}_brush_size")
                    fields["mask_blur"] = _slider("mask_blur", elem_id=f"{p}_mask_blur", step=1)
                    with gr.Row():
                        fields["mask_mode"] = gr.Radio(list(convert.MASK_MODES), value=convert.MASK_MODES[0],
                                                       label="Mask mode", elem_id=f"{p}_mask_mode")
                        fields["inpainting_fill"] = gr.Radio(
                            list(INPAINT_FILLS), value=convert.request_default("inpainting_fill"),
                            label="Masked content", elem_id=f"{p}_fill")
                    with gr.Row():
                        fields["inpaint_area"] = gr.Radio(list(convert.INPAINT_AREAS), value=convert.INPAINT_AREAS[0],
                                                          label="Inpaint area", elem_id=f"{p}_area")
                        fields["inpaint_full_res_padding"] = _slider(
                            "inpaint_full_res_padding", step=4, elem_id=f"{p}_padding")
                if mode != "txt2img":
                    fields["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=convert.request_default("resize_mode"),
                                                     label="Resize mode", elem_id=f"{p}_resize_mode")
                with gr.Row():
                    samplers = list(engine.sampler_names())
                    schedules = list(engine.schedule_types())
                    fields["sampler"] = gr.Dropdown(samplers, value=_pick(convert.request_default("sampler"), samplers),
                                                    label="Sampling method", elem_id=f"{p}_sampler")
                    fields["schedule_type"] = gr.Dropdown(
                        schedules, value=_pick(convert.request_default("schedule_type"), schedules),
                        label="Schedule type", elem_id=f"{p}_schedule")
                fields["steps"] = _slider("steps", step=1, elem_id=f"{p}_steps")
                with gr.Row():
                    with gr.Column(scale=3):
                        fields["width"] = _slider("width", value=native, step=8, elem_id=f"{p}_width")
                        fields["height"] = _slider("height", value=native, step=8, elem_id=f"{p}_height")
                    with gr.Column(scale=1, min_width=140):
                        fields["batch_count"] = _slider("batch_count", step=1, elem_id=f"{p}_batch_count")
                        fields["batch_size"] = _slider("batch_size", step=1, elem_id=f"{p}_batch_size")
                fields["cfg_scale"] = _slider("cfg_scale", step=0.5, elem_id=f"{p}_cfg_scale")
                if mode == "txt2img":
                    upscale_tab.hires_options(self, fields, p)
                if mode != "txt2img":
                    fields["denoising_strength"] = _slider("denoising_strength", step=0.01,
                                                           elem_id=f"{p}_denoising")
                with gr.Row(equal_height=True):
                    fields["seed"] = gr.Number(value=-1, label="Seed", precision=0, minimum=-1, maximum=MAX_SEED,
                                               elem_id=f"{p}_seed", scale=4)
                    random_seed = gr.Button("🎲", elem_id=f"{p}_random_seed", elem_classes="tool-button",
                                            scale=0, min_width=48)
                    reuse_seed = gr.Button("♻️", elem_id=f"{p}_reuse_seed", elem_classes="tool-button",
                                           scale=0, min_width=48)
                extensions_tab.add_sections(self, mode, fields)  # their values become request.extension_args
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Output", columns=self.options.gallery_columns, height=480,
                                     format="png", object_fit="contain", elem_id=f"{p}_gallery",
                                     interactive=False)
                infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                      elem_id=f"{p}_infotext", buttons=["copy"])
        last = gr.State(value=None)  # {"seeds": [...], "infotexts": [...], "selected": i}
        self.fields[mode] = fields
        self.components[mode] = dict(generate=generate, interrupt=interrupt, skip=skip, gallery=gallery,
                                     infotext=infotext, last=last, random_seed=random_seed,
                                     reuse_seed=reuse_seed, read_params=read_params)

        generate.click(
            self.generate_handler(mode), inputs_kwargs=fields, outputs=[gallery, infotext, last, loaded],
            show_progress="full", show_progress_on=[gallery], concurrency_id=QUEUED_GROUP,
            concurrency_limit=self.queue_capacity(), api_name=mode,
        )
        # Own unlimited group: never waits behind the running job (queue=True so gr.Info shows).
        interrupt.click(self.interrupt, concurrency_id="control", concurrency_limit=None, show_progress="hidden",
                        api_visibility="undocumented")
        skip.click(self.skip, concurrency_id="control", concurrency_limit=None, show_progress="hidden",
                   api_visibility="undocumented")
        gallery.select(self.select_image, inputs_kwargs={"last": last}, outputs=[infotext, last],
                       show_progress="hidden", api_visibility="undocumented")
        random_seed.click(lambda: -1, outputs=fields["seed"], queue=False, show_progress="hidden",
                          api_visibility="undocumented")
        reuse_seed.click(self.reuse_seed, inputs_kwargs={"last": last}, outputs=fields["seed"], queue=False,
                         show_progress="hidden", api_visibility="undocumented")
        # offer only the schedules this sampler can run, instead of failing at Generate
        fields["sampler"].change(self.schedule_choices, inputs_kwargs={"sampler": fields["sampler"],
                                                                       "current": fields["schedule_type"]},
                                 outputs=fields["schedule_type"], queue=False, show_progress="hidden",
                                 api_visibility="undocumented")
        if mode == "inpaint":
            brush_size.change(self.brush_update, inputs_kwargs={"size": brush_size},
                              outputs=fields["inpaint_image"], show_progress="hidden",
                              api_visibility="undocumented")

    def _checkpoints_tab(self, tab, checkpoint, loaded) -> None:
        self.checkpoints_tab.build(tab, checkpoint, loaded, GENERATE_GROUP)
        self.components["checkpoints"] = self.checkpoints_tab.components

    # ------------------------------------------------------------------------------------------
    # engine look-ups (never fatal for building the page)
    # ------------------------------------------------------------------------------------------
    def _checkpoint_infos(self, refresh: bool = False) -> list:
        return self.checkpoints_tab.infos(refresh)

    def _vae_choices(self) -> list[str]:
        """"Automatic", "None", then the VAE files, as the engine names them."""
        try:
            choices = list(self.engine.vae_choices() or [])
        except Exception:
            log.debug("VAE choices unavailable", exc_info=True)
            choices = []
        return choices or ["Automatic", "None"]

    def _checkpoint_names(self, refresh: bool = False) -> list[str]:
        return [info.name for info in self._checkpoint_infos(refresh)]

    def _checkpoint_rows(self, refresh: bool = False) -> list[list[str]]:
        return convert.checkpoint_rows(self._checkpoint_infos(refresh))

    def _default_checkpoint(self, names: list[str]) -> str | None:
        try:
            name = self.engine.default_checkpoint()
        except Exception:
            log.exception("default checkpoint failed")
            name = None
        if name in names:
            return name
        return names[0] if names else None

    def demo_note(self, checkpoint: str | None = None) -> str:
        info = next((i for i in self._checkpoint_infos() if i.name == checkpoint), None)
        if info is None:
            return ""
        try:
            folder = self.engine.paths.folder("checkpoints")
        except Exception:
            folder = "models/Stable-diffusion"
        return convert.demo_note(info, folder)

    def _native(self, checkpoint: str | None) -> int:
        try:
            value = int(self.engine.native_resolution(checkpoint))
        except Exception:
            log.exception("native resolution of %r failed", checkpoint)
            value = 512
        low, high = LIMITS["width"]
        return int(min(max(value - value % 8, low), high))

    def _loading(self) -> list[str]:
        try:
            return list(getattr(self.engine, "loading_checkpoints", list)())
        except Exception:
            log.exception("loading checkpoints failed")
            return []

    def _loaded_text(self, starting: str | None = None) -> str:
        """The loaded line; `starting`: a load just begun (its thread may not have said so yet)."""
        try:
            loading = list(dict.fromkeys([*self._loading(), *([starting] if starting else [])]))
            return convert.loaded_line(self.engine.loaded_checkpoints(), loading)
        except Exception:
            log.exception("loaded checkpoints failed")
            return ""

    def _footer_text(self) -> str:
        try:
            return convert.engine_line(self.engine.describe())
        except Exception:
            log.exception("describe failed")
            return ""

    # ------------------------------------------------------------------------------------------
    # handlers
    # ------------------------------------------------------------------------------------------
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
            fields, extension_args = extensions_tab.split_fields(self, fields)
            req = convert.generation_request(mode, fields)
            if extension_args:
                req = req.replace(extension_args={**req.extension_args, **extension_args})
        except RequestError as exc:
            raise gr.Error(convert.error_message(exc), print_exception=False) from None
        def start(**job):
            if job["on_progress"]:
                job["on_progress"](None)
            return self.engine.generate(req, **job)

        result = self.run_job("Generation", request, progress, start)
        if result is None:  # it did not run (queue full, or interrupted while waiting): the toast says so
            return unchanged(4)
        show_notices(result)
        images = _gallery_items(result)
        infotexts = list(result.infotexts or [])
        last = {"seeds": list(result.seeds or []), "infotexts": infotexts, "selected": 0}
        return images, (infotexts[0] if infotexts else ""), last, self._loaded_text()

    def run_job(self, what: str, request: gr.Request | None, progress: Any, call: Callable[..., Any]) -> Any:
        """Run an engine call as this browser session's job: `call(on_progress=, on_wait=,
        control=, owner=)` gets the progress and queue-position reporters and the session's
        JobControl (what Interrupt/Skip act on). None: it did not run (see `call_engine`)."""
        session = getattr(request, "session_hash", None)
        with self.jobs.run(session) as control:
            return call_engine(what, lambda: call(on_progress=_progress_reporter(progress),
                                                  on_wait=_wait_reporter(progress), control=control, owner=session))

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
            infotexts = last.get("infotexts") or []
            index = last.get("selected", 0)
            text = infotexts[index] if 0 <= index < len(infotexts) else (infotexts[0] if infotexts else "")
        values = convert.ui_values_from_infotext(text, names=self._checkpoint_infos())
        if values is None:
            gr.Info("No generation parameters found: paste a text with a 'Steps: ...' line into the prompt.")
            return {}
        fields = self.fields[mode]
        updates: dict = {}
        found = values.get("checkpoint")
        if found and found != checkpoint:
            # another checkpoint: this tab's size is for it (then the text's size, if it has one);
            # the other tabs catch up when selected
            updates.update(self._resize(mode, found))
            updates[fields["checkpoint"]] = found
        updates.update({fields[name]: value for name, value in values.items()
                        if name in fields and name != "checkpoint"})
        hint = values.get("_model_hint")
        if hint and not found:
            gr.Warning(f"Checkpoint {hint!r} from the parameters is not in the list; keeping {checkpoint}.")
        return updates

    def interrupt(self, request: gr.Request) -> None:
        if not self.jobs.interrupt(getattr(request, "session_hash", None)):
            gr.Info("Nothing of yours is running.")

    def skip(self, request: gr.Request) -> None:
        if not self.jobs.skip(getattr(request, "session_hash", None)):
            gr.Info("Nothing of yours is running.")

    def select_image(self, evt: gr.SelectData, last=None):
        if not last:
            return "", last
        index = evt.index if isinstance(evt.index, int) else 0
        infotexts = last.get("infotexts") or []
        text = infotexts[index] if 0 <= index < len(infotexts) else (infotexts[0] if infotexts else "")
        return text, {**last, "selected": index}

    def schedule_choices(self, sampler: str, current: str):
        allowed = list(self.engine.schedule_types(sampler))
        return gr.update(choices=allowed, value=current if current in allowed else allowed[0])

    def reuse_seed(self, last=None) -> int:
        seeds = (last or {}).get("seeds") or []
        if not seeds:
            gr.Info("Generate something first: there is no last seed yet.")
            return -1
        index = (last or {}).get("selected", 0)
        return int(seeds[index] if 0 <= index < len(seeds) else seeds[0])

    def brush_update(self, size: float):
        return gr.update(brush=gr.Brush(default_size=int(size), colors=["#ffffff", "#000000"],
                                        color_mode="defaults"))

    def on_checkpoint_pick(self, checkpoint: str | None = None, current_tab: str | None = None) -> dict:
        """The user picked a checkpoint: it starts loading if the server is idle (the loaded
        line follows it), the tab on screen takes its native size now, the others when they
        are selected (see `sized_for`)."""
        updates = {}
        preload = getattr(self.engine, "preload_when_idle", None)
        if checkpoint and preload is not None:
            try:
                if preload(checkpoint) is not None:
                    updates = {self.components["loaded"]: self._loaded_text(starting=checkpoint),
                               self.components["loading_timer"]: gr.Timer(active=True)}
            except Exception:
                log.exception("preloading %r failed", checkpoint)
        if current_tab not in GENERATION_MODES:
            return updates
        return {**updates, **self._resize(current_tab, checkpoint)}

    def tab_select_handler(self, mode: str) -> Callable[..., dict]:
        def select_tab(checkpoint=None, sized_for=None):
            return {self.components["current_tab"]: mode, **self._resize(mode, checkpoint, sized_for)}

        select_tab.__name__ = f"select_{mode}"
        return select_tab

    def on_page_load(self) -> dict:
        names = self._checkpoint_names()
        default = self._default_checkpoint(names)
        header = self.components["checkpoint"]
        return {header: gr.update(choices=names, value=default), self.components["loaded"]: self._loaded_text(),
                self.components["loading_timer"]: gr.Timer(active=bool(self._loading())),
                **self._resize("txt2img", default, self._initial_checkpoint)}

    def on_loading_tick(self) -> tuple:
        """The loaded line while a model loads; the timer stops once nothing is loading."""
        return self._loaded_text(), gr.Timer(active=bool(self._loading()))

    # the Checkpoints tab's handlers live in webui/checkpoints_tab.py
    def refresh_checkpoints(self, current: str | None = None, query: str | None = "", sort: str | None = None):
        return self.checkpoints_tab.refresh(current, query, sort)

    def load_checkpoint(self, name: str | None = None):
        return self.checkpoints_tab.load(name)


def _slider(name: str, value: float | None = None, step: float = 1, elem_id: str | None = None) -> gr.Slider:
    low, high = LIMITS[name]
    default = convert.request_default(name) if value is None else value
    return gr.Slider(low, high, value=default, step=step, label=convert.LABELS[name], elem_id=elem_id)


def _constant(value: Any) -> Callable[[], Any]:
    def constant():
        return value

    return constant


def _pick(preferred: str, choices: list[str]) -> str | None:
    if preferred in choices:
        return preferred
    return choices[0] if choices else None


def call_engine(what: str, call: Callable[[], Any]) -> Any:
    """Run an engine call; its errors reach the user as a gr.Error naming the field (bad
    request) or saying what failed, never as a traceback. A job that did not run is no error:
    a full queue is a warning toast, an interrupt while it waited a note, and None comes back
    (answer with `unchanged(n)`)."""
    try:
        return call()
    except QueueFull as exc:
        gr.Warning(str(exc))
        return None
    except JobCancelled:
        gr.Info("Interrupted while waiting: nothing ran.")
        return None
    except RequestError as exc:
        raise gr.Error(convert.error_message(exc), print_exception=False) from None
    except ZeroGPUError as exc:  # quota, duration, no GPU free: said as ZeroGPU said it
        raise gr.Error(str(exc), title="ZeroGPU", print_exception=False) from None
    except gr.Error:
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        raise gr.Error(f"{what} failed: {_describe_exception(exc)}", print_exception=False) from None


def show_notices(result: Any) -> None:
    """The result's warnings as toasts, and a note when the job was interrupted."""
    for warning in getattr(result, "warnings", None) or []:
        gr.Warning(str(warning))
    if getattr(result, "interrupted", False):
        gr.Info("Interrupted: showing what was finished.")


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _gallery_items(result: Any) -> list:
    """Saved PNG paths (they keep their metadata on download), else the images themselves."""
    images = list(result.images or [])
    paths = list(getattr(result, "paths", None) or [])
    if images and len(paths) == len(images) and all(paths):
        return paths
    return images


def unchanged(outputs: int) -> tuple:
    """A handler's answer that leaves its `outputs` components as they are."""
    return tuple(gr.skip() for _ in range(outputs))


def waiting_text(ahead: int) -> str:
    """What a waiting job's progress bar says; 0: its turn has come."""
    if ahead <= 0:
        return "Starting…"
    return f"Waiting: {ahead} job{'s' if ahead != 1 else ''} ahead of you"


def _progress_shower(progress: Any) -> Callable[[float, str], None] | None:
    """gr.Progress as a (fraction, text) function that works from any thread.

    gr.Progress finds its event through context variables; copying the handler's context
    lets the engine call back from a worker thread as well as from the handler thread.
    """
    if progress is None:
        return None
    context = contextvars.copy_context()

    def show(fraction: float, text: str) -> None:
        try:
            context.copy().run(progress, max(0.0, min(1.0, fraction)), desc=text)
        except Exception:  # progress display must never break a job
            log.debug("progress update failed", exc_info=True)

    return show


def _progress_reporter(progress: Any) -> Callable | None:
    """gr.Progress as an engine on_progress callback (None: the job is starting)."""
    show = _progress_shower(progress)
    if show is None:
        return None

    def on_progress(p) -> None:
        if p is None:
            show(0.0, "Starting…")
        else:
            show(p.fraction, p.describe())

    return on_progress


def _wait_reporter(progress: Any) -> Callable[[int], None] | None:
    """gr.Progress as the engine's on_wait callback: "Waiting: N jobs ahead of you"."""
    show = _progress_shower(progress)
    if show is None:
        return None
    return lambda ahead: show(0.0, waiting_text(ahead))
