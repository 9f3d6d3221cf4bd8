"""Build a Flux.1 model's modules offline (diffusers' FluxTransformer2DModel, the 16-channel
AutoencoderKL, CLIP-L, T5-XXL), and load any checkpoint: the dispatch over every family.

Configs come from the shapes (`flux_files`); weights go from the files into modules built on
the meta device through diffusers' single-file converter, with strict checks (`sd3_build`'s
`load_strict`): every weight the module expects is there with its shape. A transformer stored
in fp8 stays in fp8 (lifted to the run dtype layer by layer), a GGUF one stays quantized
(`quantized`); encoders and VAE are cast to the run dtype as they are read. `text_encoders`
and `tokenizers` are CLIP-L then T5.

`check_checkpoint_parts` and `load_checkpoint_components` are what the model cache calls for
any file: Flux here, SD 3.x through `sd3_build`, the U-Net families through `build`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pipelines.models.architecture import infer_clip_config
from pipelines.models.build import build_text_encoder, empty_modules, load_components
from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, TensorSource, no_gc, read_header
from pipelines.models.clip_tokenizer import load_tokenizer
from pipelines.models.families import FLUX, FLUX_VAE_PREFIX, SD3, VAE_PREFIX
from pipelines.models.flux_files import (
    MLP_RATIO,
    check_variant,
    find_flux_vae,
    find_sd3_vae,
    flow_vae_prefix,
    inspect_flux,
    inspect_flux_folder,
    is_flux_file,
    is_flux_folder,
    locate_flux_encoders,
    transformer_prefix,
    vae_prefix,
)
from pipelines.models.gguf_files import is_gguf
from pipelines.models.quantized import load_gguf_transformer, stored_fp8_dtype
from pipelines.models.sd3_build import (
    check_sd3_parts,
    is_sd3_checkpoint,
    load_sd3_components,
    load_strict,
    load_t5,
)
from pipelines.models.sd3_files import CLIP_L, T5XXL, EncoderWeights, has_vae, is_sd3_file, vae_config
from pipelines.models.spec import Components
from pipelines.models.t5_tokenizer import find_t5_tokenizer, load_t5_tokenizer

NOT_TRANSFORMER = (FLUX_VAE_PREFIX, VAE_PREFIX, "text_encoders.")
# diffusers' converter splits each single block's fused linear1 at Flux.1's width (3072, MLP 4x)
CONVERTER_WIDTH = 3072


def split_single_blocks(raw: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Each single block's fused q/k/v/MLP projection split at this model's width, in diffusers'
    names; `raw` keeps meta placeholders of Flux.1's shape for the converter to split instead."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    split = {}
    for i in range(config["num_single_layers"]):
        for kind in ("weight", "bias"):
            key = f"single_blocks.{i}.linear1.{kind}"
            parts = torch.split(raw[key], (width, width, width, MLP_RATIO * width))
            split.update({f"single_transformer_blocks.{i}.{name}.{kind}": part for name, part in zip(names, parts)})
            raw[key] = torch.empty(((3 + MLP_RATIO) * CONVERTER_WIDTH, *raw[key].shape[1:]), device="meta")
    return split


def to_diffusers(raw: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL's transformer names -> diffusers' (through diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # heavy

    split = split_single_blocks(raw, config)
    return {**convert_flux_transformer_checkpoint_to_diffusers(raw), **split}


def load_flux_transformer(source: TensorSource, prefix: str, config: dict, dtype: torch.dtype,
                          fp8_storage: bool = True):
    """Flux's transformer: kept quantized from a GGUF file, kept in fp8 from an fp8 one where the
    device can store fp8 (`fp8_storage`: see quantized.fp8_storage_supported), else at `dtype`."""
    from diffusers import FluxTransformer2DModel  # heavy: only when loading

    if is_gguf(source.header):
        return load_gguf_transformer(source.header, FluxTransformer2DModel, config, dtype, prefix=prefix,
                                     convert=lambda raw: to_diffusers(raw, config))
    with empty_modules():
        transformer = FluxTransformer2DModel(**config)
    keys = [k for k in source.header.shapes if k.startswith(prefix) and not k.startswith(NOT_TRANSFORMER)]
    storage = stored_fp8_dtype(source.header, keys) if fp8_storage else None
    state = to_diffusers({k[len(prefix):]: source.get(k, None if storage else dtype) for k in keys}, config)
    return load_strict(transformer, state, dtype, "the Flux transformer", source.header.path, keep=storage)


def load_flux_vae(source: TensorSource, prefix: str, dtype: torch.dtype, family=FLUX):
    """Flux's VAE (LDM names, no quant convs) under `prefix` of a file; SD 3's with its `family`."""
    from diffusers import AutoencoderKL  # heavy: only when loading
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # heavy: likewise

    shapes = source.header.shapes
    with empty_modules():
        vae = AutoencoderKL(**vae_config(shapes, prefix, family))
    raw = {k[len(prefix):]: source.get(k, dtype) for k in shapes if k.startswith(prefix)}
    return load_strict(vae, convert_ldm_vae_checkpoint(raw, vae.config), dtype, "the VAE", source.header.path)


def load_clip_l(weights: EncoderWeights, dtype: torch.dtype):
    """CLIP-L as Flux reads it: transformers' CLIPTextModel (its pooled output, no projection)."""
    spec = replace(FLUX.text_encoders[0], prefix=weights.prefix)
    config = infer_clip_config(weights.header.shapes, spec)
    encoder = build_text_encoder(config, spec)
    with TensorSource(weights.header) as source:
        state = {k[len(weights.prefix):]: source.get(k, dtype) for k in weights.header.shapes
                 if k.startswith(weights.prefix)}
    # files name the weights under `text_model.`; transformers 5's CLIPTextModel dropped that level
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return load_strict(encoder, state, dtype, "the clip_l text encoder", weights.header.path)


