"""A1111's selectable scripts by name: `script_name` + positional `script_args` -> our extensions'
named arguments (or, for SD upscale, the engine's `sd_upscale`), in one table.

Each script is A1111's title, the modes it shows in, what runs it here, and its arguments in
A1111's positional order (the order of its `ui()` return list, A1111 1.10): A1111's label, our
argument name (None: used by the translation itself, or not available here), a converter and
A1111's default. A client may send fewer arguments than listed (the rest take A1111's defaults,
as A1111 does) and `null` for any of them (its default). An argument this server cannot honour
(grid margins, ...) is accepted; a value other than its default is reported in info.warnings.

`GET /sdapi/v1/scripts` and `/script-info` are built from the same table.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pipelines.core.engine_api import EngineAPI
from pipelines.core.request import INPAINT_FILLS

from .errors import bad_field

MODES = ("txt2img", "img2img")
SD_UPSCALE = "sd_upscale"  # the engine's own job, not an extension
REQUEST_FIELDS = "request"  # the script's arguments are request fields (A1111's outpainting scripts)
DIRECTIONS = ("left", "right", "up", "down")  # A1111's outpainting directions -> GenerationRequest.outpaint_<side>

# A1111's X/Y/Z axis types in order (scripts/xyz_grid.py `axis_options`); the second item is the
# only mode that lists it (None: both). An axis type is an index into the mode's own list.
XYZ_AXES: tuple[tuple[str, str | None], ...] = (
    ("Nothing", None), ("Seed", None), ("Var. seed", None), ("Var. strength", None), ("Steps", None),
    ("Hires steps", "txt2img"), ("CFG Scale", None), ("Image CFG Scale", "img2img"), ("Prompt S/R", None),
    ("Prompt order", None), ("Sampler", "txt2img"), ("Hires sampler", "txt2img"), ("Sampler", "img2img"),
    ("Checkpoint name", None), ("Negative Guidance minimum sigma", None), ("Sigma Churn", None),
    ("Sigma min", None), ("Sigma max", None), ("Sigma noise", None), ("Schedule type", None),
    ("Schedule min sigma", None), ("Schedule max sigma", None), ("Schedule rho", None),
    ("Beta schedule alpha", None), ("Beta schedule beta", None), ("Eta", None), ("Clip skip", None),
    ("Denoising", None), ("Initial noise multiplier", None), ("Extra noise", None), ("Hires upscaler", "txt2img"),
    ("Cond. Image Mask Weight", "img2img"), ("VAE", None), ("Styles", None), ("UniPC Order", None),
    ("Face restore", None), ("Token merging ratio", None), ("Token merging ratio high-res", None),
    ("Always discard next-to-last sigma", None), ("SGM noise multiplier", None), ("Refiner checkpoint", None),
    ("Refiner switch at", None), ("RNG source", None), ("FP8 mode", None), ("Size", None),
)
# the axis types whose values A1111 takes from the dropdown (unless csv_mode)
XYZ_DROPDOWN_AXES = frozenset({"Sampler", "Hires sampler", "Checkpoint name", "Schedule type", "Hires upscaler",
                               "VAE", "Styles", "Always discard next-to-last sigma", "SGM noise multiplier",
                               "Refiner checkpoint", "RNG source", "FP8 mode"})


def xyz_axis_labels(mode: str) -> list[str]:
    return [label for label, only in XYZ_AXES if only in (None, mode)]


# --- converters: (value, context) -> value, ValueError with the reason --------------------------------

@dataclass(frozen=True)
class Context:
    mode: str
    upscalers: Callable[[], list[str]]  # "None" first, as /sdapi/v1/upscalers lists them


def to_bool(value: Any, _: Context) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def to_text(value: Any, _: Context) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected text, got {value!r}")


def to_text_list(value: Any, _: Context) -> list[str]:
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ValueError(f"expected a list of values, got {value!r}")


def number(kind: type, minimum: float, maximum: float) -> Callable[[Any, Context], Any]:
    def convert(value: Any, _: Context) -> Any:
        try:
            if isinstance(value, bool):
                raise ValueError
            got = float(value)
            if kind is int and got != int(got):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"expected {'a whole number' if kind is int else 'a number'}, got {value!r}") from None
        if not minimum <= got <= maximum:
            raise ValueError(f"must be between {minimum:g} and {maximum:g}, got {value!r}")
        return kind(got)
    return convert


def choice(*choices: str) -> Callable[[Any, Context], str]:
    def convert(value: Any, _: Context) -> str:
        for known in choices:
            if isinstance(value, str) and value.strip().lower() == known.lower():
                return known
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
    return convert


def indexed(options: Callable[[Context], list[str]]) -> Callable[[Any, Context], str]:
    """A1111's `type="index"` dropdowns: an index into the list, or (friendlier) one of its names."""
    def convert(value: Any, ctx: Context) -> str:
        listed = options(ctx)
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(listed):
                return listed[value]
            raise ValueError(f"index {value} is out of range 0-{len(listed) - 1} ("
                             + ", ".join(f"{i} {name}" for i, name in enumerate(listed)) + ")")
        if isinstance(value, str):
            for name in listed:
                if value.strip().lower() == name.lower():
                    return name
        raise ValueError(f"expected an index (0-{len(listed) - 1}) or one of {', '.join(listed)}; got {value!r}")
    return convert


