"""The public extension API: the only module an extension needs to import.

Stability promise: within one major version of `API_VERSION`, names here keep their meaning.
A minor version only adds (a new hook, a new context field, a new helper). Hooks receive one
context object whose fields are read by name; new fields may appear, none disappear.

An extension is a folder under `extensions/` with a manifest, `extension.toml` (or
`extension.json`):

    id = "my-extension"            # [a-z0-9][a-z0-9_-]*, unique; the key of its arguments
    name = "My extension"
    version = "1.0.0"
    api = "1.0"                    # the API version it was written for: same major, minor <= ours
    entry = "main.py"              # default main.py (or __init__.py)
    description = "..."
    requirements = ["pkg>=1"]      # listed for the user, never installed automatically

and an entry module defining `setup(ext: Setup)`, which registers what the extension adds:

    from extensions.api import Setup, StepChange, ImageChange

    def setup(ext: Setup) -> None:
        ext.before_request(lambda ctx: ctx.request.replace(steps=ctx.request.steps + 1))
        ext.on_step(lambda ctx: StepChange(guidance_scale=ctx.guidance_scale * 0.9))
        ext.after_image(lambda ctx: ImageChange(infotext={"My key": "value"}))

Hooks (each receives one context; see the dataclasses below):

- `before_request(ctx: RequestContext) -> GenerationRequest | None` - once per job, before it
  is queued; return a changed request (`ctx.request.replace(...)`) or None.
- `on_step(ctx: StepContext) -> StepChange | None` - each denoising step, before the U-Net
  runs; read `ctx.latents` (do not modify them in place), return a new guidance scale.
  With CFG scale 1 there is no unconditional prediction, so guidance cannot be changed.
  (Not yet called during hires fix and SD upscale passes; after_image still is.)
- `after_image(ctx: ImageContext) -> ImageChange | None` - each finished image, before its
  infotext is written and it is saved; return a changed image and/or extra infotext fields.
- `script(run, title=..., is_active=...)` - a script that replaces the generation of a
  request where it is active (its arguments are present and not `enabled: false`); it gets
  a `ScriptContext` whose `generate(request)` runs one generation inside the same job
  (no second queue slot, no deadlock) and returns a `GenerationResult`. before_request has
  already run on the script's request; on_step and after_image run for each generation.
  A `RequestError` raised by a script is the user's (HTTP 422 / a UI error), not a failure.
- `ui_section(build, tabs=..., title=...)` - components inside the generation tabs; `build(ctx:
  UIContext)` returns {name: component}; their values arrive as
  `request.extension_args[<id>][name]`.
- `ui_tab(build, title=...)` - a whole tab; `build(ctx: UIContext)` lays it out.
- `api_routes(add)` - `add(router: fastapi.APIRouter, ctx: APIContext)` adds routes, served
  under `/ext/<id>/` behind the API's authentication.

Extension arguments travel in `GenerationRequest.extension_args[<id>]` (from the UI section,
from the REST API's `alwayson_scripts: {"<id>": {"args": ...}}`, or set by any caller).

An extension that fails to import, needs another API version, or raises inside a hook is
reported (log, notice, status in the Extensions tab) and disabled; the job goes on without it.
This module imports neither torch nor gradio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from pipelines.core.request import GenerationRequest, GenerationResult, RequestError

__all__ = [
    "API_VERSION", "APIContext", "GenerationRequest", "GenerationResult", "ImageChange", "ImageContext",
    "RequestContext", "RequestError", "ScriptContext", "Setup", "StepChange", "StepContext", "UIContext",
    "GENERATION_TABS", "labelled_grid", "parse_version", "is_compatible",
]

API_VERSION = "1.0"
GENERATION_TABS = ("txt2img", "img2img", "inpaint")


def parse_version(text: Any) -> tuple[int, int]:
    """"1" / "1.0" / 1 -> (major, minor); ValueError for anything else."""
    parts = str(text).strip().split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a version: {text!r} (expected MAJOR.MINOR, e.g. {API_VERSION!r})")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def is_compatible(required: Any, provided: str = API_VERSION) -> bool:
    """An extension written for `required` runs on `provided`: same major, minor not newer."""
    need, have = parse_version(required), parse_version(provided)
    return need[0] == have[0] and need[1] <= have[1]


# --- hook contexts (read by name; fields may be added in minor versions) -------------------------

@dataclass(frozen=True)
class RequestContext:
    request: GenerationRequest
    args: Any  # request.extension_args.get(extension_id): this extension's arguments, or None
    extension_id: str


@dataclass(frozen=True)
class StepContext:
    request: GenerationRequest
    args: Any
    extension_id: str
    step: int  # 0-based index of the step about to run
    steps: int  # steps in this pass
    timestep: Any  # the scheduler's timestep (a tensor)
    sigma: float | None  # noise level of this step (None where the schedule has none)
    latents: Any  # torch.Tensor (batch, C, H/8, W/8); read only
    guidance_scale: float  # the CFG scale this step will use (after earlier extensions)


@dataclass(frozen=True)
class StepChange:
    guidance_scale: float | None = None  # None: unchanged


@dataclass(frozen=True)
class ImageContext:
    request: GenerationRequest
    args: Any
    extension_id: str
    image: Image.Image
    seed: int
    subseed: int
    index: int  # position of the image in this generation's result


@dataclass(frozen=True)
class ImageChange:
    image: Image.Image | None = None  # None: unchanged
    infotext: Mapping[str, Any] = field(default_factory=dict)  # extra "Key: value" fields


@dataclass
class ScriptContext:
    request: GenerationRequest  # seeds resolved
    args: Any
    extension_id: str
    generate: Callable[..., GenerationResult]  # generate(request, on_progress=None) inside this job
    save: Callable[[Image.Image, str], str]  # save(grid, infotext) -> path ("" when not saved)
    # report_progress(done_cells, total_cells); call (0, total) before the first cell so the job's
    # progress (step k of cell i of n, ETA) counts every cell from the start
    report_progress: Callable[[int, int], None]
    is_interrupted: Callable[[], bool]
    warnings: list[str] = field(default_factory=list)  # shown to the user with the result


@dataclass(frozen=True)
class UIContext:
    engine: Any
    extension_id: str
    tab: str | None  # the generation tab a section is in; None for a tab of its own


@dataclass(frozen=True)
class APIContext:
    engine: Any
    extension_id: str


# --- registration ---------------------------------------------------------------------------------

@dataclass
class Registrations:
    before_request: list[Callable] = field(default_factory=list)
    on_step: list[Callable] = field(default_factory=list)
    after_image: list[Callable] = field(default_factory=list)
    scripts: list[dict] = field(default_factory=list)
    ui_sections: list[dict] = field(default_factory=list)
    ui_tabs: list[dict] = field(default_factory=list)
    api_routes: list[Callable] = field(default_factory=list)


class Setup:
    """Handed to the extension's `setup(ext)`; each method registers one hook (and returns
    the function, so they also work as decorators)."""

    def __init__(self, extension_id: str, name: str):
        self.extension_id = extension_id
        self.name = name
        self.api_version = API_VERSION
        self.registered = Registrations()

    def before_request(self, fn: Callable[[RequestContext], GenerationRequest | None]) -> Callable:
        self.registered.before_request.append(fn)
        return fn

    def on_step(self, fn: Callable[[StepContext], StepChange | None]) -> Callable:
        self.registered.on_step.append(fn)
        return fn

    def after_image(self, fn: Callable[[ImageContext], ImageChange | None]) -> Callable:
        self.registered.after_image.append(fn)
        return fn

    def script(self, run: Callable[[ScriptContext], GenerationResult], *, title: str | None = None,
               is_active: Callable[[Any], bool] | None = None) -> Callable:
        self.registered.scripts.append({"run": run, "title": title or self.name, "is_active": is_active})
        return run

    def ui_section(self, build: Callable[[UIContext], Mapping[str, Any]], *,
                   tabs: Sequence[str] = GENERATION_TABS, title: str | None = None) -> Callable:
        unknown = [t for t in tabs if t not in GENERATION_TABS]
        if unknown:
            raise ValueError(f"ui_section: unknown tab(s) {unknown}; choose from {GENERATION_TABS}")
        self.registered.ui_sections.append({"build": build, "tabs": tuple(tabs), "title": title or self.name})
        return build

    def ui_tab(self, build: Callable[[UIContext], None], *, title: str | None = None) -> Callable:
        self.registered.ui_tabs.append({"build": build, "title": title or self.name})
        return build

    def api_routes(self, add: Callable[[Any, APIContext], None]) -> Callable:
        self.registered.api_routes.append(add)
        return add


# --- helpers --------------------------------------------------------------------------------------

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_block(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> tuple[list[str], int]:
    """Wrap `text` word by word to fit `width` pixels; returns (lines, line height)."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    box = draw.textbbox((0, 0), "Mg", font=font)
    return lines, (box[3] - box[1]) + 4


