"""Loopback: img2img whose output becomes the next loop's input, inside one job.

Arguments (`request.extension_args["loopback"]`, from the UI section of img2img / Inpaint or
the API's `alwayson_scripts: {"loopback": {"args": {...}}}`):
    loops                     how many img2img passes per batch (1-32, default 4)
    final_denoising_strength  the strength of the last loop (0-1, default 0.5); the first uses
                              the request's denoising strength
    denoising_curve           how the strength moves from the first to the last loop:
                              "Aggressive" (sine: fast at first), "Linear" (default), "Lazy" (1 - cosine)
    append_interrogation      "None" (interrogating the image for a prompt is not available here)
    enabled                   false turns it off (the UI section sends it)

Each loop uses the previous loop's seed + 1 and batch size 1; with inpainting, loops after the
first keep the masked content ("original"). With batch count 1 every loop's image is returned,
after a one-row grid of them; with more, each batch's last image (after their grid).
"""

from __future__ import annotations

import math
from typing import Any

from extensions.api import GenerationResult, ImageChange, RequestError, ScriptContext, Setup, labelled_grid

ID = "loopback"
CURVES = ("Aggressive", "Linear", "Lazy")
INTERROGATORS = ("None", "CLIP", "DeepBooru")
MAX_LOOPS = 32
DEFAULTS = {"enabled": True, "loops": 4, "final_denoising_strength": 0.5, "denoising_curve": "Linear",
            "append_interrogation": "None"}


def setup(ext: Setup) -> None:
    ext.script(run, title="Loopback", is_active=is_active)
    ext.after_image(tag_infotext)
    ext.ui_section(build_ui, tabs=("img2img", "inpaint"), title="Loopback")


def is_active(args: Any) -> bool:
    return isinstance(args, dict) and args.get("enabled", True) is not False


def tag_infotext(ctx) -> ImageChange | None:
    """A1111's infotext keys for a loopback image."""
    if not is_active(ctx.args) or ctx.request.mode == "txt2img":
        return None
    args = {**DEFAULTS, **ctx.args}
    return ImageChange(infotext={"Final denoising strength": args["final_denoising_strength"],
                                 "Denoising curve": args["denoising_curve"]})


def read_args(args: Any) -> dict:
    where = f"extension_args.{ID}"
    if not isinstance(args, dict):
        raise RequestError(where, "expected an object of named arguments")
    merged = {**DEFAULTS, **args}
    loops = merged["loops"]
    if isinstance(loops, bool) or not isinstance(loops, (int, float)) or loops != int(loops) \
            or not 1 <= loops <= MAX_LOOPS:
        raise RequestError(f"{where}.loops", f"must be a whole number from 1 to {MAX_LOOPS}, got {loops!r}")
    merged["loops"] = int(loops)
    final = merged["final_denoising_strength"]
    if isinstance(final, bool) or not isinstance(final, (int, float)) or not 0 <= final <= 1:
        raise RequestError(f"{where}.final_denoising_strength", f"must be between 0 and 1, got {final!r}")
    if merged["denoising_curve"] not in CURVES:
        raise RequestError(f"{where}.denoising_curve",
                           f"must be one of {', '.join(CURVES)}, got {merged['denoising_curve']!r}")
    if merged["append_interrogation"] not in INTERROGATORS:
        raise RequestError(f"{where}.append_interrogation",
                           f"must be one of {', '.join(INTERROGATORS)}, got {merged['append_interrogation']!r}")
    if merged["append_interrogation"] != "None":
        raise RequestError(f"{where}.append_interrogation",
                           f"{merged['append_interrogation']} interrogation is not available on this server; send None")
    return merged


def strength_at(loop: int, loops: int, first: float, final: float, curve: str) -> float:
    """The denoising strength of loop `loop` (0-based) of `loops`."""
    if loops == 1:
        return first
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        progress = math.sin(progress * math.pi / 2)
    elif curve == "Lazy":
        progress = 1 - math.cos(progress * math.pi / 2)
    return first + (final - first) * progress


def run(ctx: ScriptContext) -> GenerationResult:
    args = read_args(ctx.args)
    request = ctx.request
    if request.mode == "txt2img" or request.init_image is None:
        raise RequestError(f"extension_args.{ID}", "loopback works on img2img or inpaint (it needs an input image)")
    loops, batches = args["loops"], request.batch_count
    result = GenerationResult(request=request)
    shown, seed, done = [], request.seed, 0
    ctx.report_progress(0, loops * batches)  # the job's progress counts every loop from the start
    for _ in range(batches):
        image, fill = request.init_image, request.inpainting_fill
        last = None
        for loop in range(loops):
            if ctx.is_interrupted():
                result.interrupted = True
                break
            strength = strength_at(loop, loops, request.denoising_strength, args["final_denoising_strength"],
                                   args["denoising_curve"])
            out = ctx.generate(request.replace(init_image=image, denoising_strength=strength, seed=seed,
                                               batch_size=1, batch_count=1, inpainting_fill=fill))
            result.take_in(out, images=False)  # the images: only the ones shown, below
            done += 1
            ctx.report_progress(done, loops * batches)
            if not out.images or out.interrupted:
                result.interrupted = result.interrupted or out.interrupted
                break
            seed = ((out.seeds[0] if out.seeds else seed) + 1) % 2**32
            image, fill = out.images[0], "original"
            last = (out.images[0], out.seeds[0] if out.seeds else seed, out.subseeds[0] if out.subseeds else 0,
                    out.infotexts[0] if out.infotexts else "", out.paths[0] if out.paths else "")
            if batches == 1:
                _add(result, last)
                shown.append(last[0])
        if batches > 1 and last is not None and not result.interrupted:
            _add(result, last)
            shown.append(last[0])
        if result.interrupted:
            break
    if len(shown) > 1:
        grid = labelled_grid([shown])
        text = result.infotexts[0]
        grid.info["parameters"] = text
        result.images.insert(0, grid)
        result.infotexts.insert(0, text)
        result.seeds.insert(0, result.seeds[0])
        result.subseeds.insert(0, result.subseeds[0])
        result.paths.insert(0, ctx.save(grid, text) if request.save_images else "")
    return result


def _add(result: GenerationResult, item: tuple) -> None:
    image, seed, subseed, text, path = item
    result.images.append(image)
    result.seeds.append(seed)
    result.subseeds.append(subseed)
    result.infotexts.append(text)
    result.paths.append(path)


def build_ui(ctx) -> dict:
    import gradio as gr  # heavy: only when the UI is built (the API and tests run without it)

    p = f"{ctx.tab}_loopback"
    fields: dict = {"enabled": gr.Checkbox(False, label="Enable loopback", elem_id=f"{p}_enabled")}
    with gr.Row():
        fields["loops"] = gr.Slider(1, MAX_LOOPS, value=4, step=1, label="Loops", elem_id=f"{p}_loops")
        fields["final_denoising_strength"] = gr.Slider(0, 1, value=0.5, step=0.01, label="Final denoising strength",
                                                       elem_id=f"{p}_final_strength")
        fields["denoising_curve"] = gr.Dropdown(list(CURVES), value="Linear", label="Denoising strength curve",
                                                elem_id=f"{p}_curve")
    return fields
