"""A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder*/`) as a
checkpoint: its spec from the folder's config files, its modules from its own weights only
(never the Hub)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from pipelines.core.prediction_types import EPSILON
from pipelines.models.checkpoint_file import CheckpointError, read_json
from pipelines.models.clip_tokenizer import load_tokenizer
from pipelines.models.families import DIFFUSERS_INDEX, SD1, SD2, SDXL, SDXL_REFINER, Family
from pipelines.models.prediction import normalise_prediction
from pipelines.models.spec import Components, ModelSpec


def _component_present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def _encoder_folders(family: Family) -> list[str]:
    """The text encoder subfolders of a family's pipeline, in the family's encoder order."""
    return {SDXL.name: ["text_encoder", "text_encoder_2"], SDXL_REFINER.name: ["text_encoder_2"]}.get(
        family.name, ["text_encoder"])


def inspect_diffusers_folder(folder: Path) -> ModelSpec:
    folder = Path(folder)
    index = read_json(folder / DIFFUSERS_INDEX)
    for part in ("unet", "vae"):
        if not _component_present(index, part) or not (folder / part / "config.json").is_file():
            raise CheckpointError(f"{folder.name}: not a Stable Diffusion pipeline (no {part}/config.json)")
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    has_te1 = _component_present(index, "text_encoder")
    has_te2 = _component_present(index, "text_encoder_2")
    if unet.get("addition_embed_type") == "text_time":
        family = SDXL if has_te1 and has_te2 else SDXL_REFINER
    else:
        te = read_json(folder / "text_encoder" / "config.json") if has_te1 else {}
        family = SD2 if te.get("hidden_act") == "gelu" else SD1
    encoders = []
    for name in _encoder_folders(family):
        if not (folder / name / "config.json").is_file():
            raise CheckpointError(f"{folder.name}: {family.label} pipeline without {name}/config.json")
        encoders.append(read_json(folder / name / "config.json"))
    scheduler = {}
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    inpainting = unet.get("in_channels") == 9
    prediction = normalise_prediction(scheduler.get("prediction_type")) or EPSILON
    spec = ModelSpec(family=family, inpainting=inpainting, prediction_type=prediction,
                     prediction_source="scheduler config" if scheduler else "family default",
                     unet_config=unet, vae_config=vae, text_encoder_configs=encoders,
                     native_resolution=family.native_resolution)
    spec = spec.with_prediction(prediction, spec.prediction_source)
    sample = unet.get("sample_size")
    if isinstance(sample, int) and sample * 8 in (512, 768, 1024):
        spec = replace(spec, native_resolution=sample * 8)
    return spec


def load_diffusers_folder(folder: Path, dtype: torch.dtype = torch.float32,
                          vae_dtype: torch.dtype | None = None) -> Components:
    """A diffusers pipeline folder, from its own files only (never the Hub)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy: only when loading
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # heavy: likewise

    folder = Path(folder)
    spec = inspect_diffusers_folder(folder)

    def variant(sub: str) -> dict:
        files = [p.name for p in (folder / sub).iterdir() if p.is_file()]
        plain = any(re.fullmatch(r"[\w-]+\.(safetensors|bin)", f) for f in files)
        return {} if plain or not any(".fp16." in f for f in files) else {"variant": "fp16"}

    common = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **common, **variant("unet"))
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype or dtype, **common, **variant("vae"))
        dirs = _encoder_folders(spec.family)
        tok_dirs = [d.replace("text_encoder", "tokenizer") for d in dirs]
        encoders, tokenizers = [], []
        for enc_spec, d, t in zip(spec.family.text_encoders, dirs, tok_dirs):
            cls = CLIPTextModelWithProjection if enc_spec.pooled else CLIPTextModel
            encoders.append(cls.from_pretrained(folder / d, torch_dtype=dtype, **common, **variant(d)))
            if (folder / t).is_dir():
                tokenizers.append(CLIPTokenizer.from_pretrained(str(folder / t), **common))
            else:
                tokenizers.append(load_tokenizer(enc_spec))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder.name}: could not load the diffusers folder ({exc})") from exc
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return Components(spec=spec, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers)
