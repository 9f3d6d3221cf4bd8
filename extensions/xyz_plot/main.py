"""X/Y/Z plot: a grid of generations over up to three request fields, with labels.

Arguments (`request.extension_args["xyz-plot"]`, from the UI section or the API's
`alwayson_scripts: {"xyz-plot": {"args": {...}}}`):
    x_type, y_type, z_type   an axis type (see axes.AXIS_NAMES; "Nothing" by default)
    x_values, y_values, z_values   comma-separated values, ranges allowed ("1-4", "5-25 (+10)")
    draw_legend   label the axes (default true)
    include_images   also return every cell's images after the grid(s) (default true)
    include_sub_grids   with several Z values, also each Z value's grid after the combined one (default true)
    enabled   false turns it off (the UI section sends it)

It runs as a script: each cell is one generation inside the same job (seeds fixed once for
the whole grid unless Seed is an axis). The first image returned is the grid (with Z, one
grid per Z value side by side, then each Z grid), then the cells' images.
"""

from __future__ import annotations

from typing import Any

from extensions.api import GenerationResult, RequestError, ScriptContext, Setup, labelled_grid

from . import axes

ID = "xyz-plot"
MAX_CELLS = 500
DEFAULTS = {"enabled": True, "x_type": "Nothing", "x_values": "", "y_type": "Nothing", "y_values": "",
            "z_type": "Nothing", "z_values": "", "draw_legend": True, "include_images": True,
            "include_sub_grids": True}


def setup(ext: Setup) -> None:
    ext.script(run, title="X/Y/Z plot", is_active=is_active)
    ext.ui_section(build_ui, title="X/Y/Z plot")


def is_active(args: Any) -> bool:
    if not isinstance(args, dict) or args.get("enabled", True) is False:
        return False
    return any(args.get(f"{a}_type", "Nothing") not in ("Nothing", "", None) for a in "xyz")


def read_args(args: Any) -> dict:
    if not isinstance(args, dict):
        raise RequestError(f"extension_args.{ID}", "expected an object of named arguments")
    merged = {**DEFAULTS, **args}
    for name in ("x", "y", "z"):
        kind = merged[f"{name}_type"] or "Nothing"
        if kind not in axes.AXIS_TYPES:
            raise RequestError(f"extension_args.{ID}.{name}_type",
                               f"unknown axis type {kind!r}; choose from {', '.join(axes.AXIS_NAMES)}")
        merged[f"{name}_type"] = kind
    return merged


def plan(request, args: dict):
    """(axes [(type, values, labels)] for x, y, z; cells {(x, y, z): request}) - all validated."""
    found = []
    for name in ("x", "y", "z"):
        axis = axes.AXIS_TYPES[args[f"{name}_type"]]
        where = f"extension_args.{ID}.{name}_values"
        values = axes.parse_values(axis, args[f"{name}_values"], where)
        found.append((axis, values, [axes.label(axis, v) for v in values], where))
    total = len(found[0][1]) * len(found[1][1]) * len(found[2][1])
    if total > MAX_CELLS:
        raise RequestError(f"extension_args.{ID}", f"{total} cells is more than {MAX_CELLS}; use fewer values")
    cells = {}
    for iz, vz in enumerate(found[2][1]):
        for iy, vy in enumerate(found[1][1]):
            for ix, vx in enumerate(found[0][1]):
                cell = request
                for (axis, values, _, where), value in zip(found, (vx, vy, vz)):
                    cell = axes.apply(cell, axis, value, values, where)
                cells[(ix, iy, iz)] = cell
    return found, cells


def run(ctx: ScriptContext) -> GenerationResult:
    args = read_args(ctx.args)
    (x, y, z), cells = plan(ctx.request, args)
    result = GenerationResult(request=ctx.request)
    firsts: dict = {}
    done = 0
    ctx.report_progress(0, len(cells))  # the job's progress counts every cell from the start
    for key, cell in cells.items():
        if ctx.is_interrupted():
            result.interrupted = True
            break
        out = ctx.generate(cell)
        if out.images:
            firsts[key] = (out.images[0], out.infotexts[0] if out.infotexts else "",
                           out.seeds[0] if out.seeds else None)
        result.take_in(out, images=args["include_images"])
        done += 1
        ctx.report_progress(done, len(cells))
        if out.interrupted:
            result.interrupted = True
            break
    grids = build_grids(firsts, x, y, z, legend=bool(args["draw_legend"]))
    if not args["include_sub_grids"]:
        grids = grids[:1]  # with several Z values: the combined grid only
    first = next(iter(firsts.values()), (None, "", ctx.request.seed))
    text = first[1]
    out_images, out_texts, out_paths = [], [], []
    for grid in grids:
        grid.info["parameters"] = text
        out_images.append(grid)
        out_texts.append(text)
        out_paths.append(ctx.save(grid, text) if ctx.request.save_images else "")
    result.images[:0] = out_images
    result.infotexts[:0] = out_texts
    result.paths[:0] = out_paths
    result.seeds[:0] = [first[2] if first[2] is not None else ctx.request.seed] * len(out_images)
    result.subseeds[:0] = [ctx.request.subseed] * len(out_images)
    return result


def build_grids(firsts: dict, x, y, z, legend: bool = True) -> list:
    """The grid (and, with several Z values, each Z grid after the combined one)."""
    grids = []
    for iz in range(len(z[1])):
        rows = [[firsts.get((ix, iy, iz), (None,))[0] for ix in range(len(x[1]))] for iy in range(len(y[1]))]
        grids.append(labelled_grid(
            rows,
            column_labels=x[2] if legend and x[0].label != "Nothing" else (),
            row_labels=y[2] if legend and y[0].label != "Nothing" else (),
            title=z[2][iz] if legend and z[0].label != "Nothing" else ""))
    if len(grids) == 1:
        return grids
    return [labelled_grid([grids]), *grids]


def build_ui(ctx) -> dict:
    import gradio as gr  # heavy: only when the UI is built (the API and tests run without it)

    p = f"{ctx.tab}_xyz"
    fields: dict = {"enabled": gr.Checkbox(False, label="Enable X/Y/Z plot", elem_id=f"{p}_enabled")}
    for name in ("x", "y", "z"):
        with gr.Row():
            fields[f"{name}_type"] = gr.Dropdown(axes.AXIS_NAMES, value="Nothing", label=f"{name.upper()} type",
                                                 elem_id=f"{p}_{name}_type", scale=1)
            fields[f"{name}_values"] = gr.Textbox(label=f"{name.upper()} values", placeholder="1, 2, 3 or 1-5 (+2)",
                                                  elem_id=f"{p}_{name}_values", scale=3)
    with gr.Row():
        fields["draw_legend"] = gr.Checkbox(True, label="Draw legend", elem_id=f"{p}_legend")
        fields["include_images"] = gr.Checkbox(True, label="Include sub images", elem_id=f"{p}_sub_images")
    return fields
