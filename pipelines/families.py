"""Checkpoint families: how to recognise one from its keys, and what it is made of.

Adding a family is adding a `Family` entry to `FAMILIES`: its key prefixes, its text
encoder layout, its training schedule and its native size. Architecture details that
the weights do tell (channel counts, depths, attention placement) are read from the
tensor shapes by `loading.py`, so tiny test checkpoints and real ones take the same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextEncoderSpec:
    prefix: str  # key prefix in the single file, up to the HF `text_model.` names
    layout: str  # "hf_clip": keys already in transformers' CLIPTextModel layout
    pad_token: str  # SD 1.x pads with <|endoftext|>; OpenCLIP-based encoders with "!"


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    marker_key: str  # a key only this family's files have
    text_encoders: tuple[TextEncoderSpec, ...]
    native_resolution: int
    latent_scaling_factor: float
    # Heads cannot be read from shapes: SD 1.x uses 8 heads everywhere, later ones head width 64.
    unet_heads: int | None = None
    unet_head_width: int | None = None
    scheduler: dict = field(default_factory=dict)


# Stable Diffusion's training schedule (shared by SD 1.x and 2.x).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}

SD1 = Family(
    name="sd1",
    label="SD 1.x",
    marker_key="cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    text_encoders=(
        TextEncoderSpec(prefix="cond_stage_model.transformer.", layout="hf_clip", pad_token="<|endoftext|>"),
    ),
    native_resolution=512,
    latent_scaling_factor=0.18215,
    unet_heads=8,
    scheduler=SD_SCHEDULE,
)

FAMILIES: tuple[Family, ...] = (SD1,)


class UnsupportedCheckpoint(ValueError):
    """The file is readable but is not a checkpoint family we know."""


def detect_family(keys) -> Family:
    keys = set(keys)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        raise UnsupportedCheckpoint(
            "not a Stable Diffusion checkpoint: no U-Net weights under 'model.diffusion_model.' "
            "(is it a LoRA, a VAE or an upscaler? those go in models/Lora, models/VAE, models/ESRGAN)"
        )
    for family in FAMILIES:
        if family.marker_key in keys:
            return family
    known = ", ".join(f.label for f in FAMILIES)
    raise UnsupportedCheckpoint(f"unrecognised checkpoint family (this version loads: {known})")