# --- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    label: str  # A1111's label of the component
    name: str | None  # our argument; None: read by the script's `finish`, or not available here
    convert: Callable[[Any, Context], Any]
    default: Any  # A1111's default
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: Callable[[Context], list[str]] | None = None
    unavailable: str = ""  # why a value other than the default has no effect here


@dataclass(frozen=True)
class Script:
    title: str  # A1111's title; its lowercase is the script's name
    modes: tuple[str, ...]
    target: str  # an extension id, or SD_UPSCALE
    args: tuple[Arg, ...]
    finish: Callable[[dict, Context], dict] | None = None  # converted values -> the named arguments


def _xyz_finish(values: dict, ctx: Context) -> dict:
    """A1111 reads an axis's values from its dropdown for dropdown axis types (unless csv_mode);
    here an empty dropdown falls back to the text."""
    for axis in "xyz":
        dropdown = values.pop(f"{axis}_values_dropdown")
        if values[f"{axis}_type"] in XYZ_DROPDOWN_AXES and not values["csv_mode"] and dropdown:
            out = io.StringIO()
            csv.writer(out).writerow(dropdown)
            values[f"{axis}_values"] = out.getvalue().strip()
    values.pop("csv_mode")
    return values


def _axis(axis: str, default: int) -> tuple[Arg, Arg, Arg]:
    def labels(ctx: Context) -> list[str]:
        return xyz_axis_labels(ctx.mode)

    upper = axis.upper()
    return (Arg(f"{upper} type", f"{axis}_type", indexed(labels), default, choices=labels),
            Arg(f"{upper} values", f"{axis}_values", to_text, ""),
            Arg(f"{upper} values", f"{axis}_values_dropdown", to_text_list, []))


_MARGINS = "grid margins are not available here"


def _outpaint_finish(values: dict, ctx: Context) -> dict:
    """Pixels to expand, on each chosen direction -> outpaint_left/right/up/down."""
    pixels, chosen = values.pop("pixels"), values.pop("direction")
    unknown = [d for d in chosen if d.lower() not in DIRECTIONS]
    if unknown:
        raise ValueError(f"unknown outpainting direction(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(DIRECTIONS)}")
    sides = {d.lower() for d in chosen}
    return {**values, **{f"outpaint_{side}": pixels if side in sides else 0 for side in DIRECTIONS}}


_OWN_FILL = "this server fills the new area its own way (edge stretch, blur and a little noise)"


def _outpainting(title: str, blur: int, *middle: Arg, tail: tuple[Arg, ...] = ()) -> Script:
    """A1111's outpainting scripts: their arguments become the request's outpaint fields."""
    return Script(title, ("img2img",), REQUEST_FIELDS, (
        *middle,
        Arg("Pixels to expand", "pixels", number(int, 8, 256), 128, 8, 256, 8),
        Arg("Mask blur", "mask_blur", number(int, 0, 64), blur, 0, 64, 1),
        *tail,
    ), finish=_outpaint_finish)


def _matrix_finish(values: dict, ctx: Context) -> dict:
    values["negative"] = values.pop("prompt_type") == "negative"
    return values