def labelled_grid(images: Sequence[Sequence[Image.Image | None]], column_labels: Sequence[str] = (),
                  row_labels: Sequence[str] = (), title: str = "", font_size: int | None = None,
                  background: str = "white") -> Image.Image:
    """A grid of `images[row][column]` (None leaves a cell blank) with column labels on top,
    row labels on the left and an optional title above; cells are as big as the largest image."""
    rows = len(images)
    columns = max((len(r) for r in images), default=0)
    present = [im for r in images for im in r if im is not None]
    cell_w = max((im.width for im in present), default=64)
    cell_h = max((im.height for im in present), default=64)
    size = font_size or max(12, min(cell_w, cell_h) // 10)
    font = _font(size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(size // 2, 4)

    col_text = [_text_block(scratch, t, font, cell_w - 2 * pad) for t in column_labels] if column_labels else []
    top = max((len(lines) * lh for lines, lh in col_text), default=0)
    top = top + 2 * pad if column_labels else 0
    left = 0
    if row_labels:
        left = min(max(int(max(scratch.textlength(line, font=font) for t in row_labels
                                for line in str(t).split("\n") or [""])) + 2 * pad, 2 * pad + 8), cell_w * 2)
    row_text = [_text_block(scratch, t, font, left - 2 * pad) for t in row_labels] if row_labels else []
    title_lines, title_lh = (_text_block(scratch, title, font, left + columns * cell_w - 2 * pad)
                             if title else ([], 0))
    head = len(title_lines) * title_lh + (2 * pad if title else 0)

    grid = Image.new("RGB", (left + columns * cell_w, head + top + rows * cell_h), background)
    draw = ImageDraw.Draw(grid)
    y = pad
    for line in title_lines:
        draw.text(((grid.width - draw.textlength(line, font=font)) / 2, y), line, fill="black", font=font)
        y += title_lh
    for c, (lines, lh) in enumerate(col_text):
        y = head + (top - len(lines) * lh) / 2
        for line in lines:
            x = left + c * cell_w + (cell_w - draw.textlength(line, font=font)) / 2
            draw.text((x, y), line, fill="black", font=font)
            y += lh
    for r, (lines, lh) in enumerate(row_text):
        y = head + top + r * cell_h + (cell_h - len(lines) * lh) / 2
        for line in lines:
            draw.text((left - pad - draw.textlength(line, font=font), y), line, fill="black", font=font)
            y += lh
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            if image is None:
                continue
            x = left + c * cell_w + (cell_w - image.width) // 2
            y = head + top + r * cell_h + (cell_h - image.height) // 2
            grid.paste(image.convert("RGB"), (x, y))
    return grid
