"""Prompt text -> text-encoder conditioning, in A1111's prompt language.

What a prompt goes through (the order of `pipelines.core.prompt_parser`):

1. ``<lora:...>``-style tags are cut out of the positive prompt (the engine applies the
   networks; see `pipelines.generate.lora`). ``AND`` sub-prompts are joined into one text
   (composable diffusion is not implemented; their weights are ignored).
2. ``prompt_schedule`` gives the texts over the run (``[from:to:when]``, ``[a|b]``).
   `PromptConditioning.at(step, steps)` picks the text of a step; each distinct text is
   encoded once and cached, so a prompt is re-encoded only where its text changes.
3. ``parse_attention`` gives (text, weight) runs and BREAK markers. Tokens are packed into
   chunks of 75 (A1111: a full chunk moves the words after its last comma, if that comma is
   within the last 20 tokens, into the next chunk; BREAK and an embedding that does not fit
   start a new chunk); each chunk is wrapped in BOS/EOS, padded to 77 and encoded, and the
   chunks are concatenated. Textual-inversion vectors are put in place of their name's tokens
   while encoding (a hook on the token embedding, removed right after: the model is not
   changed).
4. Emphasis: each position's hidden state is multiplied by its weight, then the chunk is
   rescaled so its mean equals the mean before weighting (A1111). All-1.0 chunks are left
   exactly as encoded.
5. The positive and negative conditioning of a step are padded to the same number of
   chunks with encoded empty chunks.

Each family says which hidden state of each of its text encoders is used
(`TextEncoderSpec.layer`): SD 1.x the last one or A1111's clip skip; SD 2.x always the
penultimate one with the final norm; SDXL always the penultimate one without it, both
encoders' states concatenated (768 + 1280 = 2048 for the real ones). An encoder marked
`pooled` (SDXL's bigG) also gives its projected pooled output of the first chunk, which
conditions the U-Net with the size ids (see `runner.added_conditioning`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from pipelines.core import extra_networks, prompt_parser

CHUNK = 75  # tokens per chunk, plus BOS and EOS
COMMA_BACKTRACK = 20  # A1111's "comma padding backtrack" default


def tokenize_chunks(tokenizer, text: str) -> list[list[int]]:
    """Plain text (no prompt syntax) in chunks of at most 75 token ids."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
    return chunks or [[]]


def chunk_ids(tokenizer, chunk: list[int]) -> list[int]:
    """One chunk as the text encoder takes it: BOS, the tokens, EOS, padded to 77."""
    ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CHUNK + 2 - len(ids))


@dataclass
class Conditioning:
    cond: torch.Tensor  # [1, 77 * chunks, dim]
    uncond: torch.Tensor
    pooled_cond: torch.Tensor | None = None  # [1, projection dim] (SDXL)
    pooled_uncond: torch.Tensor | None = None


# --- 3. tokens in weighted chunks --------------------------------------------------------------

@dataclass
class Chunk:
    """Up to 75 tokens, their weights, and textual-inversion vectors at some positions."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # position in chunk -> [dim]


class _Matcher:
    """Finds embedding names in a token stream (longest name first, as A1111)."""

    def __init__(self, tokenizer, embeddings, encoder_index: int):
        self.by_first: dict[int, list[tuple[tuple[int, ...], object]]] = {}
        for emb in embeddings or ():
            ids = tuple(tokenizer(emb.name, add_special_tokens=False).input_ids)
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, emb))
        for entries in self.by_first.values():
            entries.sort(key=lambda e: -len(e[0]))
        self.encoder_index = encoder_index
        self.used: list[object] = []

    def match(self, tokens: list[int], i: int):
        for ids, emb in self.by_first.get(tokens[i], ()):
            if tuple(tokens[i : i + len(ids)]) == ids:
                return ids, emb
        return None


def weighted_chunks(tokenizer, text: str, embeddings=(), encoder_index: int = 0) -> tuple[list[Chunk], list]:
    """A1111's chunking of one scheduled text: (chunks, embeddings used)."""
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    matcher = _Matcher(tokenizer, embeddings, encoder_index)
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for segment_text, weight in prompt_parser.parse_attention(text):
        if prompt_parser.is_break((segment_text, weight)):
            next_chunk()
            continue
        tokens = tokenizer(segment_text, add_special_tokens=False, truncation=False).input_ids
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (len(chunk.tokens) == CHUNK and last_comma != -1
                  and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:],
                              {p - cut: v for p, v in chunk.vectors.items() if p >= cut})
                chunk = Chunk(chunk.tokens[:cut], chunk.weights[:cut],
                              {p: v for p, v in chunk.vectors.items() if p < cut})
                next_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                next_chunk()
            found = matcher.match(tokens, i) if matcher.by_first else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                i += 1
                continue
            ids, emb = found
            vectors = emb.vectors(encoder_index)
            if vectors is None:  # not made for this encoder: the name stays plain words
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                i += 1
                continue
            vectors = vectors[:CHUNK]
            if len(chunk.tokens) + len(vectors) > CHUNK:
                next_chunk()
            for v in vectors:
                chunk.vectors[len(chunk.tokens)] = v
                chunk.tokens.append(ids[0])  # a placeholder id; its embedding row is replaced
                chunk.weights.append(weight)
            if emb not in matcher.used:
                matcher.used.append(emb)
            i += len(ids)
    if chunk.tokens or not chunks:
        next_chunk()
    return chunks, matcher.used


