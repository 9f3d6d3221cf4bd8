"""Regional prompts as masked cross-attention, for one job.

Every cross-attention layer of the U-Net attends to the base prompt as usual; for the
conditional rows of the batch it also attends to each region's prompt, and each latent pixel
takes a blend of those outputs: region r's by its coverage there times its weight, the base's
the rest. Coverage is the region's share of the pixel, averaged down to each attention layer's
resolution, so borders blend over a cell at the coarse layers. The unconditional rows (the
negative prompt) stay global, so CFG pushes every region away from the same negative prompt.
Blend weights sum to 1, so a layer's output bias and any residual are kept as they are.

`encode_layout` gives a `RegionalConditioning`: the runner's conditioning (`at(step, steps)`,
the base prompt's, whose pooled embedding SDXL uses), which also knows each region's prompt
encoding at the step the runner asked for last (prompt editing works per region).
`applied(unet, conditioning, images)` installs the attention processors on the U-Net's
cross-attention layers for a block and puts the U-Net's own back when it ends, also after an
error or an interrupt: the cached model is unchanged afterwards. It does nothing for a plain
`PromptConditioning`, so callers need no `if`. `unused_notes` and `tiles_note` say where a layout
does not act (the refiner's steps, SD 3, SD upscale's tiles), for the result's warnings.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.core.regions import Layout, layout_of
from pipelines.generate.prompts import Conditioning, PromptConditioning, encode_prompts


class RegionalConditioning:
    """The base prompt's conditioning plus each region's prompt; see the module doc."""

    def __init__(self, base: PromptConditioning, regions: Sequence[PromptConditioning], layout: Layout):
        self.base, self.regions, self.layout = base, list(regions), layout
        self.step = (0, None)

    def at(self, step_index: int, steps: int | None = None) -> Conditioning:
        self.step = (step_index, steps)
        return self.base.at(step_index, steps)

    def region_contexts(self) -> list[torch.Tensor]:
        """Each region's text encoding [1, tokens, dim] at the step asked for last."""
        return [region.at(*self.step).cond for region in self.regions]

    @property
    def used_embeddings(self) -> list:
        used = list(self.base.used_embeddings)
        for region in self.regions:
            used += [e for e in region.used_embeddings if e not in used]
        return used

    def __getattr__(self, name: str):  # cond, uncond, pooled_*, texts_at ...: the base prompt's
        if name in ("base", "regions", "layout", "step"):
            raise AttributeError(name)
        return getattr(self.base, name)


def encode_layout(components, layout: Layout, negative_prompt: str, clip_skip: int, device, steps: int = 1,
                  embeddings=()) -> RegionalConditioning:
    """The conditioning of a layout: the base prompt against the negative prompt (CFG's pair),
    and each region's prompt (its positive side only)."""
    base = encode_prompts(components, layout.base_prompt, negative_prompt, clip_skip, device, steps=steps,
                          embeddings=embeddings)
    regions = [encode_prompts(components, region.prompt, "", clip_skip, device, steps=steps, embeddings=embeddings)
               for region in layout.regions]
    return RegionalConditioning(base, regions, layout)


def encode_conditioning(components, layout: Layout | None, prompt: str, negative_prompt: str, clip_skip: int,
                        device, steps: int = 1, embeddings=()) -> PromptConditioning | RegionalConditioning:
    """`encode_prompts(prompt, ...)` without a layout, `encode_layout` with one (whose base
    prompt then replaces `prompt`): what the runner and hires fix condition a pass on."""
    if layout is None:
        return encode_prompts(components, prompt, negative_prompt, clip_skip, device, steps=steps,
                              embeddings=embeddings)
    return encode_layout(components, layout, negative_prompt, clip_skip, device, steps, embeddings)


def unused_notes(request, flow: bool = False) -> list[str]:
    """Where a request's layout (its `regions` or the prompt's ADDCOL / ADDROW) does not act, for
    `result.warnings`: the refiner's steps (it runs on the base prompt over the whole picture) and
    `flow` models (SD 3: its transformer has no per-region attention here yet)."""
    layout = layout_of(request)
    if layout is None:
        return []
    if flow:
        return ["Regional prompts are not available for SD 3 checkpoints yet: the layout was not applied "
                "(regions left out, the prompt used as written)"]
    if request.refiner_checkpoint and request.refiner_switch_at < 1:
        return [f"Regional prompts act until the refiner takes over (Switch at {request.refiner_switch_at:g}); "
                f"the refiner's steps follow the base prompt over the whole picture"]
    return []


def tiles_note(request) -> str | None:
    """SD upscale's note for a request with a layout: its tiles are crops, which the regions do not fit."""
    if layout_of(request) is None:
        return None
    return "SD upscale: regional prompts do not fit its tiles (parts of the picture); each tile used the base prompt"


# --- where each region acts ------------------------------------------------------------------------

def latent_coverage(layout: Layout, latent_h: int, latent_w: int) -> torch.Tensor:
    """[regions, h, w] shares of each latent pixel that each region covers (0..1)."""
    maps = [np.asarray(region.coverage(latent_w * 8, latent_h * 8), dtype=np.float32) / 255.0
            for region in layout.regions]
    pixels = torch.from_numpy(np.stack(maps))[:, None]
    return F.adaptive_avg_pool2d(pixels, (latent_h, latent_w))[:, 0]  # each latent pixel: its 8x8 pixels' mean