def load_flux_t5(weights: EncoderWeights, dtype: torch.dtype):
    with TensorSource(weights.header) as source:
        return load_t5(weights, source, dtype)


def t5_tokenizer_folder(encoders: dict[str, EncoderWeights], text_encoder_dir: Path | None) -> Path:
    """Where T5's tokenizer is (beside the T5 weights or in the encoder folder), or a CheckpointError
    saying which file is missing and where it goes: no weights file carries it."""
    folder = find_t5_tokenizer(encoders[T5XXL].header.path, text_encoder_dir)
    if folder is None:
        where = text_encoder_dir or "models/text_encoder"
        raise CheckpointError(f"{encoders[T5XXL].header.path.name}: T5's tokenizer is missing; Flux needs it. Put "
                              f"tokenizer.json (from a Flux diffusers folder's tokenizer_2/) in {where}/t5_tokenizer/")
    return folder


def check_flux_parts(header: CheckpointHeader, text_encoder_dir: Path | None = None,
                     has_separate_vae: bool = False,
                     chosen: dict[str, EncoderWeights] | None = None) -> dict[str, EncoderWeights]:
    """Where CLIP-L and T5 of a Flux single file are, or a CheckpointError naming the file and
    what is missing (an encoder, T5's tokenizer, the VAE), from headers only: the model cache
    calls it before evicting anything, so a file that cannot load leaves the loaded models be."""
    if header.format == "diffusers":
        return {}
    check_variant(header.path.name, inspect_flux(header).unet_config)
    encoders = {**locate_flux_encoders(header, text_encoder_dir), **(chosen or {})}  # the user's pick wins
    t5_tokenizer_folder(encoders, text_encoder_dir)
    if not has_separate_vae and vae_prefix(header.shapes) is None:
        raise CheckpointError(f"{header.path.name}: a Flux transformer without its VAE; put Flux's VAE "
                              "(BFL's ae.safetensors, 16 latent channels) in models/VAE, as the one VAE file "
                              "named ae or flux there")
    return encoders


def separate_vae(header: CheckpointHeader, vae_dir: Path | None, chosen_vae: Path | None = None) -> Path | None:
    """The models/VAE file a Flux or SD 3 transformer without its own VAE pairs with: the user's
    `chosen_vae`, else the one found by name (see find_flux_vae, find_sd3_vae), or None."""
    if header.format == "diffusers":
        return None
    if is_flux_file(header.shapes):
        return (chosen_vae or find_flux_vae(vae_dir)) if vae_prefix(header.shapes) is None else None
    if is_sd3_file(header.shapes):
        return (chosen_vae or find_sd3_vae(vae_dir)) if not has_vae(header.shapes) else None
    return None


def load_flow_vae(path: Path, dtype: torch.dtype, family=FLUX):
    """A separate SD 3 / Flux VAE file (16 channels, no quant convs; bare, `vae.` or
    `first_stage_model.` names) with `family`'s scaling and shift."""
    header = read_header(path)
    prefix = flow_vae_prefix(header.shapes)
    if prefix is None:
        raise CheckpointError(f"{Path(path).name}: not a 16-channel {family.label} VAE")
    with TensorSource(header) as source:
        return load_flux_vae(source, prefix, dtype, family)


