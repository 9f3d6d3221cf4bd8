"""Prompts from file or textbox: one generation per non-empty line of a list, all inside one job.

A plain line is a prompt. A line with options (`--prompt "a cat" --steps 10 --seed 5`, A1111's
shell-like syntax) sets those request fields for that line; --prompt and --negative_prompt take
every word up to the next option.

Arguments (`request.extension_args["prompts-from-file"]`, from the UI section or the API's
`alwayson_scripts: {"prompts-from-file": {"args": {...}}}`):
    prompts          the lines (text; a file uploaded in the UI fills it)
    iterate_seed     each line's seed is the previous one's + batch size x batch count (default false)
    same_seed        with seed -1, every line uses the same random seed (default false: a new one each)
    prompt_position  "start" or "end": where a line's prompt goes when the request has a prompt too
                     (joined with a space); with no request prompt the line is the prompt
    enabled          false turns it off (the UI section sends it)

The images of every line are returned in order (no grid).
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any, Callable

from extensions.api import GenerationRequest, GenerationResult, RequestError, ScriptContext, Setup

ID = "prompts-from-file"
MAX_LINES = 1000
DEFAULTS = {"enabled": True, "prompts": "", "iterate_seed": False, "same_seed": False, "prompt_position": "start"}
POSITIONS = ("start", "end")


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


# A1111's line options -> (GenerationRequest field, converter)
OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int),
    "subseed": ("subseed", int),
    "subseed_strength": ("subseed_strength", float),
    "seed_resize_from_w": ("seed_resize_from_w", int),
    "seed_resize_from_h": ("seed_resize_from_h", int),
    "sampler_name": ("sampler", str),
    "batch_size": ("batch_size", int),
    "n_iter": ("batch_count", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "sd_model": ("checkpoint", str),
    "restore_faces": ("restore_faces", _flag),
    "tiling": ("tiling", _flag),
    "do_not_save_samples": ("save_images", lambda text: not _flag(text)),
}
# A1111 options this server refuses, and why
REFUSED = {
    "outpath_samples": "output folders are the server's; a request cannot choose them",
    "outpath_grids": "output folders are the server's; a request cannot choose them",
    "sampler_index": "use --sampler_name",
    "styles": "write the style's text into the line",
    "prompt_for_display": "not available",
    "do_not_save_grid": "this script makes no grid",
}
_TEXT_OPTIONS = ("prompt", "negative_prompt")


def setup(ext: Setup) -> None:
    ext.before_request(remember_random_seed)
    ext.script(run, title="Prompts from file or textbox", is_active=is_active)
    ext.ui_section(build_ui, title="Prompts from file or textbox")


def is_active(args: Any) -> bool:
    return isinstance(args, dict) and args.get("enabled", True) is not False


def remember_random_seed(ctx) -> GenerationRequest | None:
    """Before seeds are drawn: note whether the request asked for a random one (-1), so that
    each line can get its own, as A1111 does, unless same_seed or iterate_seed says otherwise."""
    if not is_active(ctx.args):
        return None
    args = {**ctx.args, "random_seed": ctx.request.seed == -1}
    return ctx.request.replace(extension_args={**ctx.request.extension_args, ID: args})


def _known_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(GenerationRequest)}


def parse_line(line: str, number: int) -> dict[str, Any]:
    """{GenerationRequest field: value} for one line (RequestError naming the line when it is bad)."""
    where = f"extension_args.{ID}.prompts"
    if "--" not in line:
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise RequestError(where, f"line {number}: {exc}") from None
    values: dict[str, Any] = {}
    known = _known_fields()
    pos = 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise RequestError(where, f"line {number}: expected an option like --steps, got {word!r}")
        tag = word[2:]
        if tag in REFUSED:
            raise RequestError(where, f"line {number}: --{tag} is not available here ({REFUSED[tag]})")
        if tag not in OPTIONS or OPTIONS[tag][0] not in known:
            usable = sorted(t for t, (f, _) in OPTIONS.items() if f in known)
            raise RequestError(where, f"line {number}: unknown option --{tag}; known: "
                                      f"{', '.join('--' + t for t in usable)}")
        if pos + 1 >= len(words):
            raise RequestError(where, f"line {number}: --{tag} needs a value")
        field_name, convert = OPTIONS[tag]
        if tag in _TEXT_OPTIONS:  # every word up to the next option
            end = pos + 1
            while end < len(words) and (end == pos + 1 or not words[end].startswith("--")):
                end += 1
            values[field_name] = " ".join(words[pos + 1:end])
            pos = end
            continue
        try:
            values[field_name] = convert(words[pos + 1])
        except ValueError as exc:
            raise RequestError(where, f"line {number}: --{tag}: {exc}") from None
        pos += 2
    return values


def read_args(args: Any) -> dict:
    if not isinstance(args, dict):
        raise RequestError(f"extension_args.{ID}", "expected an object of named arguments")
    merged = {**DEFAULTS, **args}
    if merged["prompt_position"] not in POSITIONS:
        raise RequestError(f"extension_args.{ID}.prompt_position",
                           f"must be one of {', '.join(POSITIONS)}, got {merged['prompt_position']!r}")
    if not isinstance(merged["prompts"], str):
        raise RequestError(f"extension_args.{ID}.prompts", "must be text, one prompt per line")
    return merged


def plan(request: GenerationRequest, args: dict) -> list[GenerationRequest]:
    """One request per non-empty line, every line checked before anything runs."""
    lines = [(n, text.strip()) for n, text in enumerate(args["prompts"].splitlines(), 1) if text.strip()]
    if not lines:
        raise RequestError(f"extension_args.{ID}.prompts", "give at least one prompt (one per line)")
    if len(lines) > MAX_LINES:
        raise RequestError(f"extension_args.{ID}.prompts", f"at most {MAX_LINES} lines")
    random_each = bool(args.get("random_seed")) and not args["iterate_seed"] and not args["same_seed"]
    seed, cells = request.seed, []
    for number, line in lines:
        values = parse_line(line, number)
        for name in _TEXT_OPTIONS:
            base = getattr(request, name)
            if values.get(name) and base:
                values[name] = f"{values[name]} {base}" if args["prompt_position"] == "start" else \
                    f"{base} {values[name]}"
        values.setdefault("seed", -1 if random_each else seed)
        try:
            cells.append(request.replace(**values))
        except RequestError as exc:
            raise RequestError(f"extension_args.{ID}.prompts", f"line {number}: {exc.field}: {exc.message}") from None
        if args["iterate_seed"]:
            seed = (seed + request.batch_size * request.batch_count) % 2**32
    return cells


def run(ctx: ScriptContext) -> GenerationResult:
    cells = plan(ctx.request, read_args(ctx.args))
    result = GenerationResult(request=ctx.request)
    ctx.report_progress(0, len(cells))  # the job's progress counts every line from the start
    for done, cell in enumerate(cells, 1):
        if ctx.is_interrupted():
            result.interrupted = True
            break
        out = ctx.generate(cell)
        result.take_in(out)
        ctx.report_progress(done, len(cells))
        if out.interrupted:
            result.interrupted = True
            break
    return result


def _read_upload(path: Any) -> str:
    if not path:
        return ""
    with open(path, "rb") as handle:  # gradio's own temp copy of the upload
        return "\n".join(line.strip() for line in handle.read().decode("utf8", errors="replace").splitlines())


def build_ui(ctx) -> dict:
    import gradio as gr  # heavy: only when the UI is built (the API and tests run without it)

    p = f"{ctx.tab}_prompts_from_file"
    fields: dict = {"enabled": gr.Checkbox(False, label="Enable prompts from file or textbox", elem_id=f"{p}_enabled")}
    with gr.Row():
        fields["iterate_seed"] = gr.Checkbox(False, label="Iterate seed every line", elem_id=f"{p}_iterate")
        fields["same_seed"] = gr.Checkbox(False, label="Use same random seed for all lines", elem_id=f"{p}_same")
        fields["prompt_position"] = gr.Radio(list(POSITIONS), value="start", label="Insert prompts at the",
                                             elem_id=f"{p}_position")
    fields["prompts"] = gr.Textbox(label="List of prompt inputs", lines=4, elem_id=f"{p}_prompts",
                                   placeholder='one prompt per line; options too: --prompt "a cat" --steps 10')
    upload = gr.File(label="Upload prompt inputs", type="filepath", file_types=[".txt"], elem_id=f"{p}_file")
    upload.upload(_read_upload, inputs=upload, outputs=fields["prompts"])
    return fields
