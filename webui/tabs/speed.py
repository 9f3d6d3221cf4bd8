"""The "Speed" accordion of the generation tabs: the options that make a job cheaper at the cost
of changing its image a little, each a GenerationRequest field (so `convert.generation_request`
passes them through and a pasted infotext sets them): token merging (A1111's "Token merging
ratio"), DeepCache, and the CFG cutoff (A1111's NGMS and "Skip Early CFG").
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui import convert
from webui.common import slider


def build(fields: dict[str, Any], prefix: str) -> None:
    """The accordion; adds its components to `fields`. Every value at its default is off."""
    p = prefix
    with gr.Accordion("Speed (fewer and cheaper steps)", open=False, elem_id=f"{p}_speed"):
        gr.Markdown("Each option makes the job faster and the image a little different; all are off at "
                    "their default. The infotext records what was on.")
        with gr.Row():
            fields["token_merging_ratio"] = slider(
                "token_merging_ratio", step=0.05, elem_id=f"{p}_token_merging_ratio",
                info="self-attention at full resolution on fewer tokens (0: off; 0.5 is a common choice; "
                     "0.75 and up merge all they can)")
            fields["deepcache_interval"] = slider(
                "deepcache_interval", step=1, elem_id=f"{p}_deepcache_interval",
                info="the whole U-Net runs every Nth step, the others reuse its deep features (1: off)")
        with gr.Row():
            fields["deepcache_branch"] = slider("deepcache_branch", step=1, elem_id=f"{p}_deepcache_branch",
                                                info="layers kept live besides the outermost (0: fastest)")
            fields["deepcache_start"] = slider("deepcache_start", step=0.05, elem_id=f"{p}_deepcache_start",
                                               info="share of the first steps that always run in full")
        with gr.Row():
            fields["skip_early_cond"] = slider(
                "skip_early_cond", step=0.05, elem_id=f"{p}_skip_early_cond",
                info="this share of the first steps runs without the negative prompt (0: off)")
            fields["s_min_uncond"] = slider(
                "s_min_uncond", step=0.1, elem_id=f"{p}_s_min_uncond",
                info="below this sigma every other step skips the negative prompt (0: off)")
            fields["s_min_uncond_all"] = gr.Checkbox(
                value=convert.request_default("s_min_uncond_all"), label=convert.LABELS["s_min_uncond_all"],
                elem_id=f"{p}_s_min_uncond_all", info="NGMS on every step below the sigma, not every other one")
