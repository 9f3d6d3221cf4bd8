"""A1111's attention weights, ``(word:1.2)``, for the flow families' text encoders (SD 3's
CLIP-L, CLIP-G and T5; Flux's T5), as Forge applies them to these models.

Each run of the prompt is tokenized on its own and its tokens carry its weight; the encoder
reads the whole sequence once; the hidden states are then emphasized by `prompts.emphasize`
(the one home of A1111's rule: multiply each position by its weight, restore the mean). Pooled
outputs are not weighted (A1111 does not weight them either). A prompt whose weights are all 1
takes the plain path instead, the tokenization diffusers' pipelines use, so it stays identical
to them. BREAK has no meaning without A1111's 75-token chunks: it is dropped, and the job says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.prompt_parser import is_break, parse_attention


@dataclass(frozen=True)
class WeightedText:
    """A prompt read for a flow model's encoders."""

    text: str  # the words without the syntax: the unweighted path and the pooled outputs read it
    segments: tuple[tuple[str, float], ...]  # (words, weight) runs, BREAKs left out
    weighted: bool  # some run's weight is not 1
    broke: bool  # a BREAK was dropped


def read_weights(prompt: str) -> WeightedText:
    runs = parse_attention(prompt)
    segments = tuple((text, float(weight)) for text, weight in (r for r in runs if not is_break(r)))
    broke = any(is_break(r) for r in runs)
    weighted = any(weight != 1.0 for _, weight in segments)
    text = "".join(" " if is_break(r) else r[0] for r in runs)
    if broke or weighted:
        text = " ".join(text.split())  # untouched prompts stay byte for byte
    return WeightedText(text, segments, weighted, broke)


def weighted_ids(tokenizer, segments, length: int, begin: bool) -> tuple[list[int], list[float]]:
    """Token ids of `segments` as the encoder takes them ([BOS,] tokens, EOS, padding to
    `length`; truncated like the plain path) and each position's weight (1 for the special ones)."""
    ids, weights = ([tokenizer.bos_token_id], [1.0]) if begin else ([], [])
    for text, weight in segments:
        tokens = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    ids, weights = ids[:length - 1] + [tokenizer.eos_token_id], weights[:length - 1] + [1.0]
    padding = length - len(ids)
    return ids + [tokenizer.pad_token_id] * padding, weights + [1.0] * padding
