"""SD 3's text conditioning, as diffusers' StableDiffusion3Pipeline computes it.

CLIP-L and CLIP-G each give their penultimate hidden state (77 tokens, no final norm) and
their projected pooled output; the two hidden states are concatenated along the width and
zero-padded to T5's width, then T5-XXL's 256 tokens follow them in the sequence (all zeros
when T5 is not loaded, as diffusers does without `text_encoder_3`); the pooled outputs are
concatenated. The negative prompt is encoded the same way (an empty one too: SD 3 was not
trained with zeroed negatives).

A1111's attention weights act on all three encoders' hidden states (`flow_emphasis`); a prompt
without weights is tokenized exactly as diffusers does. BREAK is dropped, and the job says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.generate.flow_emphasis import WeightedText, read_weights, weighted_ids
from pipelines.generate.prompts import emphasize
from pipelines.models.t5_tokenizer import T5_MAX_LENGTH

CLIP_MAX_LENGTH = 77
WEIGHTS_IGNORED_NOTE = "SD 3: BREAK is not applied (no 75-token chunks here); the prompt was read without it"


@dataclass(frozen=True)
class FlowConditioning:
    """A flow transformer's text inputs (SD 3 here, Flux in `flux_prompts`)."""

    cond: torch.Tensor  # SD 3: (1, 77 + 256, joint width): CLIP-L|CLIP-G (padded), then T5; Flux: T5's
    pooled_cond: torch.Tensor  # SD 3: (1, CLIP-L + CLIP-G projection widths); Flux: CLIP-L's pooled output
    uncond: torch.Tensor | None  # None: not encoded (Flux without real CFG)
    pooled_uncond: torch.Tensor | None
    t5: bool  # T5-XXL encoded the prompts (else zeros stood in for it)
    weights_ignored: bool = False  # the prompts had a BREAK, which was dropped


def clip_hidden_layer(clip_skip: int) -> int:
    """The hidden state SD 3 reads: diffusers' default is the penultimate (-2); A1111's clip
    skip N > 1 goes N - 1 layers earlier (diffusers' clip_skip = N - 1 reads -(N + 1))."""
    return -(max(1, int(clip_skip or 1)) + 1)


def encode_ids(encoder, tokenizer, prompt: WeightedText, device, length: int, begin: bool, **options):
    """The encoder's output for one prompt, and the positions' weights (None when all are 1):
    weighted prompts token by token (`flow_emphasis`), others as diffusers tokenizes them."""
    if prompt.weighted:
        ids, weights = weighted_ids(tokenizer, prompt.segments, length, begin)
        ids = [ids]
    else:
        ids = tokenizer([prompt.text], padding="max_length", max_length=length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.tolist()
        weights = None
    return encoder(torch.tensor(ids, device=device), **options), weights


def weighed(hidden: torch.Tensor, weights: list[float] | None) -> torch.Tensor:
    return hidden if weights is None else emphasize(hidden[0], weights)[None]


def encode_clip(encoder, tokenizer, prompt: WeightedText, device,
                clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state, pooled projection) of one CLIP for one prompt."""
    output, weights = encode_ids(encoder, tokenizer, prompt, device, CLIP_MAX_LENGTH, True, output_hidden_states=True)
    return weighed(output.hidden_states[clip_hidden_layer(clip_skip)], weights), output[0]


def encode_t5(encoder, tokenizer, prompt: WeightedText, device, max_length: int = T5_MAX_LENGTH) -> torch.Tensor:
    output, weights = encode_ids(encoder, tokenizer, prompt, device, max_length, False)
    return weighed(output[0], weights)


def encode_sd3_prompt(components, text: WeightedText, device, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, pooled embeddings) of one prompt, diffusers' SD3 layout."""
    encoders, tokenizers = components.text_encoders, components.tokenizers
    (hidden_l, pooled_l), (hidden_g, pooled_g) = (
        encode_clip(encoders[i], tokenizers[i], text, device, clip_skip) for i in (0, 1))
    clip = torch.cat([hidden_l, hidden_g], dim=-1)
    joint_width = components.unet.config.joint_attention_dim
    if len(encoders) > 2:
        t5 = encode_t5(encoders[2], tokenizers[2], text, device)
    else:
        t5 = torch.zeros((1, T5_MAX_LENGTH, joint_width), device=device, dtype=clip.dtype)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)


@torch.no_grad()
def encode_sd3_prompts(components, prompt: str, negative_prompt: str, device, clip_skip: int = 1) -> FlowConditioning:
    positive, negative = read_weights(prompt), read_weights(negative_prompt)
    cond, pooled = encode_sd3_prompt(components, positive, device, clip_skip)
    uncond, pooled_uncond = encode_sd3_prompt(components, negative, device, clip_skip)
    return FlowConditioning(cond, pooled, uncond, pooled_uncond, t5=len(components.text_encoders) > 2,
                           weights_ignored=positive.broke or negative.broke)
