"""Build an SD 3 / 3.5 model's modules offline: the MMDiT (diffusers' SD3Transformer2DModel),
the 16-channel AutoencoderKL, CLIP-L and CLIP-G with their projections, and T5-XXL.

Configs come from the shapes (`sd3_files`); weights go from the files into modules built on
the meta device, through diffusers' own single-file converters, with strict checks: every
weight the module expects is there with its shape. A transformer stored in fp8 (e4m3fn /
e5m2) stays in fp8 and is lifted to the run dtype layer by layer; a GGUF one stays quantized
(`quantized`); the encoders and VAE are cast to the run dtype as they are read. The
transformer sits in `Components.unet`, so the cache, memory plans and offload treat it like
any denoiser; `text_encoders` and `tokenizers` are CLIP-L, CLIP-G, then T5 when it is
available (weights and tokenizer).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pipelines.models.build import build_text_encoder, empty_modules
from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, TensorSource, no_gc, read_header
from pipelines.models.clip_tokenizer import load_tokenizer
from pipelines.models.families import VAE_PREFIX
from pipelines.models.gguf_files import is_gguf
from pipelines.models.quantized import keep_fp8, load_gguf_transformer, stored_fp8_dtype
from pipelines.models.sd3_files import (
    CLIP_G,
    CLIP_L,
    REQUIRED_ENCODERS,
    T5XXL,
    EncoderWeights,
    clip_config,
    encoder_spec,
    has_vae,
    inspect_sd3,
    inspect_sd3_folder,
    is_sd3_file,
    is_sd3_folder,
    locate_encoders,
    t5_config,
    transformer_prefix,
    vae_config,
)
from pipelines.models.spec import Components
from pipelines.models.t5_tokenizer import find_t5_tokenizer, load_t5_tokenizer


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
                path: Path, keep: torch.dtype | None = None) -> torch.nn.Module:
    """Put `state` into the meta-built `module` (cast to `dtype`): every expected weight with
    its shape, or a CheckpointError naming the file, the part and the first bad weight.
    `keep`: the fp8 dtype the weights stored in it stay in (computed in `dtype` layer by layer)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path.name}: {what} is missing {len(missing)} weights, e.g. {missing[0]}")
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"{path.name}: {what} weight {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                              f"expected {tuple(expected[bad[0]].shape)}")
    state = {k: v for k, v in state.items() if k in expected}
    if keep is not None:
        return keep_fp8(module, state, dtype, keep)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_transformer(source: TensorSource, prefix: str, config: dict, dtype: torch.dtype,
                     fp8_storage: bool = True):
    """The MMDiT: kept quantized from a GGUF file, kept in fp8 from an fp8 one where the device
    can store fp8 (`fp8_storage`: see quantized.fp8_storage_supported), else at `dtype`."""
    from diffusers import SD3Transformer2DModel  # heavy: only when loading
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    if is_gguf(source.header):
        return load_gguf_transformer(source.header, SD3Transformer2DModel, config, dtype, prefix=prefix)
    with empty_modules():
        transformer = SD3Transformer2DModel(**config)
    keys = [k for k in source.header.shapes if k.startswith(prefix) and not k.startswith(VAE_PREFIX)
            and not k.startswith("text_encoders.")]
    storage = stored_fp8_dtype(source.header, keys) if fp8_storage else None
    raw = {k[len(prefix):]: source.get(k, None if storage else dtype) for k in keys}
    state = convert_sd3_transformer_checkpoint_to_diffusers(raw)
    return load_strict(transformer, state, dtype, "the SD 3 transformer", source.header.path, keep=storage)


def load_sd3_vae(source: TensorSource, dtype: torch.dtype):
    from diffusers import AutoencoderKL  # heavy: only when loading
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with empty_modules():
        vae = AutoencoderKL(**vae_config(source.header.shapes))
    raw = {k: source.get(k, dtype) for k in source.header.shapes if k.startswith(VAE_PREFIX)}
    return load_strict(vae, convert_ldm_vae_checkpoint(raw, vae.config), dtype, "the VAE", source.header.path)


def load_clip(weights: EncoderWeights, source: TensorSource, dtype: torch.dtype):
    """CLIP-L or CLIP-G with projection; a file without `text_projection` (some CLIP-L files)
    gets the identity, which is what such a projection-less encoder's pooled output means."""
    config = clip_config(weights.header.shapes, weights.name, weights.prefix)
    encoder = build_text_encoder(config, encoder_spec(weights.name, weights.prefix))
    state = {k[len(weights.prefix):]: source.get(k, dtype) for k in weights.header.shapes
             if k.startswith(weights.prefix)}
    state.setdefault("text_projection.weight", torch.eye(config["hidden_size"], dtype=dtype))
    return load_strict(encoder, state, dtype, f"the {weights.name} text encoder", weights.header.path)


