"""The Settings tab: the server's saved settings (`pipelines.core.user_settings`), one component
per row of `SETTINGS`, grouped by section.

The tab and `/sdapi/v1/options` edit the same `SettingsStore` (`server_settings(engine)`):
"Apply settings" checks every value first (an error names the setting; nothing is saved),
then saves them all atomically in the data folder. A page shows the saved values when it
opens (a change made through the API shows on the next load, or with "Reload"). A job that
already runs keeps the settings its request was built with. On a hosted demo the settings
are shown but cannot be changed (they are the server's, shared by every visitor).

What a setting does on the page itself: a new page starts with `default_sampler` and the
header's VAE and clip skip from `sd_vae` and `CLIP_stop_at_last_layers` (changing them there
stays the session's own choice, as before); `theme` switches the page between light and dark
as it loads or when applied. The live-preview settings (`show_progress_type`, TAESD or the cheap
map, and `show_progress_every_n_steps`) shape the previews of /sdapi/v1/progress from the next job.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from pipelines.core.checks import RequestError
from pipelines.core.user_settings import (
    SECTIONS,
    SETTINGS,
    Setting,
    SettingsStore,
    server_settings,
    vae_setting_choices,
)
from webui.common import GENERATION_MODES, QUIET, Page, engine_choices

log = logging.getLogger(__name__)

HOSTED_NOTE = "These are the server's settings, shared by every visitor: a hosted demo does not change them."
# Gradio draws its dark palette under `.dark` on <body>; the theme setting toggles it.
THEME_JS = "(theme) => { document.body.classList.toggle('dark', theme === 'dark'); }"


class SettingsTab:
    """The tab's components and handlers (plain methods, so tests call them without a browser)."""

    def __init__(self, ui: Page):
        self.ui = ui
        self.engine = ui.engine
        self.store: SettingsStore = server_settings(ui.engine)
        self.components: dict[str, gr.components.Component] = {}

    @property
    def read_only(self) -> bool:
        return bool(getattr(self.engine.settings, "hosted", False))

    def choices(self) -> dict[str, list[str]]:
        """The engine's lists for the choices that depend on what it has."""
        return {"sd_vae": engine_choices(lambda: vae_setting_choices(self.engine), "VAE choices"),
                "default_sampler": engine_choices(self.engine.sampler_names, "sampler names")}

    # --- layout ----------------------------------------------------------------------------
    def build(self, blocks: gr.Blocks) -> None:
        values, choices = self.store.values(), self.choices()
        with gr.Column(elem_id="settings_panel"):
            if self.read_only:
                gr.Markdown(HOSTED_NOTE, elem_id="settings_hosted_note")
            with gr.Row():
                apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply",
                                  interactive=not self.read_only)
                reload = gr.Button("Reload", elem_id="settings_reload")
            status = gr.Markdown("", elem_id="settings_status")
            for section in SECTIONS:
                with gr.Accordion(section, open=True, elem_id=f"settings_section_{section.lower().replace(' ', '_')}"):
                    for setting in (s for s in SETTINGS.values() if s.section == section):
                        self.components[setting.key] = component(setting, values[setting.key],
                                                                 choices.get(setting.key), not self.read_only)
        self.ui.components["settings"] = dict(self.components, apply=apply, reload=reload, status=status)
        fields = list(self.components.values())
        theme = self.components["theme"]
        apply.click(self.apply, inputs_kwargs=self.components, outputs=[status, *fields], **QUIET).then(
            None, inputs=theme, js=THEME_JS, **QUIET)
        reload.click(self.current, outputs=fields, **QUIET).then(None, inputs=theme, js=THEME_JS, **QUIET)
        blocks.load(self.on_page_load, outputs=[*fields, *self.starting_values()], **QUIET).then(
            None, inputs=theme, js=THEME_JS, **QUIET)

    # --- handlers --------------------------------------------------------------------------
    def current(self) -> dict:
        """Every component showing the saved value."""
        values = self.store.values()
        return {self.components[key]: values[key] for key in self.components}

    def starting_values(self) -> dict:
        """{component: value} a new page starts from: the generation tabs' sampler, the header's
        VAE and clip skip (each session changes its own afterwards)."""
        values, choices = self.store.values(), self.choices()
        starts = {}
        if values["default_sampler"] in choices["default_sampler"]:
            starts.update({self.ui.fields[mode]["sampler"]: values["default_sampler"]
                           for mode in GENERATION_MODES if "sampler" in self.ui.fields.get(mode, {})})
        if values["sd_vae"] in choices["sd_vae"] and "vae" in self.ui.components:
            starts[self.ui.components["vae"]] = values["sd_vae"]
        if "clip_skip" in self.ui.components:
            starts[self.ui.components["clip_skip"]] = values["CLIP_stop_at_last_layers"]
        return starts

    def on_page_load(self) -> dict:
        """A new page: the saved settings, and what the page starts from."""
        return {**self.current(), **self.starting_values()}

    def apply(self, **values: Any) -> dict:
        """Check and save the changed settings; a bad one is a gr.Error naming it, and nothing is saved."""
        if self.read_only:
            raise gr.Error(HOSTED_NOTE, print_exception=False)
        saved = self.store.values()
        changes = {key: value for key, value in values.items() if key in SETTINGS and value != saved[key]}
        try:
            checked = self.store.update(changes, choices=self.choices())
        except RequestError as exc:
            label = SETTINGS[exc.field].label if exc.field in SETTINGS else exc.field
            raise gr.Error(f"{label} ({exc.field}): {exc.message}", print_exception=False) from None
        except OSError as exc:
            log.exception("saving settings failed")
            raise gr.Error(f"Settings not saved: {exc.strerror or exc}", print_exception=False) from None
        return {self.ui.components["settings"]["status"]: status_text(checked), **self.current()}


def status_text(changed: dict[str, Any]) -> str:
    if not changed:
        return "Nothing changed."
    names = ", ".join(SETTINGS[key].label for key in changed)
    pending = [SETTINGS[key].label for key in changed if SETTINGS[key].pending]
    text = f"Saved {len(changed)} setting{'s' if len(changed) != 1 else ''}: {names}."
    if pending:
        text += f" Not applied yet on this server: {', '.join(pending)}."
    return text


def component(setting: Setting, value: Any, choices: list[str] | None, editable: bool) -> gr.components.Component:
    """The input for one setting, labelled as the table says, with its key and what it does."""
    limits = f"{setting.low} to {setting.high}" if setting.kind == "int" else ""
    info = " · ".join(part for part in (setting.key, limits, setting.info,
                                        f"not applied yet: {setting.pending}" if setting.pending else "") if part)
    common = {"label": setting.label, "info": info, "elem_id": f"setting_{setting.key}", "interactive": editable}
    if setting.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if setting.kind == "int":
        # no minimum/maximum: Gradio's own range message would not name the setting; apply() does
        return gr.Number(value=value, precision=0, step=1, **common)
    if setting.kind == "text":
        return gr.Textbox(value=value, max_lines=1, **common)
    options = list(choices if choices is not None else setting.choices)
    if value not in options:
        options.append(value)  # a saved value the engine no longer offers stays visible
    return gr.Dropdown(options, value=value, **common)
