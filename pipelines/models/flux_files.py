"""Flux.1 files (dev, schnell, Fill, Kontext): what a file holds, where the missing parts are, and what it costs.

Flux comes as BFL's transformer alone (`double_blocks.*`, `single_blocks.*`, `img_in`, with or
without the `model.diffusion_model.` prefix; dev adds `guidance_in`), as the all-in-one
"checkpoint" files ComfyUI and Forge users share (the VAE under `vae.`, CLIP-L and T5-XXL
under `text_encoders.*.transformer.` as in SD 3's files), or as a diffusers folder. The text
encoders of a bare transformer are separate files in `models/text_encoder/`, found by the same
helpers as SD 3's (`sd3_files`). Everything is read from names and shapes, so tiny test files
and real ones take the same path.

Kontext (the edit model) has dev's shapes: nothing in its tensors tells it apart, so it is known by
its name ("kontext" in the file name or the metadata's title, as BFL, ComfyUI and GGUF files are
named) or by a diffusers folder's FluxKontextPipeline; its spec's `unet_config` carries
`KONTEXT_KEY` (`generate/flux_kontext` puts the reference image's tokens after the latents').
Fill (in_channels 384: the latents, the masked image's latents and the 8x8 pixel mask of each
latent pixel, all packed) is an inpainting model (`generate/flux_fill`); Depth (128) is
recognised and refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, read_header, read_json
from pipelines.models.families import (
    DIFFUSERS_INDEX,
    FLUX,
    FLUX_DEV_SCHEDULE,
    FLUX_SCHNELL_SCHEDULE,
    FLUX_VAE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from pipelines.models.sd3_files import CLIP_L, FLOW, T5XXL, EncoderWeights, locate_encoders, vae_config
from pipelines.models.spec import ModelSpec, declared_resolution

MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"  # diffusers' own Flux detection key
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # dev's distilled-guidance embedder; schnell has none
REQUIRED_ENCODERS = (CLIP_L, T5XXL)  # Flux's T5 is its prompt: it cannot run without it
ENCODER_FILES = "clip_l.safetensors and t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)"
LATENT_CHANNELS = 16
PACKED_CHANNELS = LATENT_CHANNELS * 4  # 2x2 latent patches packed into one token
# Flux.1's rotary axes (image index, row, column) split a head as 16/56/56 of 128: 1/8, 7/16, 7/16
ROPE_SHARES = (2, 7, 7)
MLP_RATIO = 4  # the single blocks' fused linear1 is q, k, v and a 4x MLP
FILL_INPUT = PACKED_CHANNELS * 2 + 64 * 4  # latents, masked-image latents, the mask's 8x8 pixels per latent
DEPTH_INPUT = PACKED_CHANNELS * 2
VARIANTS_BY_INPUT = {PACKED_CHANNELS: None, FILL_INPUT: "Flux.1 Fill", DEPTH_INPUT: "Flux.1 Depth"}
SUPPORTED_INPUTS = (PACKED_CHANNELS, FILL_INPUT)
FILL_GUIDANCE = 30.0  # BFL's and diffusers' FluxFillPipeline default for Fill dev
KONTEXT_GUIDANCE = 2.5  # BFL's and diffusers' FluxKontextPipeline example for Kontext dev
KONTEXT_STEPS = 28  # FluxKontextPipeline's default
# In a Kontext spec's unet_config: diffusers passes no "_" config key to the model's __init__ (it
# only records it), so the same config still builds the transformer
KONTEXT_KEY = "_kontext"
KONTEXT_WORD = "kontext"
NAME_METADATA = ("modelspec.title", "modelspec.architecture", "general.name")  # what names a file inside it
# bytes per weight of the smaller files people run Flux from, best first, for "what would fit"
# (Q8_0: 34 bytes per 32 weights; fp8, kept in fp8 where the device stores it: 1; Q4_0: 18 per 32)
FP8_FORMAT = "fp8 (e4m3fn)"
FORMAT_BYTES = (("GGUF Q8_0", 34 / 32), (FP8_FORMAT, 1), ("GGUF Q4_0", 18 / 32))


def transformer_prefix(shapes) -> str | None:
    """The transformer's key prefix: `model.diffusion_model.`, "" (BFL's bare file), or None."""
    for prefix in (UNET_PREFIX, ""):
        if prefix + MARKER in shapes:
            return prefix
    return None


def is_flux_file(shapes) -> bool:
    return transformer_prefix(shapes) is not None


def is_flux_folder(folder: Path) -> bool:
    """A diffusers folder of a Flux.1 pipeline (FluxPipeline, FluxKontextPipeline, ...)."""
    index_file = Path(folder) / DIFFUSERS_INDEX
    return index_file.is_file() and str(read_json(index_file).get("_class_name", "")).startswith("Flux")


def _indices(shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def rope_axes(head_width: int) -> tuple[int, int, int]:
    """`axes_dims_rope` for a head width: Flux.1's (16, 56, 56) at 128, the same shares otherwise."""
    unit, rest = divmod(head_width, 2 * sum(ROPE_SHARES))
    if rest or not unit:
        raise CheckpointError(f"not a Flux transformer: head width {head_width} does not split into rotary axes")
    return tuple(2 * unit * share for share in ROPE_SHARES)