SCRIPTS: dict[str, Script] = {s.title.lower(): s for s in (
    Script("X/Y/Z plot", MODES, "xyz-plot", (
        *_axis("x", 1), *_axis("y", 0), *_axis("z", 0),
        Arg("Draw legend", "draw_legend", to_bool, True),
        Arg("Include Sub Images", "include_images", to_bool, False),
        Arg("Include Sub Grids", "include_sub_grids", to_bool, False),
        Arg("Keep -1 for seeds", None, to_bool, False, unavailable="the seeds are fixed once for the whole grid"),
        Arg("Vary seeds for X", None, to_bool, False, unavailable="use a Seed axis to vary seeds"),
        Arg("Vary seeds for Y", None, to_bool, False, unavailable="use a Seed axis to vary seeds"),
        Arg("Vary seeds for Z", None, to_bool, False, unavailable="use a Seed axis to vary seeds"),
        Arg("Grid margins (px)", None, number(int, 0, 500), 0, 0, 500, 2, unavailable=_MARGINS),
        Arg("Use text inputs instead of dropdowns", "csv_mode", to_bool, False),
    ), finish=_xyz_finish),
    Script("Prompt matrix", MODES, "prompt-matrix", (
        Arg("Set at prompt start", "put_at_start", to_bool, False),
        Arg("Random seeds", "different_seeds", to_bool, False),
        Arg("Prompt type", "prompt_type", choice("positive", "negative"), "positive",
            choices=lambda ctx: ["positive", "negative"]),
        Arg("Joining char", "delimiter", choice("comma", "space"), "comma", choices=lambda ctx: ["comma", "space"]),
        Arg("Grid margins", None, number(int, 0, 500), 0, 0, 500, 2, unavailable=_MARGINS),
    ), finish=_matrix_finish),
    Script("Prompts from file or textbox", MODES, "prompts-from-file", (
        Arg("Iterate seed every line", "iterate_seed", to_bool, False),
        Arg("Use same random seed for all lines", "same_seed", to_bool, False),
        Arg("Insert prompts at the", "prompt_position", choice("start", "end"), "start",
            choices=lambda ctx: ["start", "end"]),
        Arg("List of prompt inputs", "prompts", to_text, ""),
    )),
    Script("SD upscale", ("img2img",), SD_UPSCALE, (
        Arg("Info", None, lambda value, ctx: value, None),  # A1111's HTML note: its value is not used
        Arg("Tile overlap", "overlap", number(int, 0, 256), 64, 0, 256, 16),
        Arg("Upscaler", "upscaler", indexed(lambda ctx: ctx.upscalers()), "None",
            choices=lambda ctx: ctx.upscalers()),
        Arg("Scale Factor", "scale", number(float, 1.0, 8.0), 2.0, 1.0, 4.0, 0.05),
    ), finish=lambda values, ctx: ({**values, "upscaler": "Lanczos", "scale": 1.0}  # "None": no upscaling
                                   if values["upscaler"] == "None" else values)),
    Script("Loopback", ("img2img",), "loopback", (
        Arg("Loops", "loops", number(int, 1, 32), 4, 1, 32, 1),
        Arg("Final denoising strength", "final_denoising_strength", number(float, 0.0, 1.0), 0.5, 0, 1, 0.01),
        Arg("Denoising strength curve", "denoising_curve", choice("Aggressive", "Linear", "Lazy"), "Linear",
            choices=lambda ctx: ["Aggressive", "Linear", "Lazy"]),
        Arg("Append interrogated prompt at each iteration", "append_interrogation", choice("None", "CLIP", "DeepBooru"),
            "None", choices=lambda ctx: ["None", "CLIP", "DeepBooru"]),
    )),
    _outpainting("Outpainting mk2", 8, Arg("Info", None, lambda value, ctx: value, None), tail=(
        Arg("Outpainting direction", "direction", to_text_list, list(DIRECTIONS), choices=lambda ctx: list(DIRECTIONS)),
        Arg("Fall-off exponent (lower=higher detail)", None, number(float, 0.0, 4.0), 1.0, 0, 4, 0.01,
            unavailable=_OWN_FILL),
        Arg("Color variation", None, number(float, 0.0, 1.0), 0.05, 0, 1, 0.01, unavailable=_OWN_FILL),
    )),
    _outpainting("Poor man's outpainting", 4, tail=(
        Arg("Masked content", "inpainting_fill", indexed(lambda ctx: list(INPAINT_FILLS)), "fill",
            choices=lambda ctx: list(INPAINT_FILLS)),
        Arg("Outpainting direction", "direction", to_text_list, list(DIRECTIONS), choices=lambda ctx: list(DIRECTIONS)),
    )),
)}

# errors the extensions raise about their named arguments -> the positional argument to name
_ERROR_FIELDS = {"xyz-plot": {"x_type": 0, "x_values": 1, "y_type": 3, "y_values": 4, "z_type": 6, "z_values": 7},
                 "prompt-matrix": {}, "prompts-from-file": {"iterate_seed": 0, "prompt_position": 2, "prompts": 3},
                 "loopback": {"loops": 0, "final_denoising_strength": 1, "denoising_curve": 2,
                              "append_interrogation": 3},
                 SD_UPSCALE: {"overlap": 1, "upscaler": 2, "scale": 3}}
# request-field scripts by name: the pixels argument names each side's error
_ERROR_FIELDS["outpainting mk2"] = {**{f"outpaint_{side}": 1 for side in DIRECTIONS}, "mask_blur": 2}
_ERROR_FIELDS["poor man's outpainting"] = {**{f"outpaint_{side}": 0 for side in DIRECTIONS}, "mask_blur": 1,
                                           "inpainting_fill": 2}


def arg_field(index: int, arg: Arg) -> str:
    return f"script_args[{index}] ({arg.label})"


def scripts_for(mode: str) -> list[Script]:
    return [s for s in SCRIPTS.values() if mode in s.modes]


# --- translation ---------------------------------------------------------------------------------

