"""The header above the tabs (checkpoint, VAE, text encoders, clip skip, the loaded line), the
demo note under it and the footer, with their handlers.

The checkpoint dropdown is an ordinary component, so its value is per browser session; the
generation tabs send it (and the VAE, the text encoders and clip skip) with each request.
A1111's "SD VAE" dropdown stays as it is (Automatic, None, models/VAE); Forge's "VAE / Text
Encoder" pick of models/text_encoder files (clip_l, clip_g, t5xxl fp16 or fp8, for SD 3 and
Flux) is a multi-select beside it, shown when that folder has files; empty: automatic pairing. Picking a checkpoint
starts loading it when the server is idle, and the loaded line follows the load (a timer
ticks while anything loads). Sizes: see `webui.tabs.generation`.
"""

from __future__ import annotations

import logging

import gradio as gr

from pipelines.core.request import LIMITS
from webui import convert
from webui.common import (
    GENERATION_MODES,
    QUIET,
    Page,
    checkpoint_infos,
    default_checkpoint,
    engine_choices,
    loaded_text,
    loading_checkpoints,
    pick,
)
from webui.tabs.generation import GenerationTabs

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_FOLDER = "models/Stable-diffusion"  # said in the demo note when the engine cannot tell
TEXT_ENCODERS_LABEL = "Text encoders"


def encoder_choices(names: list[str]) -> list[tuple[str, str]]:
    """(label, file name) pairs: the label without ".safetensors" (every file of the folder has it),
    so that two chosen files fit the header's one line."""
    return [(name.removesuffix(".safetensors"), name) for name in names]


