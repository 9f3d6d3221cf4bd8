"""Stable Diffusion 3 / 3.5 files: what a file holds and where the missing parts are.

SD 3.x comes as an all-in-one single file (MMDiT under `model.diffusion_model.`, the VAE under
`first_stage_model.`, CLIP-L, CLIP-G and T5-XXL under `text_encoders.*.transformer.`), as the
denoiser alone (with or without the `model.diffusion_model.` prefix: SAI's and ComfyUI's
`models/unet` files) whose text encoders are separate files in `models/text_encoder/`
(clip_l, clip_g, t5xxl in transformers' layout), or as a diffusers folder. Everything is read
from names and shapes, so tiny test files and real ones take the same path; the one fact the
shapes do not tell (head width 64) is the `Family`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.models.architecture import infer_clip_config, infer_vae_config
from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, read_header, read_json
from pipelines.models.families import (
    DIFFUSERS_INDEX,
    SD3,
    SD3_T5_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Family,
    TextEncoderSpec,
)
from pipelines.models.spec import ModelSpec, declared_resolution

# a key every MMDiT has (diffusers' own SD3 detection uses the same one)
MMDIT_MARKER = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
CLIP_L, CLIP_G, T5XXL = "clip_l", "clip_g", "t5xxl"
REQUIRED_ENCODERS = (CLIP_L, CLIP_G)  # T5 may be left out: SD 3.x was trained with it dropped at times
TEXT_ENCODER_FOLDER = "models/text_encoder"  # where split encoder files go (Forge's and ComfyUI's folder)
SPLIT_FILE_SUFFIXES = (".safetensors",)
FLOW = "flow"  # what an MMDiT predicts (rectified flow's velocity); no epsilon/v choice applies


@dataclass(frozen=True)
class EncoderWeights:
    """Where one text encoder's weights are: a file and the key prefix inside it."""

    name: str  # CLIP_L, CLIP_G or T5XXL
    header: CheckpointHeader
    prefix: str


def transformer_prefix(shapes) -> str | None:
    """The MMDiT's key prefix in a file: `model.diffusion_model.` (SAI's files), "" (a bare
    denoiser), or None when the file holds no SD 3 transformer."""
    for prefix in (UNET_PREFIX, ""):
        if prefix + MMDIT_MARKER in shapes:
            return prefix
    return None


def is_sd3_file(shapes) -> bool:
    return transformer_prefix(shapes) is not None


def is_sd3_folder(folder: Path) -> bool:
    """A diffusers folder of an SD 3 pipeline (a `transformer/` and three text encoders)."""
    index_file = Path(folder) / DIFFUSERS_INDEX
    if not index_file.is_file():
        return False
    index = read_json(index_file)
    return str(index.get("_class_name", "")).startswith("StableDiffusion3") or (
        "transformer" in index and "text_encoder_2" in index and "text_encoder_3" in index)