def load_t5(weights: EncoderWeights, source: TensorSource, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel  # heavy: only when loading

    with empty_modules():
        encoder = T5EncoderModel(T5Config(**t5_config(weights.header.shapes, weights.prefix)))
    state = {k[len(weights.prefix):]: source.get(k, dtype) for k in weights.header.shapes
             if k.startswith(weights.prefix)}
    # the input embedding is stored once (shared) or under the encoder's name; the model ties both
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if embedding is not None:
        state.setdefault("shared.weight", embedding)
        state.setdefault("encoder.embed_tokens.weight", embedding)
    return load_strict(encoder, state, dtype, "the t5xxl text encoder", weights.header.path)


def load_encoder(weights: EncoderWeights, dtype: torch.dtype):
    """CLIP-L / CLIP-G (with projection) or T5-XXL, from its file."""
    with TensorSource(weights.header) as source:
        return (load_t5 if weights.name == T5XXL else load_clip)(weights, source, dtype)


def check_sd3_parts(header: CheckpointHeader, text_encoder_dir: Path | None = None,
                    has_separate_vae: bool = False,
                    chosen: dict[str, EncoderWeights] | None = None) -> dict[str, EncoderWeights]:
    """Where each text encoder of an SD 3 single file is, or a CheckpointError naming the file
    and what is missing (CLIP-L, CLIP-G, the VAE), from headers only: the model cache calls it
    before evicting anything, so a file that cannot load leaves the loaded models as they were.
    `chosen`: the user's encoder files by kind, used instead of the automatic pairing."""
    if header.format == "diffusers":
        return {}
    encoders = locate_encoders(header, text_encoder_dir, chosen=chosen)
    if not has_separate_vae and not has_vae(header.shapes):
        raise CheckpointError(f"{header.path.name}: an SD 3 transformer without its VAE; put SD 3's VAE "
                              "(16 latent channels) in models/VAE, as the one VAE file with sd3 in its name "
                              "(e.g. sd3_vae.safetensors)")
    return encoders


@no_gc()
def load_sd3_components(path: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                        header: CheckpointHeader | None = None, text_encoder_dir: Path | None = None,
                        vae=None, fp8_storage: bool = True,
                        chosen: dict[str, EncoderWeights] | None = None) -> Components:
    """Every module of an SD 3.x single file or diffusers folder. Separate text encoders come
    from `text_encoder_dir` (models/text_encoder) when the file lacks them, or are the user's
    `chosen` files; a separate `vae` module (loaded by the caller from models/VAE) when it lacks
    its VAE. `fp8_storage`: an fp8 transformer stays in fp8 (False where the device has no fp8
    type: cast as read)."""
    path = Path(path)
    header = header or read_header(path)
    if header.format == "diffusers":
        return load_sd3_folder(path, dtype, vae_dtype)
    spec = inspect_sd3(header)
    encoders = check_sd3_parts(header, text_encoder_dir, has_separate_vae=vae is not None, chosen=chosen)
    with TensorSource(header) as source:
        transformer = load_transformer(source, transformer_prefix(header.shapes), spec.unet_config, dtype,
                                       fp8_storage)
        if vae is None:
            vae = load_sd3_vae(source, vae_dtype or dtype)
    modules = [load_encoder(encoders[name], dtype) for name in REQUIRED_ENCODERS]
    tokenizers = [load_tokenizer(encoder_spec(name, "")) for name in (CLIP_L, CLIP_G)]
    t5 = encoders.get(T5XXL)
    tokenizer_folder = find_t5_tokenizer(t5.header.path, text_encoder_dir) if t5 else None
    if t5 and tokenizer_folder:
        modules.append(load_encoder(t5, dtype))
        tokenizers.append(load_t5_tokenizer(tokenizer_folder))
    configs = [m.config.to_dict() for m in modules]
    spec = replace(spec, text_encoder_configs=configs, vae_config=dict(vae.config))
    return Components(spec=spec, unet=transformer, vae=vae, text_encoders=modules, tokenizers=tokenizers)


def load_sd3_folder(folder: Path, dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype | None = None) -> Components:
    """A diffusers SD 3 pipeline folder, from its own files only; T5 where the folder has it."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel  # heavy: only when loading
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel  # heavy: likewise

    folder = Path(folder)
    if not is_sd3_folder(folder):
        raise CheckpointError(f"{folder.name}: not an SD 3 diffusers folder")
    common = {"local_files_only": True}
    try:
        transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype or dtype, **common)
        encoders = [CLIPTextModelWithProjection.from_pretrained(folder / d, torch_dtype=dtype, **common)
                    for d in ("text_encoder", "text_encoder_2")]
        tokenizers = [CLIPTokenizer.from_pretrained(str(folder / d), **common) for d in ("tokenizer", "tokenizer_2")]
        if (folder / "text_encoder_3" / "config.json").is_file() and find_t5_tokenizer(folder / "tokenizer_3"):
            encoders.append(T5EncoderModel.from_pretrained(folder / "text_encoder_3", torch_dtype=dtype, **common))
            tokenizers.append(load_t5_tokenizer(folder / "tokenizer_3"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder.name}: could not load the SD 3 diffusers folder ({exc})") from exc
    for module in (transformer, vae, *encoders):
        module.eval().requires_grad_(False)
    return Components(spec=inspect_sd3_folder(folder), unet=transformer, vae=vae, text_encoders=encoders,
                      tokenizers=tokenizers)


def is_sd3_checkpoint(header: CheckpointHeader) -> bool:
    """An SD 3.x single file or diffusers folder (which `load_sd3_components` loads)."""
    return is_sd3_folder(header.path) if header.format == "diffusers" else is_sd3_file(header.shapes)
