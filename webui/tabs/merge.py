"""The Merge tab: A1111's Checkpoint Merger (primary A, secondary B, tertiary C, method,
multiplier, fp16, baked-in VAE) as an engine job with a progress bar.

Components are named like `MergeRequest`'s fields, so the handler builds the request by
name. After a merge the new file is offered in every checkpoint dropdown (the header's and
this tab's), as the engine has already listed it.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.core.merge_request import INTERP_METHODS, NO_VAE, WEIGHTED_SUM, MergeRequest
from pipelines.core.request import RequestError
from webui.common import (
    CONTROL_GROUP,
    QUEUED_GROUP,
    Page,
    checkpoint_infos,
    engine_choices,
    request_error,
    tool_button,
    unchanged,
)

MODEL_FIELDS = ("primary_model_name", "secondary_model_name", "tertiary_model_name")
MODEL_LABELS = ("Primary model (A)", "Secondary model (B)", "Tertiary model (C)")
FORMULAS = {
    "No interpolation": "Result = A (only the VAE and the precision change)",
    "Weighted sum": "Result = A × (1 − M) + B × M",
    "Add difference": "Result = A + (B − C) × M",
}


class MergeTab:
    def __init__(self, ui: Page):
        self.ui = ui
        self.engine = ui.engine

    def checkpoint_names(self, refresh: bool = False) -> list[str]:
        return [info.name for info in checkpoint_infos(self.engine, refresh)]

    def vae_names(self) -> list[str]:
        return ["None", *engine_choices(lambda: [f.name for f in self.engine.list_vaes()], "VAE listing")]

    def build(self) -> None:
        ui = self.ui
        names = self.checkpoint_names()
        fields: dict[str, Any] = {}
        with gr.Row(equal_height=False):
            with gr.Column():
                with gr.Row():
                    for name, label in zip(MODEL_FIELDS, MODEL_LABELS):
                        fields[name] = gr.Dropdown(names, value=None, label=label, elem_id=f"merge_{name}")
                    refresh = tool_button("refresh", "merge_refresh")
                fields["custom_name"] = gr.Textbox(label="Custom name (optional)", elem_id="merge_custom_name",
                                                   placeholder="a file name; empty: named after the inputs")
                fields["multiplier"] = gr.Slider(0, 1, value=0.3, step=0.05, label="Multiplier (M)",
                                                 elem_id="merge_multiplier")
                fields["interp_method"] = gr.Radio(list(INTERP_METHODS), value=WEIGHTED_SUM,
                                                   label="Interpolation method", elem_id="merge_interp_method",
                                                   info=FORMULAS[WEIGHTED_SUM])
                with gr.Row():
                    fields["save_as_half"] = gr.Checkbox(True, label="Save as float16", elem_id="merge_save_as_half")
                    fields["overwrite"] = gr.Checkbox(False, label="Overwrite an existing file",
                                                      elem_id="merge_overwrite")
                fields["bake_in_vae"] = gr.Dropdown(self.vae_names(), value="None", label="Bake in VAE",
                                                    elem_id="merge_bake_in_vae")
                with gr.Row():
                    button = gr.Button("Merge", variant="primary", elem_id="merge_button", scale=3)
                    interrupt = gr.Button("Interrupt", elem_id="merge_interrupt", scale=1)
            with gr.Column():
                result = gr.Textbox(label="Result", lines=3, interactive=False, elem_id="merge_result")
        ui.fields["merge"] = fields
        ui.components["merge"] = {"button": button, "result": result, "interrupt": interrupt, "refresh": refresh}
        dropdowns = [ui.components["checkpoint"], *(fields[n] for n in MODEL_FIELDS)]
        fields["interp_method"].change(lambda method: gr.update(info=FORMULAS.get(method, "")),
                                       inputs=fields["interp_method"], outputs=fields["interp_method"],
                                       queue=False, show_progress="hidden")
        refresh.click(self.refresh, outputs=[*dropdowns, fields["bake_in_vae"]], queue=False, show_progress="hidden")
        button.click(self.merge, inputs_kwargs=fields, outputs=[result, *dropdowns], concurrency_id=QUEUED_GROUP,
                     concurrency_limit=ui.runner.capacity(), api_name="merge_checkpoints")
        interrupt.click(ui.runner.interrupt, concurrency_id=CONTROL_GROUP, concurrency_limit=None,
                        show_progress="hidden")

    # --- handlers ---------------------------------------------------------------------------
    def refresh(self) -> tuple:
        names = self.checkpoint_names(refresh=True)
        return (*(gr.update(choices=names) for _ in range(1 + len(MODEL_FIELDS))),
                gr.update(choices=self.vae_names()))

    def merge(self, request: gr.Request = None, progress=gr.Progress(), **fields) -> tuple:
        try:
            req = merge_request(fields)
        except RequestError as exc:
            raise request_error(exc) from None
        result = self.ui.runner.run("Merge", request, progress if request is not None else None,
                                    lambda **job: self.engine.merge_checkpoints(req, **job))
        if result is None:  # did not run (queue full, interrupted while waiting): said in a toast
            return unchanged(2 + len(MODEL_FIELDS))
        for warning in result.warnings:
            gr.Warning(warning)
        names = self.checkpoint_names()
        return (result.message, *(gr.update(choices=names) for _ in range(1 + len(MODEL_FIELDS))))


def merge_request(fields: dict[str, Any]) -> MergeRequest:
    """The tab's values, by name, as a MergeRequest (RequestError naming a bad field)."""
    values = {k: v for k, v in fields.items() if k in MergeRequest.__dataclass_fields__}
    for name in (*MODEL_FIELDS, "custom_name"):
        if values.get(name) is None or isinstance(values[name], str):
            values[name] = (values.get(name) or "").strip()
    if values.get("bake_in_vae") in (None, *NO_VAE):
        values["bake_in_vae"] = "None"
    return MergeRequest(**values)
