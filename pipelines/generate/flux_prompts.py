"""Flux.1's text conditioning, as diffusers' FluxPipeline computes it.

CLIP-L gives its pooled output (the final layer's end-of-text token after the final norm: no
projection, clip skip does not apply) as the transformer's vector input; T5-XXL's 512 tokens
are its sequence. The negative prompt is encoded only when real CFG runs (CFG scale above 1):
Flux dev and schnell are guidance-distilled and need no negative pass.

A1111's prompt syntax is accepted as for SD 3: attention weights and BREAK are read and dropped
(the words stay, at weight 1: T5 has no per-token emphasis here), and the job says so.
"""

from __future__ import annotations

import torch

from pipelines.generate.sd3_prompts import CLIP_MAX_LENGTH, FlowConditioning, encode_t5, plain_text

FLUX_T5_MAX_LENGTH = 512  # diffusers' FluxPipeline max_sequence_length default
WEIGHTS_IGNORED_NOTE = ("Flux: prompt weights and BREAK are not applied (T5 reads the words at weight 1; "
                        "describe what matters in words instead)")


def encode_pooled_clip(encoder, tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer([text], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device), output_hidden_states=False).pooler_output


def encode_flux_prompt(components, text: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence, CLIP-L pooled) of one prompt."""
    (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
    sequence = encode_t5(t5, t5_tokenizer, text, device, max_length=FLUX_T5_MAX_LENGTH)
    return sequence, encode_pooled_clip(clip, clip_tokenizer, text, device)


@torch.no_grad()
def encode_flux_prompts(components, prompt: str, negative_prompt: str, device, real_cfg: bool) -> FlowConditioning:
    """The prompt's conditioning, and the negative prompt's when `real_cfg` (CFG scale above 1)."""
    text, dropped = plain_text(prompt)
    cond, pooled = encode_flux_prompt(components, text, device)
    uncond = pooled_uncond = None
    dropped_negative = False
    if real_cfg:
        negative, dropped_negative = plain_text(negative_prompt)
        uncond, pooled_uncond = encode_flux_prompt(components, negative, device)
    return FlowConditioning(cond, pooled, uncond, pooled_uncond, t5=True, weights_ignored=dropped or dropped_negative)
