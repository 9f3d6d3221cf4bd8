"""What every tab of the web UI shares: running an engine job for a browser session (its
progress bar, its place in the queue, its notices and errors), gallery items, pickers and
sliders, and engine look-ups that never break the page.

Concurrency groups: generate, upscale and SD upscale wait in the engine's one fair queue
(shared with the REST API, pipelines.core.jobs); their Gradio group (`QUEUED_GROUP`) lets as
many handlers in as that queue holds, each shows "Waiting: N jobs ahead of you" until its
turn, and a full queue is a warning toast, not an error. Loading a checkpoint by hand keeps
`GENERATE_GROUP` with limit 1. Interrupt/Skip run in their own unlimited `CONTROL_GROUP`, so
they act at once, even while a job runs or waits.
"""

from __future__ import annotations

import contextvars
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import gradio as gr

from pipelines.core.engine_api import EngineAPI, ModelFileInfo
from pipelines.core.hosted_limits import ZeroGPUError
from pipelines.core.jobs import JobCancelled, QueueFull
from pipelines.core.request import LIMITS, GenerationResult, RequestError
from pipelines.core.save_formats import SaveOptions
from pipelines.core.user_settings import server_settings
from webui import convert
from webui.jobs import JobRegistry

log = logging.getLogger(__name__)

GENERATE_GROUP = "generate"
QUEUED_GROUP = "queued"  # handlers that wait in the engine's queue
CONTROL_GROUP = "control"  # Interrupt/Skip: never wait behind the running job
GENERATION_MODES = ("txt2img", "img2img", "inpaint")
# an event that changes the page quietly and is no endpoint of the Gradio API
QUIET = {"show_progress": "hidden", "api_visibility": "undocumented"}
GALLERY_HEIGHT = 480  # px; webui.app's CSS fits every thumbnail inside it
GENERATE_LABEL = "Generate"
BUSY_LABEL = "Generating…"  # the Generate button while the tab's job runs
# Tool buttons draw an inline SVG (no emoji font needed; webui.app's CSS) and carry a tooltip
# (set by webui.app's script from their class): name -> (SVG path data, 24x24 box; tooltip).
TOOL_ICONS = {
    # a die showing five: its outline, with the pips cut out (even-odd fill)
    "dice": ("M5 3h14a2 2 0 0 1 2 2v14a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z"
             + "".join(f"M{x} {y - 1.5}a1.5 1.5 0 1 0 0 3a1.5 1.5 0 1 0 0-3z"
                       for x, y in ((8, 8), (16, 8), (12, 12), (8, 16), (16, 16))),
             "Random seed (-1): a new seed for every generation"),
    "reuse": ("M12 4a8 8 0 1 1-7.4 5h2.2A6 6 0 1 0 12 6v3L7.5 5L12 1z",
              "Reuse the seed of the selected image"),
    "refresh": ("M17.6 6.4A8 8 0 1 0 20 12h-2a6 6 0 1 1-1.8-4.2L13 11h7V4z",
                "Refresh the list (files added since the page opened)"),
}


def tool_button(icon: str, elem_id: str, **kwargs) -> gr.Button:
    """A small button showing one of `TOOL_ICONS`, with its tooltip."""
    return gr.Button("", elem_id=elem_id, elem_classes=["tool-button", f"tool-icon-{icon}"], scale=0,
                     min_width=48, **kwargs)


def output_gallery(elem_id: str, columns: int) -> gr.Gallery:
    """A results gallery; webui.app's CSS keeps every thumbnail whole inside its height.
    `type="filepath"`: "Send to" reads the saved file, metadata included."""
    return gr.Gallery(label="Output", columns=columns, height=GALLERY_HEIGHT, format="png", object_fit="contain",
                      elem_id=elem_id, elem_classes="sdui-gallery", interactive=False, type="filepath")


def busy_button() -> gr.Button:
    return gr.Button(BUSY_LABEL, interactive=False)


def idle_button() -> gr.Button:
    return gr.Button(GENERATE_LABEL, interactive=True)


@dataclass(frozen=True)
class UIOptions:
    """What the launcher chooses about the page (`webui.app.build_ui`)."""

    title: str = "Stable Diffusion"
    gallery_columns: int = 4


class JobRunner:
    """Runs engine calls as a browser session's job: Interrupt/Skip reach the caller's own job
    (`jobs`, keyed by Gradio's session hash), the page shows its progress and queue position."""

    def __init__(self, engine: EngineAPI):
        self.engine = engine
        self.jobs = JobRegistry()

    def capacity(self) -> int | None:
        """Jobs the engine's queue holds at once (running + waiting; None: no bound); Gradio
        lets that many handlers of `QUEUED_GROUP` in."""
        return self.engine.queue.capacity()

    def run(self, what: str, request: gr.Request | None, progress: Any, call: Callable[..., Any]) -> Any:
        """`call(on_progress=, on_wait=, control=, owner=)` as this session's job: it gets the
        progress and queue-position reporters and the session's JobControl. None: it did not
        run (see `call_engine`)."""
        session = getattr(request, "session_hash", None)  # None outside a live page (tests, scripts)
        with self.jobs.run(session) as control:
            return call_engine(what, lambda: call(on_progress=progress_reporter(progress),
                                                  on_wait=wait_reporter(progress), control=control, owner=session))

    def interrupt(self, request: gr.Request) -> None:
        if not self.jobs.interrupt(getattr(request, "session_hash", None)):
            gr.Info("Nothing of yours is running.")

    def skip(self, request: gr.Request) -> None:
        if not self.jobs.skip(getattr(request, "session_hash", None)):
            gr.Info("Nothing of yours is running.")


