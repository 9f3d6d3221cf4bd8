"""The hires fix options of the txt2img tab.

`build(engine, fields, prefix)` adds the accordion; its component names are
`GenerationRequest` hr_* fields, so `convert.generation_request` passes them through
unchanged. Every choice comes from the engine (upscalers: latent modes, then every upscaler)
or from core's own names ("Use same checkpoint"/"Use same sampler"/"Use same scheduler": the
request reads them as "the first pass's").
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.core.engine_api import EngineAPI
from pipelines.core.request import HR_DEFAULT_UPSCALER, HR_SAME_CHECKPOINT, HR_SAME_SAMPLER, HR_SAME_SCHEDULER
from webui.common import checkpoint_infos, engine_choices, pick, slider


def build(engine: EngineAPI, fields: dict[str, Any], prefix: str) -> None:
    """The hires fix accordion of a txt2img tab; adds hr_* components to `fields`."""
    upscaler_names = engine_choices(engine.hires_upscaler_names, "hires upscaler names")
    samplers = [HR_SAME_SAMPLER, *engine_choices(engine.sampler_names, "sampler names")]
    schedules = [HR_SAME_SCHEDULER, *engine_choices(engine.schedule_types, "schedule types")]
    checkpoints = [HR_SAME_CHECKPOINT, *(info.name for info in checkpoint_infos(engine))]
    p = prefix
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{p}_hires"):
        fields["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix (generate, upscale, then a second "
                                                       "img2img pass)", elem_id=f"{p}_enable_hr")
        with gr.Row():
            fields["hr_upscaler"] = gr.Dropdown(upscaler_names, value=pick(HR_DEFAULT_UPSCALER, upscaler_names),
                                                label="Upscaler", elem_id=f"{p}_hr_upscaler")
            fields["hr_second_pass_steps"] = slider("hr_second_pass_steps", value=0, step=1,
                                                    label="Hires steps (0 = same)", elem_id=f"{p}_hires_steps")
            fields["hr_denoising_strength"] = slider("hr_denoising_strength", value=0.7, step=0.01,
                                                     label="Denoising strength",
                                                     elem_id=f"{p}_hr_denoising_strength")
        with gr.Row():
            fields["hr_scale"] = slider("hr_scale", value=2.0, step=0.05, label="Upscale by",
                                        elem_id=f"{p}_hr_scale")
            fields["hr_resize_x"] = slider("hr_resize_x", value=0, step=8, label="Resize width to (0 = by scale)",
                                           elem_id=f"{p}_hr_resize_x")
            fields["hr_resize_y"] = slider("hr_resize_y", value=0, step=8, label="Resize height to",
                                           elem_id=f"{p}_hr_resize_y")
        with gr.Row():
            fields["hr_checkpoint_name"] = gr.Dropdown(checkpoints, value=HR_SAME_CHECKPOINT,
                                                       label="Hires checkpoint", elem_id=f"{p}_hr_checkpoint")
            fields["hr_sampler"] = gr.Dropdown(samplers, value=HR_SAME_SAMPLER, label="Hires sampling method",
                                               elem_id=f"{p}_hr_sampler")
            fields["hr_schedule_type"] = gr.Dropdown(schedules, value=HR_SAME_SCHEDULER,
                                                     label="Hires schedule type", elem_id=f"{p}_hr_schedule")
        fields["hr_prompt"] = gr.Textbox(label="Hires prompt (empty = same)", lines=2, elem_id=f"{p}_hr_prompt")
        fields["hr_negative_prompt"] = gr.Textbox(label="Hires negative prompt (empty = same)", lines=2,
                                                  elem_id=f"{p}_hr_neg_prompt")
