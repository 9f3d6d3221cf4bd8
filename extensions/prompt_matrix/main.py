"""Prompt matrix: `a photo of a cat|wearing a hat|at night` makes every combination of the
optional parts (2**n images: the base alone, with each part, with both, ...) in one grid
labelled by which parts are on.

Arguments (`request.extension_args["prompt-matrix"]`): enabled (default true), negative
(bool: split the negative prompt instead), put_at_start (optional parts go before the base),
different_seeds (each combination its own seed), delimiter ("comma" or "space").
"""

from __future__ import annotations

from typing import Any

from extensions.api import GenerationResult, RequestError, ScriptContext, Setup, labelled_grid

ID = "prompt-matrix"
MAX_PARTS = 8
DEFAULTS = {"enabled": True, "negative": False, "put_at_start": False, "different_seeds": False,
            "delimiter": "comma"}


def setup(ext: Setup) -> None:
    ext.script(run, title="Prompt matrix", is_active=is_active)
    ext.ui_section(build_ui, title="Prompt matrix")


def is_active(args: Any) -> bool:
    return isinstance(args, dict) and args.get("enabled", True) is not False


def combinations(text: str, put_at_start: bool = False, delimiter: str = "comma") -> tuple[list[str], list[str]]:
    """(the optional parts, one prompt per combination); combination i has part j when bit j of i is set."""
    base, *parts = [p.strip() for p in text.split("|")]
    joint = ", " if delimiter == "comma" else " "
    prompts = []
    for i in range(2 ** len(parts)):
        chosen = [p for j, p in enumerate(parts) if i >> j & 1]
        prompts.append(joint.join([*chosen, base] if put_at_start else [base, *chosen]).strip(joint.strip() + " "))
    return parts, prompts


def layout(parts: list[str]) -> tuple[int, int, list[str], list[str]]:
    """(columns, rows, column labels, row labels): the first half of the parts across, the rest down."""
    across = (len(parts) + 1) // 2
    down = parts[across:]

    def describe(chosen_bits: int, names: list[str]) -> str:
        return "\n".join(("+ " if chosen_bits >> j & 1 else "- ") + n for j, n in enumerate(names)) or " "

    cols, rows = 2 ** across, 2 ** len(down)
    return cols, rows, [describe(c, parts[:across]) for c in range(cols)], [describe(r, down) for r in range(rows)]


def run(ctx: ScriptContext) -> GenerationResult:
    args = {**DEFAULTS, **(ctx.args if isinstance(ctx.args, dict) else {})}
    request = ctx.request
    source = request.negative_prompt if args["negative"] else request.prompt
    if "|" not in source:
        raise RequestError(f"extension_args.{ID}", "write the optional parts after '|' in the "
                           f"{'negative ' if args['negative'] else ''}prompt, e.g. 'a cat|wearing a hat|at night'")
    parts, prompts = combinations(source, bool(args["put_at_start"]), args["delimiter"])
    if len(parts) > MAX_PARTS:
        raise RequestError(f"extension_args.{ID}", f"at most {MAX_PARTS} optional parts ({2 ** MAX_PARTS} images)")
    result = GenerationResult(request=request)
    firsts = []
    ctx.report_progress(0, len(prompts))  # the job's progress counts every prompt from the start
    for i, prompt in enumerate(prompts):
        if ctx.is_interrupted():
            result.interrupted = True
            break
        changes = {"negative_prompt" if args["negative"] else "prompt": prompt}
        if args["different_seeds"]:
            changes["seed"] = (request.seed + i) % 2**32
        out = ctx.generate(request.replace(**changes))
        firsts.append(out.images[0] if out.images else None)
        result.take_in(out)
        ctx.report_progress(i + 1, len(prompts))
    cols, rows, col_labels, row_labels = layout(parts)
    firsts += [None] * (cols * rows - len(firsts))
    cells = [[firsts[r * cols + c] for c in range(cols)] for r in range(rows)]
    grid = labelled_grid(cells, column_labels=col_labels, row_labels=row_labels if rows > 1 else ())
    text = result.infotexts[0] if result.infotexts else ""
    grid.info["parameters"] = text
    result.images.insert(0, grid)
    result.infotexts.insert(0, text)
    result.paths.insert(0, ctx.save(grid, text) if request.save_images else "")
    result.seeds.insert(0, request.seed)
    result.subseeds.insert(0, request.subseed)
    return result


def build_ui(ctx) -> dict:
    import gradio as gr  # heavy: only when the UI is built (the API and tests run without it)

    p = f"{ctx.tab}_prompt_matrix"
    fields = {"enabled": gr.Checkbox(False, label="Enable prompt matrix (parts after | in the prompt)",
                                     elem_id=f"{p}_enabled")}
    with gr.Row():
        fields["negative"] = gr.Checkbox(False, label="Use the negative prompt", elem_id=f"{p}_negative")
        fields["put_at_start"] = gr.Checkbox(False, label="Put parts at the start", elem_id=f"{p}_start")
        fields["different_seeds"] = gr.Checkbox(False, label="Different seeds", elem_id=f"{p}_seeds")
        fields["delimiter"] = gr.Radio(["comma", "space"], value="comma", label="Joined with", elem_id=f"{p}_delim")
    return fields
