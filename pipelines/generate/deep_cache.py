"""DeepCache: reuse the U-Net's deep features across steps (Ma, Fang, Wang 2023, arXiv 2312.00858).

Neighbouring steps change the U-Net's deep, low-resolution features (the "what") very little;
the shallow, full-resolution layers (the "where") follow the latents closely. So on one step in
`interval` (a "full" step) the whole U-Net runs and every module of its deep part keeps its
output; on the steps in between only the shallow part runs -- the time embedding, `conv_in`,
the first `branch` layers of the first down block, the last `branch + 1` layers of the last up
block and `conv_out` -- and each deep module hands back what it returned on the last full step.
The first live up layer therefore sees the cached deep features joined with fresh skip
features, which is DeepCache's skip branch; `branch` 0 is the paper's cheapest (shallowest) one.

The first `start` share of the steps always runs in full (they settle the composition and the
colours; A1111's DeepCache extension has the same setting), then every `interval`-th step does.
On the shipped demo model at 20 steps (bench/deep_cache.py), caching from step 0 at interval 5
gets 60% of the held-out objects' colours right (uncached: all); with the first 4 steps in full,
interval 4 gets them all, with 1.98x less U-Net time.

`applied(unet, settings)` patches the deep modules' `forward` on this U-Net instance for one
block (a job or a pass) and puts every module back when it ends, also after an error or an
interrupt: the cached model is unchanged afterwards. It yields a `DeepCache` whose `step(i, steps)`
the denoising loop calls before the U-Net call of step i. A call whose input does not fit the cache
(CFG cutoff halves the batch, another size, a new text conditioning) runs in full and refreshes it.

Why our own and not a library: the `deepcache` package (0.1.1, 2023) patches a whole diffusers
pipeline object and counts its calls, and diffusers' cache hooks (FirstBlockCache, FasterCache,
PAB, MagCache, TaylorSeer) register transformer blocks of DiT models only, not UNet2DConditionModel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

INTERVAL_OFF = 1  # every step runs the whole U-Net (the request's LIMITS bound the interval)
DEFAULT_START = 0.2  # share of the steps that always run in full; the demo model's best (see above)


@dataclass(frozen=True)
class DeepCacheSettings:
    """How often the whole U-Net runs (`interval`: 1 = every step, i.e. off), how many layers
    besides the outermost stay live on the steps in between (`branch`: 0 = the fewest, fastest;
    larger is closer to the uncached image and slower; capped at what the U-Net has), and the
    share of the first steps that run in full before caching starts (`start`, 0..1)."""

    interval: int = INTERVAL_OFF
    branch: int = 0
    start: float = DEFAULT_START

    @classmethod
    def of(cls, request) -> DeepCacheSettings:
        """A request's `deepcache_interval`, `deepcache_branch` and `deepcache_start` (off where it has none)."""
        return cls(getattr(request, "deepcache_interval", INTERVAL_OFF), getattr(request, "deepcache_branch", 0),
                   getattr(request, "deepcache_start", DEFAULT_START))

    @property
    def active(self) -> bool:
        return self.interval > INTERVAL_OFF

    def first_cached(self, steps: int) -> int:
        """The first step that may reuse the cache: the steps before it are the `start` share."""
        return math.ceil(round(self.start * steps, 6))

    def full_step(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` runs the whole U-Net: every step of the `start`
        share, then the first after it and every `interval`-th from there."""
        first = self.first_cached(steps)
        return not self.active or step < first or (step - first) % self.interval == 0


OFF = DeepCacheSettings()


def max_branch(unet) -> int:
    """The deepest branch `unet` offers: every layer of its last up block live."""
    first_down, last_up = unet.down_blocks[0], unet.up_blocks[-1]
    return max(0, min(len(last_up.resnets) - 1, len(first_down.resnets)))


def _layers(block) -> list[list[torch.nn.Module]]:
    """A block's layers in order: each resnet with its attention, if the block has attention."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    return [[m for m in (resnet, attention) if m is not None] for resnet, attention in zip(block.resnets, attentions)]


def deep_modules(unet, branch: int) -> list[torch.nn.Module]:
    """The modules of `unet` whose outputs a cached step replays: all of it but the first `branch`
    layers of the first down block and the last `branch + 1` layers of the last up block (the skip
    connections those up layers read are `conv_in`'s output and those down layers' outputs)."""
    branch = min(max(branch, 0), max_branch(unet))
    first_down, last_up = unet.down_blocks[0], unet.up_blocks[-1]
    deep = [m for layer in _layers(first_down)[branch:] for m in layer]
    deep += list(first_down.downsamplers or [])
    deep += list(unet.down_blocks[1:])
    deep += [unet.mid_block] if unet.mid_block is not None else []
    deep += list(unet.up_blocks[:-1])
    up_layers = _layers(last_up)
    deep += [m for layer in up_layers[: len(up_layers) - branch - 1] for m in layer]
    return deep


def input_key(args: tuple, kwargs: dict) -> tuple[tuple, Any]:
    """What must match for cached features to fit a U-Net call: the latents' shape and dtype, and
    the very text-conditioning tensor (the runner makes a new one when prompt editing switches
    the text, and deep features of the old text would carry it on). Returns the key and that tensor."""
    sample = kwargs["sample"] if "sample" in kwargs else args[0]
    context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
    return (tuple(sample.shape), sample.dtype, id(context)), context


class DeepCache:
    """The cache of one job on one U-Net: which step the loop is at, and each deep module's last output."""

    def __init__(self, settings: DeepCacheSettings):
        self.settings = settings
        self.index = 0
        self.steps = 1
        self.replaying = False
        self.full_steps = 0
        self.cached_steps = 0
        self._outputs: dict[int, Any] = {}
        self._key: tuple | None = None
        self._context = None  # held so that its id in the key cannot be reused by another tensor

    def step(self, index: int, steps: int) -> None:
        """The denoising loop is at step `index` (0-based) of `steps`; call it before that step's U-Net call."""
        self.index, self.steps = index, steps

    def before_unet(self, key: tuple, context) -> None:
        """Decide, as the U-Net starts, whether this call replays the deep features."""
        fits = key == self._key and bool(self._outputs)
        self.replaying = fits and not self.settings.full_step(self.index, self.steps)
        if self.replaying:
            self.cached_steps += 1
        else:
            self._key, self._context, self.full_steps = key, context, self.full_steps + 1
            self._outputs.clear()

    def wrap(self, module: torch.nn.Module):
        """`module`'s forward, recording its output on full calls and replaying it on cached ones."""
        forward, slot = module.forward, id(module)

        def cached_forward(*args, **kwargs):
            if self.replaying and slot in self._outputs:
                return self._outputs[slot]
            output = forward(*args, **kwargs)
            self._outputs[slot] = output
            return output

        return cached_forward

    def clear(self) -> None:
        self._outputs.clear()
        self._key = self._context = None


def unused_notes(request, flow: bool = False) -> list[str]:
    """Where a request's DeepCache does not act, for `result.warnings`: SD 3 / Flux transformers."""
    if flow and DeepCacheSettings.of(request).active:
        return ["DeepCache is for U-Net checkpoints (SD 1.x/2.x/SDXL): not applied to this SD 3 / Flux model"]
    return []


@contextlib.contextmanager
def applied(unet, settings: DeepCacheSettings = OFF) -> Iterator[DeepCache | None]:
    """DeepCache on `unet` for the block; yields the `DeepCache` the loop advances with `step(i)`,
    or None when `settings` is off or `unet` is not a diffusers U-Net with down/mid/up blocks
    (then nothing is patched and every step runs in full)."""
    if not settings.active or not all(hasattr(unet, name) for name in ("down_blocks", "up_blocks", "mid_block")):
        yield None
        return
    cache = DeepCache(settings)
    modules = deep_modules(unet, settings.branch)
    own_forwards = [(module, module.__dict__.get("forward")) for module in modules]  # e.g. an offload hook's
    hook = unet.register_forward_pre_hook(lambda _, args, kwargs: cache.before_unet(*input_key(args, kwargs)),
                                          with_kwargs=True)
    try:
        for module in modules:
            module.forward = cache.wrap(module)
        yield cache
    finally:
        hook.remove()
        for module, own in own_forwards:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        cache.clear()
