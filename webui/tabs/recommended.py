"""The "Use recommended settings" button of txt2img, img2img and Inpaint, beside the sampler.

One click sets sampler, schedule type, steps and CFG scale to what a few-step model's authors
recommend (LCM, TCD, Hyper-SD, SDXL-Lightning, SD/SDXL Turbo): the engine looks at the LoRAs
the prompt names (`<lora:name:w>`) and then at the chosen checkpoint
(`EngineAPI.recommended_settings`, rules in `pipelines.models.few_step`). A notice always says
what happened: which file the settings are for and why, or that nothing was recognised.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.core.engine_api import EngineAPI
from webui.common import QUIET, call_engine

FILLED = ("sampler", "schedule_type", "steps", "cfg_scale")  # the request fields the button sets
# set where the tab has them and the recommendation does (Flux's guidance; Fill's strength 1), else left as they are
OPTIONAL = ("distilled_cfg_scale", "denoising_strength")
LABEL = "Use recommended settings"
NOTHING_FOUND = ("No few-step or guidance-distilled model recognised (LCM, TCD, Hyper-SD, Lightning, Turbo, "
                 "Flux) in the checkpoint or the prompt's LoRAs: nothing changed.")


def button(p: str) -> gr.Button:
    """The button, built where it shows (in the sampler's row); `wire` connects it."""
    return gr.Button(LABEL, size="sm", scale=0, min_width=170, elem_id=f"{p}_recommended",
                     elem_classes="sdui-recommended")


def wire(engine: EngineAPI, fields: dict[str, Any], clicked: gr.Button) -> None:
    """Fill the tab's sampler, schedule type, steps and CFG from the engine's recommendation."""
    def use_recommended(checkpoint=None, prompt=""):
        return recommend(engine, checkpoint, prompt, optional=tuple(name for name in OPTIONAL if name in fields))

    clicked.click(use_recommended, inputs_kwargs={"checkpoint": fields["checkpoint"], "prompt": fields["prompt"]},
                  outputs=[fields[name] for name in FILLED + OPTIONAL if name in fields], **QUIET)


def recommend(engine: EngineAPI, checkpoint: str | None, prompt: str | None, optional: tuple[str, ...] = ()) -> tuple:
    """The values of `FILLED` and of the `optional` ones (those of `OPTIONAL` the tab has),
    unchanged when nothing is recognised, with a notice saying why."""
    names = FILLED + optional
    found = call_engine("Recommended settings", lambda: engine.recommended_settings(checkpoint, prompt or ""))
    if not found:
        gr.Info(NOTHING_FOUND)
        return tuple(gr.skip() for _ in names)
    sampler, schedule = found["sampler"], found["schedule_type"]
    if sampler not in engine.sampler_names() or schedule not in engine.schedule_types(sampler):
        gr.Warning(f"{notice(found)} This server does not offer {sampler} with {schedule}: nothing changed.")
        return tuple(gr.skip() for _ in names)
    gr.Info(notice(found))
    return tuple(found[name] if name in found else gr.skip() for name in names)


def notice(found: dict) -> str:
    """What the toast says: the file, whether it is the prompt's LoRA or the checkpoint, and why."""
    where = "LoRA in the prompt" if found.get("source_kind") == "lora" else "checkpoint"
    return f"{found['why']}. Set for {found.get('source', 'the model')} ({where})."