def _indices(shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def transformer_config(shapes, prefix: str) -> dict[str, Any]:
    """diffusers' SD3Transformer2DModel config from an original-layout MMDiT's shapes."""
    p = re.escape(prefix)
    layers = _indices(shapes, p + r"joint_blocks\.(\d+)\.")
    width, in_channels, patch, _ = shapes[prefix + "x_embedder.proj.weight"]
    head_width = SD3.unet_head_width
    positions = shapes[prefix + "pos_embed"][1]
    side = round(positions ** 0.5)
    if side * side != positions or width % head_width:
        raise CheckpointError(f"not an SD 3 transformer: {positions} positions, width {width}")
    dual = [i for i in layers if prefix + f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes]
    qk_norm = prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    return {
        "sample_size": SD3.native_resolution // 8,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": len(layers),
        "attention_head_dim": head_width,
        "num_attention_heads": width // head_width,
        "joint_attention_dim": shapes[prefix + "context_embedder.weight"][1],
        "caption_projection_dim": shapes[prefix + "context_embedder.weight"][0],
        "pooled_projection_dim": shapes[prefix + "y_embedder.mlp.0.weight"][1],
        "out_channels": shapes[prefix + "final_layer.linear.weight"][0] // (patch * patch),
        "pos_embed_max_size": side,
        "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def sd3_variant(config: dict[str, Any]) -> str:
    """What the listing calls the model: SD 3 medium (MMDiT), 3.5 medium (MMDiT-X: second
    attention in the first blocks), 3.5 large (38 blocks, large turbo too: same weights' shape)."""
    if config["num_layers"] >= 38:
        return "SD 3.5 large"
    if config["dual_attention_layers"]:
        return "SD 3.5 medium"
    if config["qk_norm"]:
        return "SD 3.5"
    return "SD 3 medium"


def has_vae(shapes) -> bool:
    return VAE_PREFIX + "decoder.conv_in.weight" in shapes


def vae_config(shapes, prefix: str = VAE_PREFIX, family: Family = SD3) -> dict[str, Any]:
    """The 16-channel AutoencoderKL of SD 3 (and Flux, the same layout): LDM's names without quant
    convs (the latent width is the decoder's input), latents scaled and shifted by the family's factors."""
    latent = shapes[prefix + "decoder.conv_in.weight"][1]
    # infer_vae_config reads the latent width from post_quant_conv, which these VAEs do not have
    with_quant = {**shapes, prefix + "post_quant_conv.weight": (latent, latent, 1, 1)}
    config = infer_vae_config(with_quant, family.latent_scaling_factor, family.native_resolution, prefix=prefix)
    has_quant = prefix + "quant_conv.weight" in shapes
    return {**config, "shift_factor": family.latent_shift_factor, "use_quant_conv": has_quant,
            "use_post_quant_conv": prefix + "post_quant_conv.weight" in shapes}


def clip_config(shapes, name: str, prefix: str) -> dict[str, Any]:
    """CLIPTextModelWithProjection config of SD 3's CLIP-L or CLIP-G (transformers' layout)."""
    spec = encoder_spec(name, prefix)
    config = infer_clip_config(shapes, spec)
    projection = shapes.get(prefix + "text_projection.weight")
    config["projection_dim"] = projection[0] if projection else config["hidden_size"]
    return config


def encoder_spec(name: str, prefix: str) -> TextEncoderSpec:
    """The family's spec of CLIP-L or CLIP-G, at the prefix these weights have."""
    return replace(SD3.text_encoders[(CLIP_L, CLIP_G).index(name)], prefix=prefix)


def t5_config(shapes, prefix: str) -> dict[str, Any]:
    """T5EncoderModel config (T5 v1.1: gated GELU, no bias) from the weights' shapes."""
    p = re.escape(prefix)
    block = prefix + "encoder.block.0.layer."
    buckets, heads = shapes[block + "0.SelfAttention.relative_attention_bias.weight"]
    embed = shapes.get(prefix + "shared.weight") or shapes[prefix + "encoder.embed_tokens.weight"]
    return {
        "vocab_size": embed[0],
        "d_model": embed[1],
        "d_kv": shapes[block + "0.SelfAttention.q.weight"][0] // heads,
        "d_ff": shapes[block + "1.DenseReluDense.wi_0.weight"][0],
        "num_layers": len(_indices(shapes, p + r"encoder\.block\.(\d+)\.")),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": False,
        "use_cache": False,
    }


def encoder_kind(header: CheckpointHeader) -> tuple[str, str] | None:
    """(name, key prefix) of a separate text encoder file, or None: T5 by its blocks, the CLIPs
    by their file name (clip_l / clip_g, as distributed) or else their width (768 / 1280)."""
    shapes = header.shapes
    for prefix in ("", "encoder.", SD3_T5_PREFIX):
        if prefix + "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
            return T5XXL, prefix if prefix != "encoder." else ""
    prefix = next((p for p in ("", "transformer.") if p + "text_model.embeddings.token_embedding.weight" in shapes),
                  None)
    if prefix is None:
        return None
    stem = header.path.name.lower()
    for name in (CLIP_G, CLIP_L):
        if name in stem:
            return name, prefix
    width = shapes[prefix + "text_model.embeddings.token_embedding.weight"][1]
    return {768: (CLIP_L, prefix), 1280: (CLIP_G, prefix)}.get(width)


def encoders_inside(header: CheckpointHeader) -> dict[str, EncoderWeights]:
    """The text encoders an all-in-one file carries."""
    found = {}
    for name in (CLIP_L, CLIP_G, T5XXL):
        prefix = f"text_encoders.{name}.transformer."
        marker = "encoder.block.0.layer.0.SelfAttention.q.weight" if name == T5XXL else \
            "text_model.embeddings.token_embedding.weight"
        if prefix + marker in header.shapes:
            found[name] = EncoderWeights(name, header, prefix)
    return found


def encoder_files(folder: Path | None) -> dict[str, EncoderWeights]:
    """The text encoders in a folder of separate files (the first file of each kind, by name)."""
    found: dict[str, EncoderWeights] = {}
    if folder is None or not Path(folder).is_dir():
        return found
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in SPLIT_FILE_SUFFIXES:
            continue
        try:
            header = read_header(path)
        except (CheckpointError, OSError):
            continue  # a broken neighbour must not stop the model this one is for
        kind = encoder_kind(header)
        if kind and kind[0] not in found:
            found[kind[0]] = EncoderWeights(kind[0], header, kind[1])
    return found


SD3_ENCODER_FILES = "clip_l.safetensors, clip_g.safetensors and, optionally, t5xxl_fp16.safetensors"


def encoder_weights(header: CheckpointHeader) -> EncoderWeights | None:
    """A separate text encoder file's weights (its kind read from names and shapes), or None."""
    kind = encoder_kind(header)
    return EncoderWeights(kind[0], header, kind[1]) if kind else None


def locate_encoders(header: CheckpointHeader, text_encoder_dir: Path | None,
                    required: tuple[str, ...] = REQUIRED_ENCODERS, *, model: str = "an SD 3 transformer",
                    files: str = SD3_ENCODER_FILES,
                    chosen: dict[str, EncoderWeights] | None = None) -> dict[str, EncoderWeights]:
    """The file's own text encoders, completed from `text_encoder_dir`; a clear error naming
    the file, what is missing of `required` and which `files` go where, when any is not found
    (SD 3: CLIP-L and CLIP-G, T5 optional; Flux passes its own). `chosen`: the user's files by
    kind (Forge's "VAE / Text Encoder" pick), which replace both the folder's and the file's own."""
    found = encoders_inside(header)
    if len(found) < 3:  # complete it from the folder: e.g. SD 3 medium "incl_clips" files have no T5
        found = {**encoder_files(text_encoder_dir), **found}
    found = {**found, **(chosen or {})}
    missing = [name for name in required if name not in found]
    if missing:
        where = f"{text_encoder_dir}" if text_encoder_dir else TEXT_ENCODER_FOLDER
        raise CheckpointError(f"{header.path.name}: {model} without its text encoders; missing "
                              f"{', '.join(missing)} (put {files} in {where}/)")
    return found


def inspect_sd3(header: CheckpointHeader) -> ModelSpec:
    """The spec of an SD 3 single file from its header: the transformer's config as the
    `unet_config`, the VAE's where the file has one, the configs of the CLIPs inside."""
    prefix = transformer_prefix(header.shapes)
    try:
        config = transformer_config(header.shapes, prefix)
        vae = vae_config(header.shapes) if has_vae(header.shapes) else {}
        inside = encoders_inside(header)
        encoders = [clip_config(header.shapes, name, inside[name].prefix) for name in REQUIRED_ENCODERS
                    if name in inside]
    except (KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{header.path.name}: incomplete SD 3 checkpoint (missing {exc})") from exc
    declared = declared_resolution(header.metadata)
    return ModelSpec(family=SD3, inpainting=False, prediction_type=FLOW, prediction_source="family default",
                     unet_config=config, vae_config=vae, text_encoder_configs=encoders,
                     native_resolution=declared or SD3.native_resolution, declared_resolution=declared)


def inspect_sd3_folder(folder: Path) -> ModelSpec:
    """The spec of a diffusers SD 3 folder from its config files (no weights read)."""
    folder = Path(folder)
    try:
        transformer = read_json(folder / "transformer" / "config.json")
        vae = read_json(folder / "vae" / "config.json")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder.name}: incomplete SD 3 diffusers folder ({exc})") from exc
    encoders = [read_json(folder / d / "config.json") for d in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if (folder / d / "config.json").is_file()]
    native = int(transformer.get("sample_size", SD3.native_resolution // 8)) * 8
    return ModelSpec(family=SD3, inpainting=False, prediction_type=FLOW, unet_config=transformer, vae_config=vae,
                     text_encoder_configs=encoders, native_resolution=native, prediction_source="family default")


def transformer_working_bytes(config, width: int, height: int, rows: int, itemsize: int,
                              reference: bool = False) -> int:
    """Peak activations of one MMDiT step beyond the weights, for the memory plan: per row
    (images x 2 under CFG) the joint sequence (image patches + 77 CLIP + 256 T5 tokens) through
    a block (q, k, v, attention output, the 4x MLP: about 12 widths a token) plus one head's
    worth of attention scores at a time per head (PyTorch's math attention holds them all).
    Flux (a config with single blocks) packs 2x2 latents into a token and has 512 T5 tokens;
    Kontext's `reference` image adds about as many tokens again (its resolution is near the output's)."""
    if "num_single_layers" in config:
        tokens = (height // 16) * (width // 16) * (2 if reference else 1) + 512
    else:
        patch = config["patch_size"]
        tokens = (height // 8 // patch) * (width // 8 // patch) + 77 + 256
    width_ = config["num_attention_heads"] * config["attention_head_dim"]
    per_row = tokens * width_ * 12 + config["num_attention_heads"] * tokens * tokens
    return rows * per_row * itemsize
