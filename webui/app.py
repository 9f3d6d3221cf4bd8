"""The Gradio Blocks UI, built from an injected engine: the page's layout and wiring.

`build_ui(engine, options)` creates everything: nothing happens at import time and no state
lives at module level. The returned `gr.Blocks` carries the `WebUI` object that built it as
`blocks.webui` (handlers, the per-session job registry, the named component maps), which is
what tests and the launcher use.

Where things are: the header and footer in `webui.tabs.header`; the txt2img, img2img and
Inpaint tabs in `webui.tabs.generation` (how values reach the engine by name, and how sizes
follow the checkpoint); one module per other tab in `webui.tabs`; running a job for a browser
session (queue, progress, Interrupt/Skip, notices) in `webui.common`.

Per-session state: the checkpoint dropdown in the header is an ordinary component, so its
value is per browser session; the last result of each tab (seeds, infotexts, selected image)
is a `gr.State`. Interrupt/Skip use `WebUI.jobs`, a `JobRegistry` keyed by
`gr.Request.session_hash` (see `webui.jobs`).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Callable
from urllib.parse import quote

import gradio as gr

from pipelines.core.engine_api import EngineAPI
from pipelines.core.uploads import UploadLimits
from webui.common import (
    GALLERY_HEIGHT,
    GENERATE_GROUP,
    GENERATION_MODES,
    QUIET,
    TOOL_ICONS,
    JobRunner,
    UIOptions,
    constant,
    default_checkpoint,
    loaded_text,
)
from webui.jobs import JobRegistry
from webui.tabs import extensions, pnginfo
from webui.tabs.browser import BrowserTab
from webui.tabs.checkpoints import CheckpointsTab
from webui.tabs.generation import GenerationTabs
from webui.tabs.header import Header
from webui.tabs.merge import MergeTab
from webui.tabs.settings import SettingsTab
from webui.tabs.upscale import UpscaleTab
from webui.uploads import guard_uploads

BASE_CSS = """
#header { align-items: end; }
#loaded_line { font-size: 0.9em; opacity: 0.8; }
#footer { font-size: 0.85em; opacity: 0.7; text-align: center; }
.tool-button { max-width: 3em; min-width: 3em !important; }
/* a thumbnail is square and as wide as its column: cap it so that it fits the gallery's height */
.sdui-gallery .gallery-item { display: flex; justify-content: center; }
.sdui-gallery .thumbnail-lg { width: min(100%, {thumb}px); height: auto; }
/* a failed job leaves the images the user had in sight (the toast says what failed) */
.sdui-gallery [data-testid=status-tracker]:has(> .error) { display: none; }
/* a slider's label keeps its words on one line: where label and number box do not fit side by
   side, the box moves under the label (instead of the label wrapping a word per line) */
.head:has(+ .slider_input_container) > label { flex: 1 0 auto; max-width: 100%; }
.head:has(+ .slider_input_container) > .tab-like-container { margin-left: auto; }
/* a narrow slider's track gives way, so its max value stays in sight (Outpainting's four sliders) */
.slider_input_container input[type=range] { min-width: 0; }
/* "Clip skip" and its box side by side in the header */
#clip_skip { min-width: min(230px, 100%) !important; }
/* the header's text encoder pick stays one line high: the chosen files scroll sideways in it */
#sd_text_encoders .wrap-inner { flex-wrap: nowrap; overflow-x: auto; scrollbar-width: thin; }
#sd_text_encoders .token { flex-shrink: 0; white-space: nowrap; }
/* tables: columns share the width (column_widths), long names and paths wrap inside them */
#checkpoints_table td, #extensions_table td { overflow-wrap: anywhere; }
/* ...but on a phone they would be squeezed a letter wide: there the table keeps a readable
   width and scrolls sideways inside its box */