class Header:
    """Builds the header into `ui.components` and answers its events."""

    def __init__(self, ui: Page, generation: GenerationTabs):
        self.ui = ui
        self.engine = ui.engine
        self.generation = generation
        self.initial_checkpoint: str | None = None  # what the sliders were built for

    def checkpoint_names(self, refresh: bool = False) -> list[str]:
        return [info.name for info in checkpoint_infos(self.engine, refresh)]

    def text_encoder_names(self, refresh: bool = False) -> list[str]:
        return engine_choices(lambda: self.engine.text_encoder_names(refresh), "text encoder names")

    def build(self) -> str | None:
        """The header row, the demo note and the loading timer; returns the initial checkpoint."""
        checkpoints = self.checkpoint_names()
        initial = self.initial_checkpoint = default_checkpoint(self.engine, checkpoints)
        with gr.Row(elem_id="header", equal_height=False):
            checkpoint = gr.Dropdown(
                choices=checkpoints, value=initial, label="Stable Diffusion checkpoint",
                elem_id="checkpoint", scale=3, allow_custom_value=False,
            )
            vaes = engine_choices(self.engine.vae_choices, "VAE choices")  # "Automatic" first
            vae = gr.Dropdown(choices=vaes, value=pick(None, vaes), label="SD VAE",
                              elem_id="sd_vae", scale=2, allow_custom_value=False)
            encoders = self.text_encoder_names()
            text_encoders = gr.Dropdown(choices=encoder_choices(encoders), value=[], multiselect=True,
                                        label=TEXT_ENCODERS_LABEL, elem_id="sd_text_encoders", scale=3,
                                        allow_custom_value=False,
                                        interactive=True, visible=bool(encoders))  # (an input of every tab)
            # A1111 keeps clip skip beside the checkpoint too; per session, sent with each request
            low, high = LIMITS["clip_skip"]
            clip_skip = gr.Slider(low, high, value=convert.request_default("clip_skip"), step=1,
                                  label=convert.LABELS["clip_skip"], elem_id="clip_skip", scale=1,
                                  min_width=180)
            loaded = gr.Markdown(loaded_text(self.engine), elem_id="loaded_line")
        demo_note = gr.Markdown(self.demo_note(initial), elem_id="demo_note")
        # ticks only while a model is loading (switched on by the page load), to say when it is ready
        loading_timer = gr.Timer(1.0, active=False)
        loading_timer.tick(self.on_loading_tick, outputs=[loaded, loading_timer], concurrency_limit=None, **QUIET)
        self.ui.components.update(checkpoint=checkpoint, vae=vae, text_encoders=text_encoders,
                                  clip_skip=clip_skip, loaded=loaded,
                                  demo_note=demo_note, loading_timer=loading_timer)
        return initial

    def wire(self, blocks: gr.Blocks) -> None:
        """The header's events; after the tabs, whose sizes a pick and a page load set."""
        parts = self.ui.components
        checkpoint, loaded, timer = parts["checkpoint"], parts["loaded"], parts["loading_timer"]
        sizing = [c for mode in GENERATION_MODES for c in self.generation.sizing_components(mode)]
        # .input, not .change: a user's pick resizes; handlers that set the checkpoint
        # themselves (Load, Refresh, Read parameters) leave sizes to `sized_for`.
        checkpoint.input(self.on_checkpoint_pick, inputs_kwargs={"checkpoint": checkpoint,
                                                                 "current_tab": parts["current_tab"]},
                         outputs=[*sizing, loaded, timer], **QUIET)
        # .change: whatever set the checkpoint (a pick, Load, Read parameters, a page load)
        checkpoint.change(self.demo_note, inputs=checkpoint, outputs=parts["demo_note"], queue=False, **QUIET)
        # A new page gets the current list (it may have been refreshed since build time).
        blocks.load(self.on_page_load, outputs=[checkpoint, parts["text_encoders"], loaded, timer,
                                                *self.generation.sizing_components("txt2img")], **QUIET)

    # --- handlers ---------------------------------------------------------------------------
    def demo_note(self, checkpoint: str | None = None) -> str:
        if not checkpoint:
            return ""
        try:
            info = self.engine.find_checkpoint(checkpoint)
        except Exception:
            log.exception("finding checkpoint %r failed", checkpoint)
            info = None
        if info is None:
            return ""
        try:
            folder = self.engine.paths.folder("checkpoints")
        except Exception:
            folder = DEFAULT_CHECKPOINT_FOLDER
        return convert.demo_note(info, folder)

    def footer_text(self) -> str:
        try:
            return convert.engine_line(self.engine.describe())
        except Exception:
            log.exception("describe failed")
            return ""

    def on_checkpoint_pick(self, checkpoint: str | None = None, current_tab: str | None = None) -> dict:
        """The user picked a checkpoint: it starts loading if the server is idle (the loaded
        line follows it), the tab on screen takes its native size now, the others when they
        are selected (see `sized_for`)."""
        updates = {}
        if checkpoint:
            try:
                if self.engine.preload_when_idle(checkpoint) is not None:
                    updates = {self.ui.components["loaded"]: loaded_text(self.engine, starting=checkpoint),
                               self.ui.components["loading_timer"]: gr.Timer(active=True)}
            except Exception:
                log.exception("preloading %r failed", checkpoint)
        if current_tab not in GENERATION_MODES:
            return updates
        return {**updates, **self.generation.resize(current_tab, checkpoint)}

    def on_page_load(self) -> dict:
        names = self.checkpoint_names()
        default = default_checkpoint(self.engine, names)
        parts = self.ui.components
        encoders = self.text_encoder_names(refresh=True)  # files added since the page was built show up
        return {parts["checkpoint"]: gr.update(choices=names, value=default),
                parts["text_encoders"]: gr.update(choices=encoder_choices(encoders), visible=bool(encoders)),
                parts["loaded"]: loaded_text(self.engine),
                parts["loading_timer"]: gr.Timer(active=bool(loading_checkpoints(self.engine))),
                **self.generation.resize("txt2img", default, self.initial_checkpoint)}

    def on_loading_tick(self) -> tuple:
        """The loaded line while a model loads; the timer stops once nothing is loading."""
        return loaded_text(self.engine), gr.Timer(active=bool(loading_checkpoints(self.engine)))
