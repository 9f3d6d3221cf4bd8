"""Write diffusers components as an original-layout (LDM / A1111) single-file checkpoint.

Single files keep the U-Net under ``model.diffusion_model.`` and the VAE under
``first_stage_model.``; the text encoders sit where each family's code put them
(the prefixes are `families`' constants):

- SD 1.x: ``cond_stage_model.transformer.`` (Hugging Face CLIP names, ``text_model.`` included);
- SD 2.x: ``cond_stage_model.model.`` (open_clip names: ``transformer.resblocks.N.attn.in_proj_weight``,
  ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``);
- SDXL base: ``conditioner.embedders.0.transformer.`` (HF CLIP-L) and ``conditioner.embedders.1.model.``
  (open_clip bigG, with its ``text_projection``);
- SDXL refiner: ``conditioner.embedders.0.model.`` (open_clip bigG only).

The renaming itself is `ldm_layout`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.core.fileio import atomic_path
from pipelines.models.families import CLIP_PREFIX, SD_SCHEDULE, UNET_PREFIX, VAE_PREFIX
from pipelines.models.ldm_layout import clip_to_ldm, clip_to_open_clip, unet_to_ldm, vae_to_ldm

__all__ = [
    "save_checkpoint",
    "save_sd1_checkpoint",
    "sd1_schedule_buffers",
    "sd1_single_file_state_dict",
    "single_file_state_dict",
]


def sd1_schedule_buffers(
    beta_start: float = SD_SCHEDULE["beta_start"],
    beta_end: float = SD_SCHEDULE["beta_end"],
    steps: int = SD_SCHEDULE["num_train_timesteps"],
) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers that original SD 1.x files carry at the top level (float32)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cum = torch.cumprod(alphas, 0)
    cum_prev = torch.cat([torch.ones(1, dtype=torch.float64), cum[:-1]])
    post_var = betas * (1.0 - cum_prev) / (1.0 - cum)
    bufs = {
        "betas": betas,
        "alphas_cumprod": cum,
        "alphas_cumprod_prev": cum_prev,
        "sqrt_alphas_cumprod": cum.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cum).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cum).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cum).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cum - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
        "posterior_mean_coef1": betas * cum_prev.sqrt() / (1.0 - cum),
        "posterior_mean_coef2": (1.0 - cum_prev) * alphas.sqrt() / (1.0 - cum),
    }
    return {k: v.to(torch.float32) for k, v in bufs.items()}


def single_file_state_dict(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: list[tuple[str, str, torch.nn.Module]],
    *,
    schedule_buffers: bool = False,
) -> dict[str, torch.Tensor]:
    """Any family's single-file state dict.

    ``text_encoders`` lists ``(prefix, layout, module)`` with layout ``"hf_clip"`` (SD 1.x,
    SDXL's CLIP-L) or ``"open_clip"`` (SD 2.x, SDXL's bigG). An open_clip encoder without a
    projection (SD 2.x) gets an identity ``text_projection`` as real files carry one.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in unet_to_ldm(unet.state_dict(), unet.config).items():
        out[UNET_PREFIX + k] = v
    for k, v in vae_to_ldm(vae.state_dict(), vae.config).items():
        out[VAE_PREFIX + k] = v
    for prefix, layout, module in text_encoders:
        if layout == "hf_clip":
            converted = clip_to_ldm(module.state_dict())
        elif layout == "open_clip":
            width = module.config.hidden_size
            eye = torch.eye(width, device=next(module.parameters()).device)
            converted = clip_to_open_clip(module.state_dict(), text_projection=eye)
        else:
            raise ValueError(f"unknown text encoder layout {layout!r}")
        for k, v in converted.items():
            out[prefix + k] = v
    if schedule_buffers:
        out.update(sd1_schedule_buffers())
    return out


def sd1_single_file_state_dict(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    *,
    schedule_buffers: bool = False,
) -> dict[str, torch.Tensor]:
    """The full SD 1.x single-file state dict (three prefixes) of diffusers/transformers modules.

    ``schedule_buffers=True`` also adds the top-level DDPM buffers (``betas``,
    ``alphas_cumprod``, ...) that original SD 1.x files carry; loaders ignore them.
    """
    return single_file_state_dict(unet, vae, [(CLIP_PREFIX, "hf_clip", text_encoder)],
                                  schedule_buffers=schedule_buffers)


def save_checkpoint(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a state dict as ``.safetensors``, atomically (temp file in the folder, then rename).

    ``dtype`` casts floating-point tensors (e.g. ``torch.float16``); integer tensors such
    as ``position_ids`` keep their type.
    """
    path = Path(path)
    _check_target(path, metadata)
    meta = dict(metadata) if metadata else None

    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous()

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def save_sd1_checkpoint(
    path: str | os.PathLike,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    *,
    schedule_buffers: bool = False,
) -> Path:
    """Write an SD 1.x original-layout ``.safetensors`` file; returns its path.

    ``dtype`` casts floating-point tensors (e.g. ``torch.float16``); integer tensors such
    as ``position_ids`` keep their type.  The file is written to a temporary name in the
    same folder and renamed, so a reader never sees a half-written checkpoint.
    """
    _check_target(Path(path), metadata)  # before the state dict is built
    state = sd1_single_file_state_dict(unet, vae, text_encoder, schedule_buffers=schedule_buffers)
    return save_checkpoint(path, state, metadata, dtype)


def _check_target(path: Path, metadata: dict[str, str] | None) -> None:
    """ValueError for a file name that is not .safetensors, TypeError for metadata safetensors cannot hold."""
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoints are written as .safetensors files, got {path.name!r}")
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; bad entries: {bad}")