@media (max-width: 1100px) {
  #checkpoints_table .table-wrap, #extensions_table .table-wrap { min-width: 1200px; }
}
"""
# the page's script: tooltips on the tool buttons, A1111's Ctrl+Enter (Generate) and Escape
# (Interrupt the running job), typed values that snap to their slider's step, and a mask
# editor's Undo that takes back strokes but never the image (Gradio's history holds the upload)
SCRIPT = """
() => {
  const tips = %(tips)s;
  const label = () => {
    for (const [cls, tip] of Object.entries(tips)) {
      document.querySelectorAll('.' + cls).forEach(b => {
        if (!b.title) { b.title = tip; b.setAttribute('aria-label', tip); }
      });
    }
  };
  new MutationObserver(label).observe(document.body, {childList: true, subtree: true});
  label();
  const shown = ids => ids.map(id => document.getElementById(id)).find(e => e && e.offsetParent !== null);
  const modes = %(modes)s;
  document.addEventListener('keydown', e => {
    const generate = shown(modes.map(m => m + '_generate'));
    if (!generate) return;
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !generate.disabled) {
      e.preventDefault();
      generate.click();
    } else if (e.key === 'Escape' && generate.disabled) {
      document.getElementById(generate.id.replace(/_generate$/, '_interrupt')).click();
    }
  });
  document.addEventListener('change', e => {
    const box = e.target;
    if (!(box instanceof HTMLInputElement) || box.type !== 'number' || !box.closest('.sdui-snap')) return;
    const step = parseFloat(box.step), low = parseFloat(box.min) || 0, value = parseFloat(box.value);
    if (!(step > 0) || Number.isNaN(value)) return;
    const snapped = Math.floor((value - low) / step + 0.5) * step + low;
    if (snapped !== value) {
      box.value = snapped;
      box.dispatchEvent(new Event('input', {bubbles: true}));
    }
  }, true);
  const strokes = new WeakMap();  // mask editor -> strokes Undo may take back
  const editorOf = e => e.target instanceof Element ? e.target.closest('.sdui-mask-editor') : null;
  const painting = editor => [...editor.querySelectorAll('button[aria-label=Brush], button[aria-label=Erase]')]
    .some(b => b.classList.contains('highlight'));
  document.addEventListener('pointerdown', e => {
    const editor = editorOf(e);
    if (editor && e.target.tagName === 'CANVAS' && painting(editor)) {
      strokes.set(editor, (strokes.get(editor) || 0) + 1);
    }
  }, true);
  const newImage = e => {  // an upload, a drop or a paste: the image itself
    const editor = editorOf(e);
    if (editor && (e.type !== 'change' || e.target.type === 'file')) strokes.set(editor, 0);
  };
  for (const kind of ['change', 'drop', 'paste']) document.addEventListener(kind, newImage, true);
  document.addEventListener('click', e => {
    const editor = editorOf(e);
    const button = editor && e.target.closest('button');
    if (!button) return;
    const label = button.getAttribute('aria-label'), count = strokes.get(editor) || 0;
    if (label === 'Undo') {
      if (count === 0) { e.stopImmediatePropagation(); e.preventDefault(); } else strokes.set(editor, count - 1);
    } else if (label === 'Redo' && !button.disabled) {
      strokes.set(editor, count + 1);
    } else if (label === 'Clear canvas') {
      strokes.set(editor, 0);
    }
  }, true);
}
"""


def page_css() -> str:
    """The page's CSS: layout, galleries that fit their height, the tool buttons' icons."""
    icons = "".join(f".tool-icon-{name}::before {{ content: ''; display: inline-block; width: 1.5em; "
                    f"height: 1.5em; background-color: currentColor; -webkit-mask: {_svg_mask(path)}; "
                    f"mask: {_svg_mask(path)}; }}\n" for name, (path, _tip) in TOOL_ICONS.items())
    # room for the gallery's top bar and padding
    return BASE_CSS.replace("{thumb}", str(GALLERY_HEIGHT - 64)) + icons


def _svg_mask(path: str) -> str:
    """An SVG path (24x24 box) as a CSS mask image: drawn in the text's colour, any theme."""
    svg = f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24'><path fill-rule='evenodd' d='{path}'/></svg>"
    return f'url("data:image/svg+xml,{quote(svg)}") center / contain no-repeat'


def page_script() -> str:
    tips = {f"tool-icon-{name}": tip for name, (_path, tip) in TOOL_ICONS.items()}
    return SCRIPT.replace("%(tips)s", json.dumps(tips)).replace("%(modes)s", json.dumps(list(GENERATION_MODES)))


TAB_LABELS = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "Inpaint"}


def build_ui(engine: EngineAPI, options: UIOptions | None = None, notice: Callable[[], str] | None = None) -> gr.Blocks:
    """Build the whole UI for `engine`; the WebUI object is reachable as `blocks.webui`. `notice`:
    the text of a note shown first on the page and read again on every page load (the launcher's)."""
    return WebUI(engine, options or UIOptions()).build(notice)


