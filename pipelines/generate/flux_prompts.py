"""Flux.1's text conditioning, as diffusers' FluxPipeline computes it.

CLIP-L gives its pooled output (the final layer's end-of-text token after the final norm: no
projection, clip skip does not apply) as the transformer's vector input; T5-XXL's 512 tokens
are its sequence. The negative prompt is encoded only when real CFG runs (CFG scale above 1):
Flux dev and schnell are guidance-distilled and need no negative pass.

A1111's attention weights act on T5's sequence as for SD 3 (`flow_emphasis`; CLIP-L's pooled
output reads the words unweighted); BREAK is dropped, and the job says so.
"""

from __future__ import annotations

import torch

from pipelines.generate.flow_emphasis import WeightedText, read_weights
from pipelines.generate.sd3_prompts import CLIP_MAX_LENGTH, FlowConditioning, encode_t5

FLUX_T5_MAX_LENGTH = 512  # diffusers' FluxPipeline max_sequence_length default
WEIGHTS_IGNORED_NOTE = "Flux: BREAK is not applied (no 75-token chunks here); the prompt was read without it"


def encode_pooled_clip(encoder, tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer([text], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device), output_hidden_states=False).pooler_output


def encode_flux_prompt(components, prompt: WeightedText, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence, CLIP-L pooled) of one prompt."""
    (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
    sequence = encode_t5(t5, t5_tokenizer, prompt, device, max_length=FLUX_T5_MAX_LENGTH)
    return sequence, encode_pooled_clip(clip, clip_tokenizer, prompt.text, device)


@torch.no_grad()
def encode_flux_prompts(components, prompt: str, negative_prompt: str, device, real_cfg: bool) -> FlowConditioning:
    """The prompt's conditioning, and the negative prompt's when `real_cfg` (CFG scale above 1)."""
    positive = read_weights(prompt)
    cond, pooled = encode_flux_prompt(components, positive, device)
    uncond = pooled_uncond = None
    broke_negative = False
    if real_cfg:
        negative = read_weights(negative_prompt)
        uncond, pooled_uncond = encode_flux_prompt(components, negative, device)
        broke_negative = negative.broke
    return FlowConditioning(cond, pooled, uncond, pooled_uncond, t5=True,
                            weights_ignored=positive.broke or broke_negative)
