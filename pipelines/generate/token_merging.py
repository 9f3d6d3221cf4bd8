"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023): A1111's "Token merging ratio".

At the U-Net's highest resolution, self-attention is the costliest layer (a 512x512 image: 4096
tokens, a third of a CPU step). With a ratio r, each self-attention there runs on (1 - r) of its
tokens: the image is cut into 2x2 cells, one token per cell is a destination (a random one, from
the job's seed, so the same seed gives the same image), and the r * N other tokens most similar
(cosine) to a destination are averaged into it; after the attention every merged token takes its
destination's output back. Cross-attention and the feed-forward see every token (ToMe's defaults,
and A1111's). The image changes a little; it is opt-in, recorded as "Token merging ratio" in the
infotext as A1111 writes it.

`applied(unet, ratio, seed)` hooks the self-attention layers of one U-Net for a block (a job's
sampling loop); without a ratio, or on a model with no such layers (SD 3, Flux), nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

CELL = 2  # destinations: one per CELL x CELL tokens


@dataclass
class Merge:
    """One layer call's merge: tokens (B, N, C) -> (B, N - r, C), and back."""

    merge: Callable[[torch.Tensor], torch.Tensor]
    unmerge: Callable[[torch.Tensor], torch.Tensor]


def destinations(height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """A (height * width) bool mask of the destination tokens: one per CELL x CELL cell, at a random
    place in it (the first place without a generator); tokens past the last whole cell stay sources."""
    rows, cols = height // CELL, width // CELL
    picks = torch.randint(CELL * CELL, (rows, cols, 1), generator=generator) if generator is not None \
        else torch.zeros(rows, cols, 1, dtype=torch.long)
    cells = torch.zeros(rows, cols, CELL * CELL, dtype=torch.bool).scatter_(2, picks, True)
    grid = torch.zeros(height, width, dtype=torch.bool)
    grid[:rows * CELL, :cols * CELL] = cells.view(rows, cols, CELL, CELL).transpose(1, 2).reshape(rows * CELL,
                                                                                                  cols * CELL)
    return grid.flatten()


def bipartite_merge(tokens: torch.Tensor, is_destination: torch.Tensor, ratio: float) -> Merge:
    """ToMe's bipartite soft matching for `tokens` (B, N, C): the `ratio` * N sources closest to a
    destination (cosine similarity) are averaged into it."""
    batch, count, channels = tokens.shape
    device = tokens.device
    dst_idx = is_destination.nonzero().squeeze(1).to(device)
    src_idx = (~is_destination).nonzero().squeeze(1).to(device)
    merged = min(int(count * ratio), len(src_idx))
    with torch.no_grad():
        metric = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # (B, sources, destinations)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
    moved, kept = order[:, :merged], order[:, merged:]  # sources merged away / kept as they are
    moved_to = best_dst.gather(1, moved)  # each moved source's destination (index among destinations)

    def expand(index: torch.Tensor) -> torch.Tensor:
        return index.unsqueeze(-1).expand(-1, -1, channels)

    def merge(x: torch.Tensor) -> torch.Tensor:
        sources, dests = x[:, src_idx], x[:, dst_idx]
        dests = dests.scatter_reduce(1, expand(moved_to), sources.gather(1, expand(moved)), reduce="mean")
        return torch.cat([sources.gather(1, expand(kept)), dests], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        kept_out, dests = x[:, :kept.shape[1]], x[:, kept.shape[1]:]
        out = x.new_empty(batch, count, channels)
        out[:, dst_idx] = dests
        out.scatter_(1, expand(src_idx[kept]), kept_out)
        out.scatter_(1, expand(src_idx[moved]), dests.gather(1, expand(moved_to)))
        return out

    return Merge(merge, unmerge)


def self_attentions(unet) -> list:
    """The self-attention layers of `unet`'s transformer blocks (diffusers' BasicTransformerBlock.attn1)."""
    return [module.attn1 for module in unet.modules()
            if type(module).__name__ == "BasicTransformerBlock" and getattr(module, "attn1", None) is not None
            and not getattr(module, "only_cross_attention", False)]


def unused_notes(request, flow: bool = False) -> list[str]:
    """Where a request's token merging does not act, for `result.warnings`: SD 3 / Flux transformers."""
    if flow and getattr(request, "token_merging_ratio", 0) > 0:
        return ["Token merging is for U-Net checkpoints (SD 1.x/2.x/SDXL): not applied to this SD 3 / Flux model"]
    return []


@contextlib.contextmanager
def applied(unet, ratio: float, seed: int = 0) -> Iterator[bool]:
    """Token merging at `ratio` on `unet`'s full-resolution self-attention for the block; yields
    whether it is on (False: no ratio, or no such layers in this model)."""
    layers = self_attentions(unet) if ratio > 0 and unet is not None else []
    if not layers:
        yield False
        return
    generator = torch.Generator().manual_seed(int(seed))
    size: dict[str, tuple[int, int]] = {}
    pending: dict[int, Merge] = {}

    def note_size(_, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        size["latent"] = tuple(sample.shape[-2:])

    def before(layer, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        height, width = size.get("latent", (0, 0))
        if hidden is None or hidden.dim() != 3 or hidden.shape[1] != height * width:  # a lower resolution
            return None
        merge = bipartite_merge(hidden, destinations(height, width, generator), ratio)
        pending[id(layer)] = merge
        merged = merge.merge(hidden)
        return ((merged, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": merged})

    def after(layer, args, kwargs, output):
        merge = pending.pop(id(layer), None)
        return output if merge is None else merge.unmerge(output)

    hooks = [unet.register_forward_pre_hook(note_size, with_kwargs=True)]
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(layer.register_forward_hook(after, with_kwargs=True))
    try:
        yield True
    finally:
        for hook in hooks:
            hook.remove()
        pending.clear()