# --- encoding ------------------------------------------------------------------------------------

def _final_norm(text_encoder):
    body = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it, 5 does not
    return body.final_layer_norm


def token_embedding(text_encoder):
    """The text encoder's token-embedding layer (where textual-inversion vectors go)."""
    body = getattr(text_encoder, "text_model", text_encoder)
    return body.embeddings.token_embedding


@contextlib.contextmanager
def _injected(text_encoder, chunks: list[Chunk]):
    """Replace token-embedding rows by textual-inversion vectors for one forward call."""
    places = [(row, pos, vec) for row, c in enumerate(chunks) for pos, vec in c.vectors.items()]
    if not places:
        yield
        return
    offset = 1  # BOS

    def hook(module, args, output):
        output = output.clone()
        for row, pos, vec in places:
            output[row, pos + offset] = vec.to(device=output.device, dtype=output.dtype)
        return output

    handle = token_embedding(text_encoder).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _skip(layer: str, clip_skip: int, text_encoder) -> int:
    skip = clip_skip if layer == "user" else 2  # the family may fix the penultimate layer
    return max(1, min(skip, text_encoder.config.num_hidden_layers))


@torch.no_grad()
def encode_chunks(text_encoder, tokenizer, chunks: list, clip_skip: int, device,
                  layer: str = "user", pooled: bool = False):
    """Hidden states [1, 77 * chunks, dim] (and, if `pooled`, the first chunk's pooled output).

    `chunks` are lists of token ids or `Chunk`s (whose vectors are injected and whose
    weights are applied, A1111's emphasis)."""
    chunks = [c if isinstance(c, Chunk) else Chunk(list(c), [1.0] * len(c)) for c in chunks]
    ids = torch.tensor([chunk_ids(tokenizer, c.tokens) for c in chunks], device=device)
    skip = _skip(layer, clip_skip, text_encoder)
    with _injected(text_encoder, chunks):
        out = text_encoder(ids, output_hidden_states=skip > 1)
    if skip > 1:
        # A1111's "clip skip": the hidden state skip-1 layers before the last ...
        hidden = out.hidden_states[-skip]
        if layer != "penultimate_raw":
            hidden = _final_norm(text_encoder)(hidden)  # ... then the final norm (not for SDXL)
    else:
        hidden = out.last_hidden_state
    hidden = _emphasis(hidden, chunks)
    hidden = hidden.reshape(1, -1, hidden.shape[-1])
    if not pooled:
        return hidden
    return hidden, out.text_embeds[:1]