@dataclass
class Chosen:
    """A script asked for by name: what runs it and its named arguments."""
    script: Script
    target: str
    args: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)  # an engine-side error's field -> the API's


def context(engine: EngineAPI, mode: str) -> Context:
    return Context(mode=mode, upscalers=lambda: ["None", *(u.name for u in engine.upscalers())])


def choose(engine: EngineAPI, name: str | None, script_args: list[Any], mode: str,
           warnings: list[str]) -> Chosen | None:
    """The script `name` with `script_args` translated; None for no script. ApiError (422)
    naming script_name or the argument when either is bad."""
    if name in (None, "", "None"):
        return None
    key = str(name).strip().lower()
    script = SCRIPTS.get(key)
    known = ", ".join(repr(s.title.lower()) for s in scripts_for(mode))
    if script is None:
        raise bad_field("script_name", f"no script named {name!r}; the {mode} scripts are: {known}")
    if mode not in script.modes:
        raise bad_field("script_name", f"{key!r} is an {'/'.join(script.modes)} script; "
                                       f"the {mode} scripts are: {known}")
    if len(script_args) > len(script.args):
        raise bad_field("script_args", f"{key!r} takes at most {len(script.args)} arguments "
                                       f"({', '.join(a.label for a in script.args)}); got {len(script_args)}")
    ctx = context(engine, mode)
    values: dict[str, Any] = {}
    for index, arg in enumerate(script.args):
        given = script_args[index] if index < len(script_args) else None
        value = arg.default if given is None else given
        try:
            converted = arg.convert(value, ctx)
        except ValueError as exc:
            raise bad_field(arg_field(index, arg), str(exc)) from None
        if arg.unavailable and converted != arg.default:
            warnings.append(f"{arg_field(index, arg)}: {converted!r} has no effect here ({arg.unavailable})")
        if arg.name is not None:
            values[arg.name] = converted
    if script.finish is not None:
        try:
            values = script.finish(values, ctx)
        except ValueError as exc:
            raise bad_field("script_args", str(exc)) from None
    _check_extension(engine, script)
    own = script.target in (SD_UPSCALE, REQUEST_FIELDS)  # errors name request fields, not extension arguments
    fields = _ERROR_FIELDS.get(key if script.target == REQUEST_FIELDS else script.target, {})
    names = {(name if own else f"extension_args.{script.target}.{name}"): arg_field(i, script.args[i])
             for name, i in fields.items()}
    if not own:
        names[f"extension_args.{script.target}"] = "script_args"
    return Chosen(script=script, target=script.target, args=values, names=names)


def _check_extension(engine: EngineAPI, script: Script) -> None:
    if script.target in (SD_UPSCALE, REQUEST_FIELDS):
        return
    ext = engine.extensions.get(script.target)
    if ext is None:
        raise bad_field("script_name", f"{script.title.lower()!r} runs as the extension {script.target!r}, "
                                       "which is not installed on this server")
    if not ext.active:
        raise bad_field("script_name", f"{script.title.lower()!r} runs as the extension {script.target!r}, "
                                       f"which is {ext.status} (enable it in the Extensions tab)")


# --- listings ------------------------------------------------------------------------------------

def listing(engine: EngineAPI) -> dict[str, list[str]]:
    """GET /scripts: the selectable scripts per mode (A1111's lowercase names) that can run here."""
    def runnable(script: Script) -> bool:
        if script.target in (SD_UPSCALE, REQUEST_FIELDS):
            return True
        ext = engine.extensions.get(script.target)
        return ext is not None and ext.active
    return {mode: [s.title.lower() for s in scripts_for(mode) if runnable(s)] for mode in MODES}


def info(engine: EngineAPI) -> list[dict[str, Any]]:
    """GET /script-info: each listed script once per mode, its arguments in A1111's order."""
    listed = listing(engine)
    out = []
    for mode in MODES:
        ctx = context(engine, mode)
        for script in scripts_for(mode):
            if script.title.lower() not in listed[mode]:
                continue
            out.append({"name": script.title.lower(), "is_alwayson": False, "is_img2img": mode == "img2img",
                        "args": [_describe(arg, ctx) for arg in script.args]})
    return out


def _describe(arg: Arg, ctx: Context) -> dict[str, Any]:
    return {"label": arg.label, "value": arg.default, "minimum": arg.minimum, "maximum": arg.maximum,
            "step": arg.step, "choices": arg.choices(ctx) if arg.choices is not None else None}


def with_script(extension_args: Mapping[str, Any], chosen: Chosen | None) -> dict[str, Any]:
    """The request's extension arguments with the chosen script's (SD upscale and the request-field
    scripts are not extensions)."""
    found = dict(extension_args)
    if chosen is not None and chosen.target not in (SD_UPSCALE, REQUEST_FIELDS):
        found[chosen.target] = chosen.args
    return found
