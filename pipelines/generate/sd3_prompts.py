"""SD 3's text conditioning, as diffusers' StableDiffusion3Pipeline computes it.

CLIP-L and CLIP-G each give their penultimate hidden state (77 tokens, no final norm) and
their projected pooled output; the two hidden states are concatenated along the width and
zero-padded to T5's width, then T5-XXL's 256 tokens follow them in the sequence (all zeros
when T5 is not loaded, as diffusers does without `text_encoder_3`); the pooled outputs are
concatenated. The negative prompt is encoded the same way (an empty one too: SD 3 was not
trained with zeroed negatives).

A1111's prompt syntax is accepted: attention weights and BREAK are read and dropped (the
words stay, at weight 1), and the job says so; weighting SD 3's encoders is left for later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.core.prompt_parser import is_break, parse_attention
from pipelines.models.t5_tokenizer import T5_MAX_LENGTH

CLIP_MAX_LENGTH = 77
WEIGHTS_IGNORED_NOTE = "SD 3: prompt weights and BREAK are not applied yet (the words are used at weight 1)"


@dataclass(frozen=True)
class FlowConditioning:
    """A flow transformer's text inputs (SD 3 here, Flux in `flux_prompts`)."""

    cond: torch.Tensor  # SD 3: (1, 77 + 256, joint width): CLIP-L|CLIP-G (padded), then T5; Flux: T5's
    pooled_cond: torch.Tensor  # SD 3: (1, CLIP-L + CLIP-G projection widths); Flux: CLIP-L's pooled output
    uncond: torch.Tensor | None  # None: not encoded (Flux without real CFG)
    pooled_uncond: torch.Tensor | None
    t5: bool  # T5-XXL encoded the prompts (else zeros stood in for it)
    weights_ignored: bool = False  # the prompts had weights or BREAK that were dropped


def plain_text(prompt: str) -> tuple[str, bool]:
    """The prompt's words without A1111's attention syntax, and whether any weight or BREAK was dropped."""
    segments = parse_attention(prompt)
    dropped = any(is_break(s) or s[1] != 1.0 for s in segments)
    text = "".join(" " if is_break(segment) else segment[0] for segment in segments)
    return (" ".join(text.split()) if dropped else text), dropped  # untouched prompts stay byte for byte


def clip_hidden_layer(clip_skip: int) -> int:
    """The hidden state SD 3 reads: diffusers' default is the penultimate (-2); A1111's clip
    skip N > 1 goes N - 1 layers earlier (diffusers' clip_skip = N - 1 reads -(N + 1))."""
    return -(max(1, int(clip_skip or 1)) + 1)


def encode_clip(encoder, tokenizer, text: str, device, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state, pooled projection) of one CLIP for one prompt."""
    ids = tokenizer([text], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    output = encoder(ids.to(device), output_hidden_states=True)
    return output.hidden_states[clip_hidden_layer(clip_skip)], output[0]


def encode_t5(encoder, tokenizer, text: str, device, max_length: int = T5_MAX_LENGTH) -> torch.Tensor:
    ids = tokenizer([text], padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(device))[0]


def encode_sd3_prompt(components, text: str, device, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
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
    text, dropped = plain_text(prompt)
    negative, dropped_negative = plain_text(negative_prompt)
    cond, pooled = encode_sd3_prompt(components, text, device, clip_skip)
    uncond, pooled_uncond = encode_sd3_prompt(components, negative, device, clip_skip)
    return FlowConditioning(cond, pooled, uncond, pooled_uncond, t5=len(components.text_encoders) > 2,
                           weights_ignored=dropped or dropped_negative)