@no_gc()
def load_flux_components(path: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                         header: CheckpointHeader | None = None, text_encoder_dir: Path | None = None,
                         vae=None, fp8_storage: bool = True,
                         chosen: dict[str, EncoderWeights] | None = None) -> Components:
    """Every module of a Flux single file or diffusers folder. CLIP-L and T5 come from
    `text_encoder_dir` (models/text_encoder) when the file lacks them, or are the user's `chosen`
    files; a separate `vae` module
    (loaded by the caller from models/VAE) when it lacks its VAE. `fp8_storage`: an fp8
    transformer stays in fp8 (False where the device has no fp8 type: cast as read)."""
    path = Path(path)
    header = header or read_header(path)
    if header.format == "diffusers":
        return load_flux_folder(path, dtype, vae_dtype)
    spec = inspect_flux(header)
    encoders = check_flux_parts(header, text_encoder_dir, has_separate_vae=vae is not None, chosen=chosen)
    with TensorSource(header) as source:
        transformer = load_flux_transformer(source, transformer_prefix(header.shapes), spec.unet_config, dtype,
                                            fp8_storage)
        if vae is None:
            vae = load_flux_vae(source, vae_prefix(header.shapes), vae_dtype or dtype)
    modules = [load_clip_l(encoders[CLIP_L], dtype), load_flux_t5(encoders[T5XXL], dtype)]
    tokenizers = [load_tokenizer(FLUX.text_encoders[0]),
                  load_t5_tokenizer(t5_tokenizer_folder(encoders, text_encoder_dir))]
    spec = replace(spec, text_encoder_configs=[m.config.to_dict() for m in modules], vae_config=dict(vae.config))
    return Components(spec=spec, unet=transformer, vae=vae, text_encoders=modules, tokenizers=tokenizers)


def load_flux_folder(folder: Path, dtype: torch.dtype = torch.float32,
                     vae_dtype: torch.dtype | None = None) -> Components:
    """A diffusers Flux pipeline folder, from its own files only."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel  # heavy: only when loading
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel  # heavy: likewise

    folder = Path(folder)
    spec = inspect_flux_folder(folder)
    check_variant(folder.name, spec.unet_config)
    common = {"local_files_only": True}
    try:
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype or dtype, **common)
        encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype, **common),
                    T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype, **common)]
        tokenizers = [CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), **common),
                      load_t5_tokenizer(folder / "tokenizer_2")]
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder.name}: could not load the Flux diffusers folder ({exc})") from exc
    for module in (transformer, vae, *encoders):
        module.eval().requires_grad_(False)
    return Components(spec=spec, unet=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers)


def is_flux_checkpoint(header: CheckpointHeader) -> bool:
    """A Flux single file or diffusers folder (which `load_flux_components` loads)."""
    return is_flux_folder(header.path) if header.format == "diffusers" else is_flux_file(header.shapes)


def is_flow_checkpoint(header: CheckpointHeader) -> bool:
    """A flow-matching transformer (SD 3.x, Flux), not a U-Net."""
    return is_flux_checkpoint(header) or is_sd3_checkpoint(header)


def check_checkpoint_parts(header: CheckpointHeader, text_encoder_dir: Path | None = None,
                           vae_dir: Path | None = None, chosen: dict[str, EncoderWeights] | None = None,
                           chosen_vae: Path | None = None) -> dict[str, EncoderWeights]:
    """Where the text encoders a checkpoint loads are (a CheckpointError naming the file and what
    is missing, otherwise), from headers only; U-Net checkpoints carry all of theirs: {}.
    `vae_dir`: models/VAE, where a Flux or SD 3 transformer without its VAE finds its family's."""
    if is_flux_checkpoint(header):
        return check_flux_parts(header, text_encoder_dir, separate_vae(header, vae_dir, chosen_vae) is not None,
                                chosen)
    if is_sd3_checkpoint(header):
        return check_sd3_parts(header, text_encoder_dir, separate_vae(header, vae_dir, chosen_vae) is not None,
                               chosen)
    return {}


def load_checkpoint_components(path: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                               header: CheckpointHeader | None = None, text_encoder_dir: Path | None = None,
                               vae_dir: Path | None = None, fp8_storage: bool = True, *,
                               chosen: dict[str, EncoderWeights] | None = None, chosen_vae: Path | None = None,
                               **unet_options) -> Components:
    """Any checkpoint's modules: Flux and SD 3.x here, the U-Net families through
    `build.load_components` (`unet_options`: its channels-last switches and `probe`).
    `fp8_storage`: a flow transformer stored in fp8 stays in fp8 (False where the device has
    no fp8 type, e.g. MPS: see quantized.fp8_storage_supported)."""
    path = Path(path)
    header = header or read_header(path)
    vae_file = separate_vae(header, vae_dir, chosen_vae)
    if is_flux_checkpoint(header):
        vae = load_flow_vae(vae_file, vae_dtype or dtype) if vae_file else None
        return load_flux_components(path, dtype, vae_dtype, header=header, text_encoder_dir=text_encoder_dir,
                                    vae=vae, fp8_storage=fp8_storage, chosen=chosen)
    if is_sd3_checkpoint(header):
        vae = load_flow_vae(vae_file, vae_dtype or dtype, SD3) if vae_file else None
        return load_sd3_components(path, dtype, vae_dtype, header=header, text_encoder_dir=text_encoder_dir,
                                   vae=vae, fp8_storage=fp8_storage, chosen=chosen)
    return load_components(path, dtype, vae_dtype, header=header, **unet_options)
