"""ControlNet and T2I-Adapter in the denoising loop: each unit's residuals, added to the U-Net's.

A unit's map (its preprocessed image, `LoadedControl.image`) is fed to the control model as
diffusers' pipelines do: RGB scaled to [0, 1], one copy per image of the batch. sd-webui-controlnet's
control modes, in diffusers' terms:
- Balanced: the unit acts on both halves of the CFG batch, with its weight on every layer;
- My prompt is more important: diffusers' guess-mode scales (the residuals fade from 1 at the
  deepest layer to 0.1 at the shallowest), on both halves;
- ControlNet is more important: those scales on the prompt's half only; the unconditional half
  gets none, so CFG pushes towards the control.
A unit acts on step i of n unless i/n < guidance_start or (i+1)/n > guidance_end (diffusers' rule:
an end of 0 or a weight of 0 leaves the U-Net exactly as without the unit). Several units add up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from pipelines.core.control import CONTROL_MODES, ControlUnit
from pipelines.generate.control_preprocess import inpaint_control_tensor

PROMPT_FIRST, CONTROL_FIRST = CONTROL_MODES[1], CONTROL_MODES[2]


@dataclass(frozen=True)
class LoadedControl:
    """A unit ready to run: its control model and its map at the job's first-pass size."""

    unit: ControlUnit
    model: Any  # diffusers ControlNetModel or T2IAdapter
    image: Image.Image  # the preprocessed map (RGB)
    mask: Image.Image | None = None  # inpaint ControlNet: white = repaint; those pixels become -1

    @property
    def is_adapter(self) -> bool:
        return not hasattr(self.model, "controlnet_cond_embedding")  # a T2I-Adapter has no hint encoder


def acts_at(unit: ControlUnit, step: int, steps: int) -> bool:
    """Whether `unit` acts on step `step` (0-based) of `steps` (diffusers' controlnet_keep rule)."""
    return unit.weight > 0 and not (step / steps < unit.guidance_start or (step + 1) / steps > unit.guidance_end)


def map_tensor(image: Image.Image, mask: Image.Image | None, width: int, height: int) -> torch.Tensor:
    """The map as the control model reads it: (1, 3, height, width) in [0, 1]; masked pixels -1.
    A map of another size (hires fix's second pass) is resized to this pass's."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    if mask is not None:
        return torch.from_numpy(inpaint_control_tensor(image, mask.convert("L").resize((width, height), Image.NEAREST)))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


class ControlSteps:
    """The units of one batch at one pass's size, giving each U-Net call its residuals.

    `batch`: images per batch; `use_cfg`: the U-Net's batch is [uncond x batch, cond x batch] (a step
    that skips the unconditional pass, `residuals(cfg=False)`, gets the prompt's half alone)."""

    def __init__(self, controls: Sequence[LoadedControl], width: int, height: int, batch: int, use_cfg: bool,
                 device):
        self.controls = list(controls)
        self.batch, self.use_cfg = batch, use_cfg
        self.images = [map_tensor(c.image, c.mask, width, height).to(device) for c in self.controls]
        # a T2I-Adapter's features depend on the map only: computed once, scaled by the weight
        self.features = [self._adapter_features(c, image) if c.is_adapter else None
                         for c, image in zip(self.controls, self.images)]

    def __bool__(self) -> bool:
        return bool(self.controls)

    def _cond_only(self, control: LoadedControl, cfg: bool) -> bool:
        return cfg and control.unit.control_mode == CONTROL_FIRST

    @torch.no_grad()
    def _adapter_features(self, control: LoadedControl, image: torch.Tensor) -> list[torch.Tensor]:
        features = control.model(image.to(control.model.dtype))
        features = [f * control.unit.weight for f in features]
        if self._cond_only(control, self.use_cfg):
            return [torch.cat([torch.zeros_like(f).repeat_interleave(self.batch, 0),
                               f.repeat_interleave(self.batch, 0)]) for f in features]
        rows = self.batch * (2 if self.use_cfg else 1)
        return [f.repeat_interleave(rows, 0) for f in features]

    @torch.no_grad()
    def residuals(self, step: int, steps: int, latents: torch.Tensor, timestep, context: torch.Tensor,
                  added: dict | None, cfg: bool | None = None) -> dict:
        """The U-Net keyword arguments of every unit acting on this step (empty when none does).

        `latents`: the scaled latents of the batch (4 channels, before any CFG doubling or inpaint
        channels); `context` and `added`: the U-Net's own text conditioning for this step; `cfg`:
        whether this step runs both halves (default: `use_cfg`)."""
        cfg = self.use_cfg if cfg is None else cfg
        down = mid = intrablock = None
        for control, image, features in zip(self.controls, self.images, self.features):
            if not acts_at(control.unit, step, steps):
                continue
            if features is not None:
                intrablock = add_up(intrablock, features if cfg or not self.use_cfg
                                    else [f[self.batch:] for f in features])
                continue
            got_down, got_mid = self._controlnet(control, image, latents, timestep, (context, added), cfg)
            down = add_up(down, got_down)
            mid = got_mid if mid is None else mid + got_mid
        out: dict = {}
        if down is not None:
            out.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if intrablock is not None:
            out["down_intrablock_additional_residuals"] = [f.clone() for f in intrablock]  # the U-Net pops them
        return out

    def _controlnet(self, control: LoadedControl, image, latents, timestep, conditioning, cfg: bool):
        model, unit = control.model, control.unit
        context, added = conditioning
        cond_only = self._cond_only(control, cfg)
        sample = latents if cond_only or not cfg else torch.cat([latents, latents])
        if cond_only:  # the prompt's half of the U-Net's conditioning
            context = context[self.batch:]
            added = {key: value[self.batch:] for key, value in added.items()} if added else None
        hint = image.to(model.dtype).repeat_interleave(sample.shape[0], 0)
        kwargs = {"added_cond_kwargs": added} if added else {}
        down, mid = model(sample.to(model.dtype), timestep, encoder_hidden_states=context.to(model.dtype),
                          controlnet_cond=hint, conditioning_scale=unit.weight,
                          guess_mode=unit.control_mode in (PROMPT_FIRST, CONTROL_FIRST), return_dict=False, **kwargs)
        if cond_only:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid


def add_up(total: list[torch.Tensor] | None, more: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Residual lists summed layer by layer (several units)."""
    return list(more) if total is None else [a + b for a, b in zip(total, more)]
