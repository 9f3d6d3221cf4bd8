"""Prompt text -> text-encoder conditioning.

Prompts longer than 75 tokens are split into chunks of 75, each wrapped in BOS/EOS and
padded to 77, encoded separately and concatenated (A1111's behaviour), so nothing past
token 75 is silently dropped. The positive and negative conditioning are padded to the
same number of chunks with empty chunks.

Each family says which hidden state of each of its text encoders is used
(`TextEncoderSpec.layer`): SD 1.x the last one or A1111's clip skip; SD 2.x always the
penultimate one with the final norm; SDXL always the penultimate one without it, both
encoders' states concatenated (768 + 1280 = 2048 for the real ones). An encoder marked
`pooled` (SDXL's bigG) also gives its projected pooled output of the first chunk, which
conditions the U-Net with the size ids (see `runner.added_conditioning`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 75  # tokens per chunk, plus BOS and EOS


def tokenize_chunks(tokenizer, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
    return chunks or [[]]


def _chunk_ids(tokenizer, chunk: list[int]) -> list[int]:
    ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CHUNK + 2 - len(ids))


@dataclass
class Conditioning:
    cond: torch.Tensor  # [1, 77 * chunks, dim]
    uncond: torch.Tensor
    pooled_cond: torch.Tensor | None = None  # [1, projection dim] (SDXL)
    pooled_uncond: torch.Tensor | None = None


def _final_norm(text_encoder):
    body = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it, 5 does not
    return body.final_layer_norm


@torch.no_grad()
def encode_chunks(text_encoder, tokenizer, chunks: list[list[int]], clip_skip: int, device,
                  layer: str = "user", pooled: bool = False):
    """Hidden states [1, 77 * chunks, dim] (and, if `pooled`, the first chunk's pooled output)."""
    ids = torch.tensor([_chunk_ids(tokenizer, c) for c in chunks], device=device)
    if layer == "user":
        skip = clip_skip
    else:  # the family fixes the layer: the penultimate one, whatever the clip skip setting
        skip = 2
    skip = max(1, min(skip, text_encoder.config.num_hidden_layers))
    out = text_encoder(ids, output_hidden_states=skip > 1)
    if skip > 1:
        # A1111's "clip skip": the hidden state skip-1 layers before the last ...
        hidden = out.hidden_states[-skip]
        if layer != "penultimate_raw":
            hidden = _final_norm(text_encoder)(hidden)  # ... then the final norm (not for SDXL)
    else:
        hidden = out.last_hidden_state
    hidden = hidden.reshape(1, -1, hidden.shape[-1])
    if not pooled:
        return hidden
    return hidden, out.text_embeds[:1]


def encode_prompts(components, prompt: str, negative_prompt: str, clip_skip: int, device) -> Conditioning:
    family = components.spec.family
    specs = family.text_encoders
    per_encoder = []
    for spec, encoder, tokenizer in zip(specs, components.text_encoders, components.tokenizers):
        pos, neg = tokenize_chunks(tokenizer, prompt), tokenize_chunks(tokenizer, negative_prompt)
        per_encoder.append((spec, encoder, tokenizer, pos, neg))
    # every encoder sees the same number of chunks (the BPE is shared, but be safe)
    n = max(max(len(pos), len(neg)) for *_, pos, neg in per_encoder)
    conds, unconds, pooled_cond, pooled_uncond = [], [], None, None
    for spec, encoder, tokenizer, pos, neg in per_encoder:
        pos = pos + [[]] * (n - len(pos))
        neg = neg + [[]] * (n - len(neg))
        for chunks, target in ((pos, conds), (neg, unconds)):
            out = encode_chunks(encoder, tokenizer, chunks, clip_skip, device, spec.layer, spec.pooled)
            if spec.pooled:
                out, pooled = out
                if target is conds:
                    pooled_cond = pooled
                else:
                    pooled_uncond = pooled
            target.append(out)
    cond, uncond = torch.cat(conds, dim=-1), torch.cat(unconds, dim=-1)
    if family.zero_empty_negative and not negative_prompt.strip():
        # SDXL: an empty negative prompt means zero conditioning (A1111 and diffusers agree)
        uncond = torch.zeros_like(uncond)
        if pooled_uncond is not None:
            pooled_uncond = torch.zeros_like(pooled_uncond)
    return Conditioning(cond=cond, uncond=uncond, pooled_cond=pooled_cond, pooled_uncond=pooled_uncond)