def _theme() -> gr.themes.Theme:
    # Local fonts only: the app must work fully offline (no Google Fonts request).
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )


class WebUI:
    """Owns the components and handlers of one built UI; created only by `build_ui`."""

    def __init__(self, engine: EngineAPI, options: UIOptions):
        self.engine = engine
        self.options = options
        self.runner = JobRunner(engine)
        # tab -> {name: component}; the names are what the handlers receive.
        self.fields: dict[str, dict[str, gr.components.Component]] = {}
        self.components: dict[str, Any] = {}
        self.blocks: gr.Blocks | None = None
        self.generation = GenerationTabs(self)
        self.header = Header(self, self.generation)
        self.upscale_tab = UpscaleTab(self)
        self.merge_tab = MergeTab(self)
        self.checkpoints_tab = CheckpointsTab(engine, partial(loaded_text, engine), partial(default_checkpoint, engine))
        self.browser_tab = BrowserTab(self)
        self.settings_tab = SettingsTab(self)

    @property
    def jobs(self) -> JobRegistry:
        return self.runner.jobs

    # Arguments for Blocks.launch() that gradio 6 no longer takes in the Blocks constructor.
    def launch_kwargs(self) -> dict[str, Any]:
        # every waiting job holds a handler thread: Gradio's usual 40 on top of those
        return {"theme": _theme(), "css": page_css(), "js": page_script(),
                "max_threads": 40 + (self.queue_capacity() or 0)}

    def queue_capacity(self) -> int | None:
        return self.runner.capacity()

    # ------------------------------------------------------------------------------------------
    # layout and wiring
    # ------------------------------------------------------------------------------------------
    def build(self, notice: Callable[[], str] | None = None) -> gr.Blocks:
        # Gradio builds a Blocks' whole config and app each time it is left (and again on queue()):
        # everything goes in this one `with`, and the queue is set while the page is still empty.
        with gr.Blocks(title=self.options.title, analytics_enabled=False) as blocks:
            # Jobs are bounded by the engine's queue alone (--max-queue-size; a hosted demo's own bound):
            # Gradio's queue also holds page loads and tab switches, and bounding it the same way would
            # refuse those ("This application is currently busy") while jobs wait.
            blocks.queue(default_concurrency_limit=1, max_size=None)
            if notice is not None:
                self.components["notice"] = self._notice(blocks, notice)
            initial = self.header.build()
            current_tab = gr.State("txt2img")
            self.components["current_tab"] = current_tab
            tabs: dict[str, gr.Tab] = {}
            with gr.Tabs(elem_id="tabs") as tab_switcher:
                for mode in GENERATION_MODES:
                    with gr.Tab(TAB_LABELS[mode], id=mode, elem_id=f"tab_{mode}") as tabs[mode]:
                        self.generation.build(mode, initial)
                with gr.Tab("Upscale", id="upscale", elem_id="tab_upscale") as tabs["upscale"]:
                    self.upscale_tab.build(initial)
                with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo") as tabs["pnginfo"]:
                    pnginfo.build(self, tab_switcher)  # after the tabs its "Send to" buttons fill
                with gr.Tab("Checkpoints", id="checkpoints", elem_id="tab_checkpoints") as tabs["checkpoints"]:
                    self.checkpoints_tab.build(tabs["checkpoints"], self.components["checkpoint"],
                                               self.components["loaded"], GENERATE_GROUP)
                    self.components["checkpoints"] = self.checkpoints_tab.components
                with gr.Tab("Merge", id="merge", elem_id="tab_merge") as tabs["merge"]:
                    self.merge_tab.build()
                extensions.build_tabs(self, tabs, blocks)  # extensions' own tabs, then the Extensions tab
                with gr.Tab("Image browser", id="browser", elem_id="tab_browser") as tabs["browser"]:
                    self.browser_tab.build(tab_switcher, tabs["browser"])  # after the tabs it sends to
                with gr.Tab("Settings", id="settings", elem_id="tab_settings") as tabs["settings"]:
                    self.settings_tab.build(blocks)
            self._wire_gallery_sends(tab_switcher)
            self.components["footer"] = gr.Markdown(self.header.footer_text(), elem_id="footer")
            self._wire_tab_selection(tabs)
            self.header.wire(blocks)
        guard_uploads(blocks, UploadLimits.of(self.engine.settings))
        blocks.webui = self  # type: ignore[attr-defined]
        self.blocks = blocks
        return blocks

    @staticmethod
    def _notice(blocks: gr.Blocks, text: Callable[[], str]) -> gr.Markdown:
        """The note above everything, re-rendered on every page load (a hosted demo's limits, a
        missing checkpoint)."""
        note = gr.Markdown(text(), elem_id="space_notice")
        blocks.load(text, outputs=note, show_progress="hidden", api_visibility="undocumented", queue=False)
        return note

    def _wire_gallery_sends(self, tab_switcher: gr.Tabs) -> None:
        """The "Send to" rows under the galleries; every target tab exists by now."""
        for source in (*GENERATION_MODES, "upscale"):
            parts = self.components[source]
            pnginfo.wire_gallery_sends(self, tab_switcher, parts["send"], parts["gallery"], parts["last"])

    def _wire_tab_selection(self, tabs: dict[str, gr.Tab]) -> None:
        """Each tab says it is on screen; a generation tab also catches up with the checkpoint's size,
        the Upscale tab its SD upscale tiles."""
        current_tab = self.components["current_tab"]
        for mode, tab in tabs.items():
            if mode in GENERATION_MODES:
                tab.select(self.tab_select_handler(mode),
                           inputs_kwargs={"checkpoint": self.components["checkpoint"],
                                          "sized_for": self.components[mode]["sized_for"]},
                           outputs=[current_tab, *self.generation.sizing_components(mode)], **QUIET)
            elif mode == "upscale":
                tab.select(self.select_upscale_tab,
                           inputs_kwargs={"checkpoint": self.components["checkpoint"],
                                          "sized_for": self.components["upscale"]["sized_for"]},
                           outputs=[current_tab, *self.upscale_tab.sizing_components()], **QUIET)
            else:
                tab.select(constant(mode), outputs=current_tab, **QUIET)

    # ------------------------------------------------------------------------------------------
    # handlers, by the names tests, the launcher and the hosted demo use
    # ------------------------------------------------------------------------------------------
    def generate(self, mode: str, fields: dict[str, Any], request: gr.Request | None = None,
                 progress: Any = None) -> tuple:
        return self.generation.generate(mode, fields, request=request, progress=progress)

    def read_parameters(self, mode: str, prompt: str | None, last: dict | None = None,
                        checkpoint: str | None = None) -> dict:
        return self.generation.read_parameters(mode, prompt, last, checkpoint)

    def interrupt(self, request: gr.Request) -> None:
        self.runner.interrupt(request)

    def skip(self, request: gr.Request) -> None:
        self.runner.skip(request)

    def select_image(self, evt: gr.SelectData, last=None):
        return self.generation.select_image(evt, last)

    def reuse_seed(self, last=None) -> int:
        return self.generation.reuse_seed(last)

    def schedule_choices(self, sampler: str, current: str):
        return self.generation.schedule_choices(sampler, current)

    def tab_select_handler(self, mode: str) -> Callable[..., dict]:
        return self.generation.tab_select_handler(mode)

    def select_upscale_tab(self, checkpoint: str | None = None, sized_for: str | None = None) -> dict:
        return {self.components["current_tab"]: "upscale", **self.upscale_tab.resize(checkpoint, sized_for)}

    def upscale(self, request: gr.Request = None, progress=gr.Progress(), **fields) -> tuple:
        return self.upscale_tab.upscale(request, progress, **fields)

    def sd_upscale(self, request: gr.Request = None, progress=gr.Progress(), **fields) -> tuple:
        return self.upscale_tab.sd_upscale(request, progress, **fields)

    def on_checkpoint_pick(self, checkpoint: str | None = None, current_tab: str | None = None) -> dict:
        return self.header.on_checkpoint_pick(checkpoint, current_tab)

    def on_page_load(self) -> dict:
        return self.header.on_page_load()

    def demo_note(self, checkpoint: str | None = None) -> str:
        return self.header.demo_note(checkpoint)

    def refresh_checkpoints(self, current: str | None = None, query: str | None = "", sort: str | None = None):
        return self.checkpoints_tab.refresh(current, query, sort)

    def load_checkpoint(self, name: str | None = None):
        return self.checkpoints_tab.load(name)