def transformer_config(shapes, prefix: str) -> dict[str, Any]:
    """diffusers' FluxTransformer2DModel config from an original-layout transformer's shapes."""
    p = re.escape(prefix)
    width, in_channels = shapes[prefix + "img_in.weight"]
    head_width = shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    single = _indices(shapes, p + r"single_blocks\.(\d+)\.")
    if width % head_width or (single and shapes[prefix + "single_blocks.0.linear1.weight"][0]
                              != (3 + MLP_RATIO) * width):
        raise CheckpointError(f"not a Flux.1 transformer: width {width}, head width {head_width}")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes[prefix + "final_layer.linear.weight"][0],
        "num_layers": len(_indices(shapes, p + r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(single),
        "attention_head_dim": head_width,
        "num_attention_heads": width // head_width,
        "joint_attention_dim": shapes[prefix + "txt_in.weight"][1],
        "pooled_projection_dim": shapes[prefix + "vector_in.in_layer.weight"][1],
        "guidance_embeds": prefix + GUIDANCE_KEY in shapes,
        "axes_dims_rope": rope_axes(head_width),
    }


def flux_variant(config) -> str:
    """What the listing calls the model: dev (guidance-distilled), schnell (timestep-distilled),
    Kontext (dev's shapes, known by name), or the Fill / Depth models by their wider input."""
    if is_kontext(config):
        return "Flux.1 Kontext"
    special = VARIANTS_BY_INPUT.get(config["in_channels"], "Flux.1 (unknown input)")
    return special or ("Flux.1 dev" if config["guidance_embeds"] else "Flux.1 schnell")


def is_fill(config) -> bool:
    """Flux.1 Fill: the inpainting model (masked image and mask beside the latents)."""
    return config["in_channels"] == FILL_INPUT


def is_kontext(config) -> bool:
    """Flux.1 Kontext: the edit model (a reference image's tokens beside the latents')."""
    return bool(config.get(KONTEXT_KEY))


def names_kontext(*names: str) -> bool:
    """Whether a file's or folder's names say Kontext (flux1-kontext-dev, flux1-dev-kontext_fp8_scaled)."""
    return any(KONTEXT_WORD in str(name).lower() for name in names)


def with_kontext(config: dict[str, Any], *names: str) -> dict[str, Any]:
    """`config` marked as Kontext's when `names` say so and the shapes are dev-like (latents only in)."""
    if config["in_channels"] == PACKED_CHANNELS and names_kontext(*names):
        return {**config, KONTEXT_KEY: True}
    return config


def default_guidance(config) -> float:
    """The distilled guidance a guidance-distilled Flux runs at when none is asked for: 30 for
    Fill (its card's and FluxFillPipeline's default), 2.5 for Kontext (BFL's and diffusers'
    example), 3.5 for dev (FluxPipeline's and Forge's)."""
    if is_kontext(config):
        return KONTEXT_GUIDANCE
    return FILL_GUIDANCE if is_fill(config) else FLUX.distilled_guidance


def flux_recommended(config) -> dict[str, Any]:
    """The settings a Flux transformer is meant to run with (the listing's "recommended"): Euler,
    CFG 1 (one pass), 20 steps and its distilled guidance for dev and Fill, 4 steps for schnell;
    Fill repaints the whole masked area (denoising strength 1, as FluxFillPipeline's default);
    Kontext takes 28 steps (FluxKontextPipeline's default) and starts from noise (strength 1)."""
    dev = bool(config.get("guidance_embeds"))
    steps = KONTEXT_STEPS if is_kontext(config) else 20 if dev else 4
    wanted: dict[str, Any] = {"sampler": "Euler", "cfg_scale": FLUX.default_cfg_scale, "steps": steps}
    if dev:
        wanted["distilled_cfg_scale"] = default_guidance(config)
    if is_fill(config) or is_kontext(config):
        wanted["denoising_strength"] = 1.0
    return wanted


def flux_schedule(config) -> dict[str, Any]:
    """FlowMatchEulerDiscreteScheduler's config: dev's dynamic shift, schnell's plain schedule."""
    return dict(FLUX_DEV_SCHEDULE if config["guidance_embeds"] else FLUX_SCHNELL_SCHEDULE)


def vae_prefix(shapes) -> str | None:
    """Where an all-in-one file keeps its VAE (`vae.`, or LDM's `first_stage_model.`), or None."""
    return next((p for p in (FLUX_VAE_PREFIX, VAE_PREFIX) if p + "decoder.conv_in.weight" in shapes), None)


def flux_vae_config(shapes, prefix: str) -> dict[str, Any]:
    return vae_config(shapes, prefix, FLUX)


def flow_vae_prefix(shapes) -> str | None:
    """The key prefix of a VAE file's 16-channel, quant-conv-less VAE (SD 3's and Flux's, which
    have the same shapes), or None for any other VAE."""
    prefix = next((p for p in ("", FLUX_VAE_PREFIX, VAE_PREFIX) if p + "decoder.conv_in.weight" in shapes), None)
    if prefix is None or prefix + "post_quant_conv.weight" in shapes:
        return None
    return prefix if shapes[prefix + "decoder.conv_in.weight"][1] == LATENT_CHANNELS else None


def find_flux_vae(vae_dir: Path | None) -> Path | None:
    """Flux's VAE in models/VAE when the choice is unambiguous: the one 16-channel VAE file named
    for Flux (BFL's ae.safetensors, or a name with "flux"), else None."""
    return find_named_flow_vae(vae_dir, lambda stem: stem == "ae" or "flux" in stem)


def find_sd3_vae(vae_dir: Path | None) -> Path | None:
    """SD 3's VAE in models/VAE for a transformer-only file (GGUF ones are), when unambiguous: the
    one 16-channel VAE file with "sd3" in its name (sd3_vae, sd3.5_vae, ...), else None."""
    return find_named_flow_vae(vae_dir, lambda stem: "sd3" in stem)


def find_named_flow_vae(vae_dir: Path | None, named_for) -> Path | None:
    """The one 16-channel VAE file in `vae_dir` whose lower-case stem `named_for` accepts, or None
    (none, or more than one: the choice is the user's then)."""
    if vae_dir is None or not Path(vae_dir).is_dir():
        return None
    named = []
    for path in sorted(Path(vae_dir).glob("*.safetensors")):
        if not named_for(path.stem.lower()):
            continue
        try:
            if flow_vae_prefix(read_header(path).shapes) is not None:
                named.append(path)
        except (CheckpointError, OSError):
            continue  # a broken neighbour must not stop the model this one is for
    return named[0] if len(named) == 1 else None


def inspect_flux(header: CheckpointHeader) -> ModelSpec:
    """The spec of a Flux single file from its header: the transformer's config as the
    `unet_config`, the VAE's where the file has one (the encoders' are read when they load)."""
    try:
        config = transformer_config(header.shapes, transformer_prefix(header.shapes))
        vae_at = vae_prefix(header.shapes)
        vae = flux_vae_config(header.shapes, vae_at) if vae_at is not None else {}
    except (KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{header.path.name}: incomplete Flux checkpoint (missing {exc})") from exc
    config = with_kontext(config, header.path.name, *(header.metadata.get(key, "") for key in NAME_METADATA))
    declared = declared_resolution(header.metadata)
    return ModelSpec(family=FLUX, inpainting=is_fill(config), prediction_type=FLOW,
                     prediction_source="family default", unet_config=config, vae_config=vae, text_encoder_configs=[],
                     native_resolution=declared or FLUX.native_resolution, declared_resolution=declared)


def inspect_flux_folder(folder: Path) -> ModelSpec:
    """The spec of a diffusers Flux folder from its config files (no weights read)."""
    folder = Path(folder)
    try:
        transformer = read_json(folder / "transformer" / "config.json")
        vae = read_json(folder / "vae" / "config.json")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder.name}: incomplete Flux diffusers folder ({exc})") from exc
    encoders = [read_json(folder / d / "config.json") for d in ("text_encoder", "text_encoder_2")
                if (folder / d / "config.json").is_file()]
    transformer = with_kontext(transformer, folder.name, read_json(folder / DIFFUSERS_INDEX).get("_class_name", ""))
    return ModelSpec(family=FLUX, inpainting=is_fill(transformer), prediction_type=FLOW, unet_config=transformer,
                     vae_config=vae, text_encoder_configs=encoders, native_resolution=FLUX.native_resolution,
                     prediction_source="family default")


def locate_flux_encoders(header: CheckpointHeader, text_encoder_dir: Path | None) -> dict[str, EncoderWeights]:
    """CLIP-L and T5-XXL of a Flux file: inside it, or in `text_encoder_dir` (a clear error naming
    the file, what is missing and where it goes otherwise)."""
    return locate_encoders(header, text_encoder_dir, REQUIRED_ENCODERS, model="a Flux transformer",
                           files=ENCODER_FILES)


def check_variant(name: str, config) -> None:
    """Depth takes a depth map packed beside the latents: not built yet (nor any other input width)."""
    if config["in_channels"] not in SUPPORTED_INPUTS:
        raise CheckpointError(f"{name}: {flux_variant(config)} models are not supported yet "
                              "(Flux.1 dev, schnell, Fill and Kontext-shaped files are)")


# --- memory ------------------------------------------------------------------------------------

def transformer_weights(header: CheckpointHeader) -> int:
    """How many weights the file's Flux transformer has (12 billion for dev and schnell)."""
    prefix = transformer_prefix(header.shapes) or ""
    return sum(math.prod(shape) for key, shape in header.shapes.items()
               if key.startswith(prefix) and not key.startswith((FLUX_VAE_PREFIX, VAE_PREFIX, "text_encoders.")))


def bytes_text(n: float) -> str:
    """Bytes for people, as memory plans say them: MB below a gigabyte, GB above."""
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MB"


def what_would_fit(weights: int, room: int, fp8: bool = True) -> str:
    """The best common format of a `weights`-weight transformer that fits in `room` bytes, said for
    people ("a GGUF Q4_0 file of it (about 6.2 GB) would fit"), or that none does. `fp8`: whether
    the device keeps fp8 files in fp8 (see quantized.fp8_storage_supported); else they are not offered."""
    for name, size in FORMAT_BYTES:
        if (fp8 or name != FP8_FORMAT) and weights * size <= room:
            return f"a {name} file of it (about {bytes_text(weights * size)}) would fit"
    return f"not even a GGUF Q4_0 file of it (about {bytes_text(weights * FORMAT_BYTES[-1][1])}) would fit"
