"""What a checkpoint is, from its header alone: `inspect_checkpoint` for the loader, and
`describe_checkpoint`, the one home of what the checkpoint listing says about a file."""

from __future__ import annotations

from pathlib import Path

from pipelines.models.architecture import infer_clip_config, infer_unet_config, infer_vae_config, unet_ema_keys
from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, read_header, sniff_format
from pipelines.models.diffusers_folder import inspect_diffusers_folder
from pipelines.models.families import FLUX, SD3, detect_family
from pipelines.models.flux_files import (
    flux_recommended,
    flux_variant,
    inspect_flux,
    inspect_flux_folder,
    is_flux_file,
    is_flux_folder,
    is_kontext,
)
from pipelines.models.prediction import resolve_prediction
from pipelines.models.quantized import storage_description
from pipelines.models.sd3_files import inspect_sd3, inspect_sd3_folder, is_sd3_file, is_sd3_folder, sd3_variant
from pipelines.models.spec import ModelSpec, declared_resolution

# the human-facing fields of safetensors metadata: modelspec keys first, then common variants
CARD_FIELDS = {
    "title": ("modelspec.title", "title", "name"),
    "author": ("modelspec.author", "author"),
    "description": ("modelspec.description", "description"),
    "license": ("modelspec.license", "license"),
    "trigger_words": ("modelspec.trigger_phrase", "trigger_words", "activation text", "ss_trigger_words"),
    "date": ("modelspec.date",),
}
LISTED_METADATA_CHARS = 2000  # longer values (kohya's tag frequencies, ...) stay out of the listing


def inspect_checkpoint(header: CheckpointHeader) -> ModelSpec:
    """Family, variant, prediction type and component configs, from names and shapes alone."""
    if header.format == "diffusers":
        if is_flux_folder(header.path):  # transformer/ pipelines, not unet/ ones
            return inspect_flux_folder(header.path)
        if is_sd3_folder(header.path):
            return inspect_sd3_folder(header.path)
        return inspect_diffusers_folder(header.path)
    if is_flux_file(header.shapes):  # flow transformers, not U-Nets: their own modules read them
        return inspect_flux(header)
    if is_sd3_file(header.shapes):
        return inspect_sd3(header)
    family = detect_family(header.shapes)
    try:
        unet = infer_unet_config(header.shapes, family)
        vae = infer_vae_config(header.shapes, family.latent_scaling_factor, family.native_resolution)
        encoders = [infer_clip_config(header.shapes, spec) for spec in family.text_encoders]
    except (KeyError, IndexError, StopIteration) as exc:
        raise CheckpointError(f"{header.path.name}: incomplete {family.label} checkpoint (missing {exc})") from exc
    inpainting = unet["in_channels"] == 9
    prediction, source = resolve_prediction(header.path, header.metadata, family, inpainting)
    spec = ModelSpec(
        family=family,
        inpainting=inpainting,
        prediction_type=prediction,
        prediction_source=source,
        unet_config=unet,
        vae_config=vae,
        text_encoder_configs=encoders,
        native_resolution=family.native_resolution,
        ema=unet_ema_keys(header.shapes) is not None,
        declared_resolution=declared_resolution(header.metadata),
    )
    return spec.with_prediction(prediction, source)


def describe_checkpoint(path: Path) -> dict:
    """What the checkpoint listing shows about a file or diffusers folder: family, variant,
    native size, prediction type and where it came from, EMA, how the weights are stored
    (GGUF quant type, fp8, NF4; None for plain float files), the metadata card. One header
    read, never the weights; a torch pickle (.ckpt) says nothing until it is loaded, since
    reading its names means loading it."""
    path = Path(path)
    if sniff_format(path) == "torch":
        return {}
    header = read_header(path)
    spec = inspect_checkpoint(header)
    return {
        "family": spec.description,
        "family_id": spec.family.name,
        "inpainting": spec.inpainting,
        "resolution": spec.native_resolution,
        "declared_resolution": spec.declared_resolution,
        "prediction": spec.prediction_type,
        "prediction_source": spec.prediction_source,
        "ema": spec.ema,
        **family_details(spec),
        "format": header.format,
        "storage": storage_description(header),
        "demo": header.metadata.get("sdui.demo") == "true",  # the shipped demo model: the UI says so
        **metadata_card(header.metadata),
        "metadata": {k: v for k, v in header.metadata.items() if len(v) < LISTED_METADATA_CHARS},
    }


def family_details(spec: ModelSpec) -> dict:
    """The flow families' variant ("SD 3.5 medium", "Flux.1 dev"), and for guidance-distilled ones
    the settings they are meant to run with (the UI and API clients may apply them); an edit model
    (Flux.1 Kontext: it edits the img2img / Inpaint input after the prompt) says so."""
    if spec.family is SD3:
        return {"variant": sd3_variant(spec.unet_config)}
    if spec.family is not FLUX:
        return {}
    details = {"variant": flux_variant(spec.unet_config), "recommended": flux_recommended(spec.unet_config)}
    return {**details, "edit_model": True} if is_kontext(spec.unet_config) else details


def metadata_card(metadata: dict) -> dict[str, str]:
    """The human-facing fields of safetensors metadata (modelspec keys and common variants)."""
    card = {}
    for name, keys in CARD_FIELDS.items():
        for key in keys:
            value = metadata.get(key)
            if value and str(value).strip():
                card[name] = str(value).strip()
                break
    return card