class Page(Protocol):
    """What a tab uses of the UI it is built into (`webui.app.WebUI`)."""

    engine: EngineAPI
    options: UIOptions
    runner: JobRunner
    fields: dict[str, dict[str, Any]]  # tab -> {name: component}; the names the handlers receive
    components: dict[str, Any]  # everything else, by name (per tab: a dict of its own)

    def read_parameters(self, mode: str, prompt: str | None, last: dict | None = None,
                        checkpoint: str | None = None) -> dict: ...


# --- running a job -----------------------------------------------------------------------------

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
        raise gr.Error(f"{what} failed: {describe_exception(exc)}", print_exception=False) from None


def request_error(exc: RequestError) -> gr.Error:
    """A bad request as the toast that names the field."""
    return gr.Error(convert.error_message(exc), print_exception=False)


def show_notices(result: GenerationResult) -> None:
    """The result's warnings as toasts, and a note when the job was interrupted."""
    for warning in result.warnings or []:
        gr.Warning(str(warning))
    if result.interrupted:
        gr.Info("Interrupted: showing what was finished.")


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def gallery_items(result: GenerationResult) -> list:
    """Saved PNG paths (they keep their metadata on download), else the images themselves."""
    images = list(result.images or [])
    paths = list(result.paths or [])
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


def progress_reporter(progress: Any) -> Callable | None:
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


def wait_reporter(progress: Any) -> Callable[[int], None] | None:
    """gr.Progress as the engine's on_wait callback: "Waiting: N jobs ahead of you"."""
    show = _progress_shower(progress)
    if show is None:
        return None
    return lambda ahead: show(0.0, waiting_text(ahead))


# --- components --------------------------------------------------------------------------------

def pick(preferred: str | None, choices: list[str]) -> str | None:
    """`preferred` when it is offered, else the first choice."""
    if preferred in choices:
        return preferred
    return choices[0] if choices else None


def constant(value: Any) -> Callable[[], Any]:
    def constant_value():
        return value

    return constant_value


def slider(name: str, *, value: float | None = None, step: float = 1, label: str | None = None,
           elem_id: str | None = None, **kwargs) -> gr.Slider:
    """A slider over a request field's allowed range (`LIMITS`); by default its request default
    and its label."""
    low, high = LIMITS[name]
    default = convert.request_default(name) if value is None else value
    return gr.Slider(low, high, value=default, step=step, label=label or convert.LABELS[name],
                     elem_id=elem_id, **kwargs)


# --- engine look-ups (never fatal for building or refreshing the page) --------------------------

def engine_choices(engine_call: Callable[[], Any], what: str) -> list[str]:
    """A listing of choices from the engine; empty (and logged) when it fails."""
    try:
        return list(engine_call() or [])
    except Exception:  # a listing must never break the page
        log.exception("%s failed", what)
        return []


def checkpoint_infos(engine: EngineAPI, refresh: bool = False) -> list[ModelFileInfo]:
    try:
        return list(engine.list_checkpoints(refresh=refresh) or [])
    except Exception:
        log.exception("listing checkpoints failed")
        return []


def default_checkpoint(engine: EngineAPI, names: list[str]) -> str | None:
    """The engine's default checkpoint when it is listed, else the first listed one."""
    try:
        name = engine.default_checkpoint()
    except Exception:
        log.exception("default checkpoint failed")
        name = None
    if name in names:
        return name
    return names[0] if names else None


def snap_size(value: Any) -> Any:
    """A width/height to the nearest multiple of 8, as A1111's step-8 sliders do (a request
    holds the strict rule and the range, `GenerationRequest`); anything not a number is left
    for the request to name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return int(math.floor(value / 8 + 0.5) * 8)  # halves up, as the page's script


def native_size(engine: EngineAPI, checkpoint: str | None) -> int:
    """The checkpoint's native width/height, as the width and height sliders allow it."""
    try:
        value = int(engine.native_resolution(checkpoint))
    except Exception:
        log.exception("native resolution of %r failed", checkpoint)
        value = 512
    low, high = LIMITS["width"]
    return int(min(max(value - value % 8, low), high))


def loading_checkpoints(engine: EngineAPI) -> list[str]:
    try:
        return list(engine.loading_checkpoints())
    except Exception:
        log.exception("loading checkpoints failed")
        return []


def loaded_text(engine: EngineAPI, starting: str | None = None) -> str:
    """The loaded line; `starting`: a load just begun (its thread may not have said so yet)."""
    try:
        loading = list(dict.fromkeys([*loading_checkpoints(engine), *([starting] if starting else [])]))
        return convert.loaded_line(engine.loaded_checkpoints(), loading)
    except Exception:
        log.exception("loaded checkpoints failed")
        return ""


def selected_infotext(last: dict, index: int) -> str:
    """The infotext of the image at `index` of a tab's last result (the first one when out of range)."""
    infotexts = last.get("infotexts") or []
    return infotexts[index] if 0 <= index < len(infotexts) else (infotexts[0] if infotexts else "")


def saving(engine: EngineAPI) -> SaveOptions:
    """How a job built now saves its images: the Settings tab's (the same as /sdapi/v1/options')."""
    return server_settings(engine).save_options()