def blend_weights(coverage: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """[regions + 1, h, w]: the base's share first, then each region's. A region's share is its
    coverage times its weight; where regions overlap past 1 they are scaled to sum to 1."""
    shares = coverage * torch.tensor(list(weights), dtype=coverage.dtype)[:, None, None]
    total = shares.sum(0, keepdim=True)
    shares = shares / total.clamp(min=1.0)
    return torch.cat([1.0 - shares.sum(0, keepdim=True), shares])


def layer_grid(latent_h: int, latent_w: int, tokens: int) -> tuple[int, int]:
    """The (h, w) of an attention layer with `tokens` pixels: the latent halved (rounding up,
    as the U-Net's stride-2 convolutions do) until it fits."""
    h, w = latent_h, latent_w
    while h * w > tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"a cross-attention layer of {tokens} pixels does not fit a {latent_h}x{latent_w} latent")
    return h, w


class _Mixer:
    """The job's state the processors share: the conditioning, the images per batch, the latent
    size of the U-Net call under way, and the blend weights per layer resolution."""

    def __init__(self, conditioning: RegionalConditioning, images: int):
        self.conditioning, self.images = conditioning, images
        self.latent_size: tuple[int, int] | None = None
        self._weights: dict[tuple[int, int, int], torch.Tensor] = {}
        self._contexts: tuple | None = None

    def weights(self, tokens: int) -> torch.Tensor:
        """[regions + 1, tokens] blend weights at the layer with `tokens` pixels."""
        latent_h, latent_w = self.latent_size
        key = (latent_h, latent_w, tokens)
        if key not in self._weights:
            full = blend_weights(latent_coverage(self.conditioning.layout, latent_h, latent_w),
                                 [r.weight for r in self.conditioning.layout.regions])
            h, w = layer_grid(latent_h, latent_w, tokens)
            small = F.adaptive_avg_pool2d(full[None], (h, w))[0]
            self._weights[key] = small.reshape(small.shape[0], -1)
        return self._weights[key]

    def contexts(self) -> list[torch.Tensor]:
        step = self.conditioning.step
        if self._contexts is None or self._contexts[0] != step:
            self._contexts = (step, self.conditioning.region_contexts())
        return self._contexts[1]

    def conditional_rows(self, batch: int) -> slice:
        """The rows of a U-Net batch that carry the prompt: the second half under CFG
        ([negative..., prompt...]), all of them without it."""
        if batch == 2 * self.images:
            return slice(self.images, batch)
        if batch == self.images:
            return slice(0, batch)
        raise RuntimeError(f"regional prompts: a U-Net batch of {batch} rows for {self.images} images")


class RegionalAttentionProcessor:
    """Wraps a cross-attention layer's own processor: the base output, blended per pixel with
    the outputs for each region's prompt on the conditional rows."""

    def __init__(self, inner, mixer: _Mixer):
        self.inner, self.mixer = inner, mixer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if encoder_hidden_states is None or hidden_states.ndim != 3 or self.mixer.latent_size is None:
            return out
        rows = self.mixer.conditional_rows(hidden_states.shape[0])
        weights = self.mixer.weights(hidden_states.shape[1]).to(device=out.device, dtype=out.dtype)
        own = hidden_states[rows]
        mixed = out[rows] * weights[0][None, :, None]
        for context, weight in zip(self.mixer.contexts(), weights[1:]):
            context = context.to(device=own.device, dtype=encoder_hidden_states.dtype).expand(own.shape[0], -1, -1)
            mixed = mixed + self.inner(attn, own, context, None, **kwargs) * weight[None, :, None]
        out = out.clone()
        out[rows] = mixed
        return out


def cross_attention_layers(unet) -> list:
    """The U-Net's attention modules that attend to the text (diffusers' `attn2`)."""
    return [module for module in unet.modules()
            if hasattr(module, "set_processor") and getattr(module, "is_cross_attention", False)]


@contextlib.contextmanager
def applied(unet, conditioning, images: int) -> Iterator[int]:
    """Regional cross-attention on `unet` for the block when `conditioning` is a
    `RegionalConditioning`; yields how many layers were wrapped (0 otherwise). `images`: images
    per batch (the U-Net sees twice as many rows under CFG)."""
    if not isinstance(conditioning, RegionalConditioning):
        yield 0
        return
    mixer = _Mixer(conditioning, images)
    layers = cross_attention_layers(unet)
    saved = [(layer, layer.processor) for layer in layers]

    def note_latent_size(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        mixer.latent_size = tuple(sample.shape[-2:])

    hook = unet.register_forward_pre_hook(note_latent_size, with_kwargs=True)
    try:
        for layer, processor in saved:
            layer.set_processor(RegionalAttentionProcessor(processor, mixer))
        yield len(layers)
    finally:
        hook.remove()
        for layer, processor in saved:
            layer.set_processor(processor)
