"""What a checkpoint is (`ModelSpec`: family, variant, prediction type, component configs)
and what a loaded one holds (`Components`: the modules and tokenizers, with their spec)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from pipelines.core.prediction_types import EPSILON
from pipelines.models.families import Family
from pipelines.models.prediction import normalise_prediction


@dataclass
class ModelSpec:
    family: Family
    inpainting: bool
    prediction_type: str  # diffusers' name: "epsilon" | "v_prediction"
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_configs: list[dict[str, Any]]
    native_resolution: int
    prediction_source: str = "family default"  # where prediction_type came from, for the UI
    ema: bool = False  # the U-Net weights are the file's EMA copy
    declared_resolution: int | None = None  # what the file's metadata says it was trained at

    @property
    def description(self) -> str:
        return self.family.label + (" inpainting" if self.inpainting else "")

    def with_prediction(self, prediction_type: str, source: str) -> ModelSpec:
        prediction_type = normalise_prediction(prediction_type) or EPSILON
        native = self.family.resolution_for(prediction_type, self.inpainting, self.declared_resolution)
        return replace(self, prediction_type=prediction_type, prediction_source=source, native_resolution=native)


def declared_resolution(metadata: dict[str, str]) -> int | None:
    """The training size a file states (`sdui.native_resolution`, or the model spec's
    `modelspec.resolution` "WxH"), so a 64 px demo model or a 768 px fine-tune opens at its size."""
    for key in ("sdui.native_resolution", "modelspec.resolution"):
        text = str(metadata.get(key, "")).lower().split("x")[0].strip()
        if text.isdigit() and 64 <= int(text) <= 4096 and int(text) % 8 == 0:
            return int(text)
    return None


@dataclass
class Components:
    spec: ModelSpec
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return {**self.spec.family.scheduler, "prediction_type": self.spec.prediction_type}

    def modules(self) -> Iterator[torch.nn.Module]:
        yield self.unet
        yield self.vae
        yield from self.text_encoders

    def nbytes(self) -> int:
        return modules_nbytes(self.modules())

    def with_prediction(self, prediction_type: str, source: str = "user override") -> Components:
        """The same modules under another prediction type (no reload: only the schedule changes)."""
        return replace(self, spec=self.spec.with_prediction(prediction_type, source))

    def with_vae(self, vae) -> Components:
        return replace(self, vae=vae)


def modules_nbytes(modules) -> int:
    """Bytes of the parameters and buffers of `modules`, each tensor counted once."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
