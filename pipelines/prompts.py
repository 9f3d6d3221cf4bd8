"""Prompt text -> text-encoder conditioning.

Prompts longer than 75 tokens are split into chunks of 75, each wrapped in BOS/EOS and
padded to 77, encoded separately and concatenated (A1111's behaviour), so nothing past
token 75 is silently dropped. The positive and negative conditioning are padded to the
same number of chunks with empty chunks.
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


@torch.no_grad()
def encode_chunks(text_encoder, tokenizer, chunks: list[list[int]], clip_skip: int, device) -> torch.Tensor:
    ids = torch.tensor([_chunk_ids(tokenizer, c) for c in chunks], device=device)
    out = text_encoder(ids, output_hidden_states=clip_skip > 1)
    if clip_skip > 1:
        # A1111's "clip skip": the hidden state clip_skip-1 layers before the last, then the final norm
        hidden = out.hidden_states[-clip_skip]
        body = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it, 5 does not
        hidden = body.final_layer_norm(hidden)
    else:
        hidden = out.last_hidden_state
    return hidden.reshape(1, -1, hidden.shape[-1])


def encode_prompts(components, prompt: str, negative_prompt: str, clip_skip: int, device) -> Conditioning:
    encoder, tokenizer = components.text_encoders[0], components.tokenizers[0]
    pos, neg = tokenize_chunks(tokenizer, prompt), tokenize_chunks(tokenizer, negative_prompt)
    n = max(len(pos), len(neg))
    pos += [[]] * (n - len(pos))
    neg += [[]] * (n - len(neg))
    clip_skip = min(clip_skip, encoder.config.num_hidden_layers)
    return Conditioning(
        cond=encode_chunks(encoder, tokenizer, pos, clip_skip, device),
        uncond=encode_chunks(encoder, tokenizer, neg, clip_skip, device),
    )