def _emphasis(hidden: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
    """Each chunk emphasized by its tokens' weights (BOS, EOS and padding at 1)."""
    if all(w == 1.0 for c in chunks for w in c.weights):
        return hidden
    return torch.stack([emphasize(row, [1.0, *c.weights, 1.0] + [1.0] * (CHUNK - len(c.weights)))
                        for row, c in zip(hidden, chunks)])


def emphasize(row: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's emphasis of one sequence [positions, dim]: each position's hidden state multiplied
    by its weight, then the whole rescaled so its mean equals the mean before weighting."""
    w = torch.tensor(weights, dtype=row.dtype, device=row.device)[:, None]
    if bool((w == 1.0).all()):
        return row
    original_mean = row.float().mean()
    weighted = row * w
    return weighted * (original_mean / weighted.float().mean()).to(row.dtype)


@dataclass
class Encoded:
    """One text through every encoder of a family."""

    hidden: torch.Tensor  # [1, 77 * chunks, total dim]
    pooled: torch.Tensor | None
    chunks: int
    embeddings: list = field(default_factory=list)  # textual inversions that occurred


def encode_text(components, text: str, clip_skip: int, device, embeddings=()) -> Encoded:
    """One scheduled text (emphasis and BREAK syntax, no editing) -> hidden states."""
    specs = components.spec.family.text_encoders
    per_encoder = []
    used: list = []
    for index, (spec, tokenizer) in enumerate(zip(specs, components.tokenizers)):
        chunks, found = weighted_chunks(tokenizer, text, embeddings, index)
        per_encoder.append(chunks)
        used += [e for e in found if e not in used]
    n = max(len(c) for c in per_encoder)  # the BPE is shared, but be safe
    parts, pooled = [], None
    for spec, encoder, tokenizer, chunks in zip(specs, components.text_encoders, components.tokenizers, per_encoder):
        chunks = chunks + [Chunk() for _ in range(n - len(chunks))]
        out = encode_chunks(encoder, tokenizer, chunks, clip_skip, device, spec.layer, spec.pooled)
        if spec.pooled:
            out, pooled = out
        parts.append(out)
    return Encoded(hidden=torch.cat(parts, dim=-1), pooled=pooled, chunks=n, embeddings=used)


def positive_text(prompt: str) -> str:
    """The positive prompt without extra-network tags, AND sub-prompts joined."""
    text, _ = extra_networks.extract_extra_networks(prompt)
    parts = prompt_parser.split_and(text)
    if len(parts) > 1:
        text = " ".join(part for part, _ in parts)
    return text


class PromptConditioning:
    """The conditioning of a prompt pair over a run: `at(step, steps)` gives a step's
    `Conditioning`. Distinct texts are encoded once (lazily); the same (positive,
    negative) text pair gives the same `Conditioning` object, so a sampler can rebuild
    its inputs only when the object changes.

    `cond`, `uncond`, `pooled_cond`, `pooled_uncond` are those of the first step."""

    def __init__(self, components, prompt: str, negative_prompt: str, clip_skip: int, device,
                 steps: int = 1, embeddings=()):
        self.components, self.clip_skip, self.device = components, clip_skip, device
        self.prompt = positive_text(prompt)
        self.negative_prompt = negative_prompt  # A1111 keeps tags in it as plain words
        self.steps = max(1, int(steps))
        self.embeddings = list(embeddings or ())
        self._mark_used = getattr(embeddings, "mark_used", None)  # an embeddings.EmbeddingSet
        self.used_embeddings: list = []
        self._texts: dict[str, Encoded] = {}
        self._pairs: dict[tuple[str, str], Conditioning] = {}
        self._schedules: dict[int, tuple[list, list]] = {}
        self._empty: Encoded | None = None

    def schedules(self, steps: int) -> tuple[list, list]:
        if steps not in self._schedules:
            self._schedules[steps] = (prompt_parser.prompt_schedule(self.prompt, steps),
                                      prompt_parser.prompt_schedule(self.negative_prompt, steps))
        return self._schedules[steps]

    def texts_at(self, step_index: int, steps: int | None = None) -> tuple[str, str]:
        pos, neg = self.schedules(max(1, int(steps or self.steps)))
        return prompt_parser.text_at_step(pos, step_index), prompt_parser.text_at_step(neg, step_index)

    def _encode(self, text: str) -> Encoded:
        if text not in self._texts:
            encoded = encode_text(self.components, text, self.clip_skip, self.device, self.embeddings)
            self._texts[text] = encoded
            for e in encoded.embeddings:
                if e not in self.used_embeddings:
                    self.used_embeddings.append(e)
                if self._mark_used is not None:
                    self._mark_used(e)
        return self._texts[text]

    def _padded(self, encoded: Encoded, chunks: int) -> torch.Tensor:
        if encoded.chunks >= chunks:
            return encoded.hidden
        if self._empty is None:
            self._empty = self._encode("")
        pad = self._empty.hidden[:, : CHUNK + 2].repeat(1, chunks - encoded.chunks, 1)
        return torch.cat([encoded.hidden, pad], dim=1)

    def at(self, step_index: int, steps: int | None = None) -> Conditioning:
        key = self.texts_at(step_index, steps)
        if key not in self._pairs:
            pos, neg = self._encode(key[0]), self._encode(key[1])
            n = max(pos.chunks, neg.chunks)
            cond, uncond = self._padded(pos, n), self._padded(neg, n)
            pooled_cond, pooled_uncond = pos.pooled, neg.pooled
            if self.components.spec.family.zero_empty_negative and not key[1].strip():
                # SDXL: an empty negative prompt means zero conditioning (A1111 and diffusers agree)
                uncond = torch.zeros_like(uncond)
                if pooled_uncond is not None:
                    pooled_uncond = torch.zeros_like(pooled_uncond)
            self._pairs[key] = Conditioning(cond=cond, uncond=uncond, pooled_cond=pooled_cond,
                                            pooled_uncond=pooled_uncond)
        return self._pairs[key]

    @property
    def cond(self) -> torch.Tensor:
        return self.at(0).cond

    @property
    def uncond(self) -> torch.Tensor:
        return self.at(0).uncond

    @property
    def pooled_cond(self):
        return self.at(0).pooled_cond

    @property
    def pooled_uncond(self):
        return self.at(0).pooled_uncond


def encode_prompts(components, prompt: str, negative_prompt: str, clip_skip: int, device,
                   steps: int = 1, embeddings=()) -> PromptConditioning:
    """The conditioning of a prompt pair in A1111's prompt language (see the module doc)."""
    return PromptConditioning(components, prompt, negative_prompt, clip_skip, device, steps, embeddings)
