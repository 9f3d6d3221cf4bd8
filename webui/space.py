"""The web UI as a hosted demo (Hugging Face Space): paths, launch options, the header note.

`webui.cli` decides whether this is a Space (`--space`, or `SPACE_ID` / `SYSTEM=spaces` in the
environment, see `pipelines.hosting.space`) and then uses the helpers here:

- `pipelines.hosting.space.space_paths(args)`: outputs and caches under the Space's persistent
  storage (`/data`) when it is mounted, else in the repository as usual; models stay in `models/`;
- the engine is built with `EngineSettings.hosted`, so it holds every job from the UI and the API
  to `engine.hosted_limits` (see `pipelines.core.hosted_limits`);
- `apply_space_ui(blocks, limits)`: slider maxima and defaults from the limits;
- `notice_text(...)`: the note the launcher gives `build_ui(notice=...)` for the top of the page
  (hosted demo, limits, and where to put a checkpoint when there is none), re-read on every page load;
- `ReadOnlyApiOptions`: POST /sdapi/v1/options refuses to change the server defaults.

No torch here.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from pipelines.core.engine_api import EngineAPI
from pipelines.core.hosted_limits import ZERO_GPU_NOTE, SpaceLimits
from pipelines.core.settings import REPO_ROOT, Paths

from .api.errors import bad_field
from .api.options import ApiOptions


def no_checkpoint_text(paths: Paths, hosted: bool) -> str:
    folder = paths.folder("checkpoints")
    where = _display_path(folder)
    if hosted:
        how = (f"add a `.safetensors` checkpoint (SD 1.x, SD 2.x or SDXL) to `{where}` in this Space's "
               "repository (Files → Add file → Upload, or `git lfs` push), then restart the Space "
               "or press Refresh in the Checkpoints tab")
    else:
        how = (f"put a `.safetensors` checkpoint (SD 1.x, SD 2.x or SDXL) in `{folder}` and press Refresh "
               "in the Checkpoints tab, or start with `--ckpt-dir DIR` / `--models-dir DIR` "
               "to use an existing A1111 folder")
    return f"**No checkpoint found.** To generate images, {how}."


def hosted_text(limits: SpaceLimits, space: str | None = None, waiting: int | None = None) -> str:
    """The hosted-demo note; `waiting`: the queue's bound when --max-queue-size lowered it."""
    name = f" `{space}`" if space else ""
    hardware = "a CPU" if limits.hardware == "cpu" else "a GPU"
    return (f"**Hosted demo**{name} on {hardware}, shared by everyone who opens it: one job runs at a "
            f"time and at most {waiting or limits.queue_max_size} wait. Limits: {limits.summary()}. "
            "Generated images are saved on the Space and are not private; without persistent storage "
            "they are lost when it restarts. For no limits, run it on your own machine: "
            "`pip install -e .` then `python launch.py`.")


def notice_text(engine: EngineAPI, hosted: bool, limits: SpaceLimits | None = None,
                space: str | None = None) -> str:
    """The page's note: the hosted demo's terms (and ZeroGPU's), and where to put a checkpoint
    when there is none."""
    parts = []
    if hosted and limits is not None:
        parts.append(hosted_text(limits, space, engine.queue.max_waiting))
    if hosted and engine.on_zero_gpu:
        parts.append(f"{ZERO_GPU_NOTE}")
    try:
        has_checkpoint = bool(engine.list_checkpoints())
    except Exception:
        has_checkpoint = False
    if not has_checkpoint:
        parts.append(no_checkpoint_text(engine.paths, hosted))
    return "\n\n".join(parts)


def apply_space_ui(blocks: gr.Blocks, limits: SpaceLimits) -> None:
    """Slider maxima from the hosted limits, and the CPU-friendly default step count."""
    webui = blocks.webui  # type: ignore[attr-defined]
    maxima = {"steps": limits.max_steps, "width": limits.max_side, "height": limits.max_side,
              "batch_size": limits.max_batch_size, "batch_count": limits.max_batch_count}
    for fields in webui.fields.values():
        for name, high in maxima.items():
            slider = fields.get(name)
            if slider is None:
                continue
            slider.maximum = high
            if slider.value is not None and slider.value > high:
                slider.value = high
        if "steps" in fields:
            fields["steps"].value = min(limits.default_steps, limits.max_steps)


class ReadOnlyApiOptions(ApiOptions):
    """The hosted demo's API options: readable, never changed by a request."""

    def update(self, engine, changes):  # noqa: D401 - same signature as ApiOptions.update
        raise bad_field("body", "this hosted demo does not change its server defaults; set "
                                "sd_model_checkpoint / sd_vae in override_settings of each request instead")


def _display_path(folder: Path) -> str:
    try:
        return Path(folder).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(folder)
