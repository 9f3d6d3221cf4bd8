"""Tiny Flux.1 models and files for tests (a helper module, not a test file).

The modules are diffusers' and transformers' own classes at tiny widths, following Flux's
conventions where the loader reads them from shapes: a 64-wide transformer of 32-wide heads
(rotary axes split as Flux.1's 16/56/56 of 128), a 16-channel VAE without quant convs, CLIP-L
(its pooled output as the vector input) and T5 as wide as the transformer's context. Files are
written in BFL's layout by converting the diffusers transformer back (the inverse of diffusers'
`convert_flux_transformer_checkpoint_to_diffusers`), so loading them runs the code real files do.

    files = write_tiny_flux(tmp_path)   # all-in-one, split files, a T5 tokenizer folder
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

try:
    from pipelines.models import ldm_layout
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipelines.models import ldm_layout

try:
    from tiny_sd3 import T5_PIECES, TINY_SD3_CLIP, TINY_SD3_VAE, TINY_T5, write_t5_tokenizer
except ImportError:
    from tests.tiny_sd3 import T5_PIECES, TINY_SD3_CLIP, TINY_SD3_VAE, TINY_T5, write_t5_tokenizer

TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                             num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                             axes_dims_rope=(4, 14, 14))
TINY_FLUX_FILL_INPUT = 384  # Fill: 64 packed latents + 64 packed masked-image latents + 256 packed mask pixels
TINY_FLUX_VAE = {**TINY_SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}


@dataclass
class TinyFlux:
    transformer: object
    vae: object
    clip_l: object
    t5: object


@dataclass
class TinyFluxFiles:
    all_in_one: Path  # ComfyUI/Forge "checkpoint": transformer + `vae.` + clip_l + t5xxl
    transformer_vae: Path  # `model.diffusion_model.*` + `vae.*`: encoders in the text encoder folder
    bare: Path  # BFL's flux1-*.safetensors: the transformer alone, no prefix
    vae: Path  # BFL's ae.safetensors
    text_encoder_dir: Path  # clip_l / t5xxl files and t5_tokenizer/, like models/text_encoder


def make_tiny_flux(seed: int = 0, guidance: bool = True, in_channels: int = 64) -> TinyFlux:
    """dev's shape with `guidance` (a guidance embedder), schnell's without; `in_channels`
    TINY_FLUX_FILL_INPUT: Fill's (a wider `img_in`: masked image and mask beside the latents)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        latent_channels = TINY_FLUX_TRANSFORMER["in_channels"]  # what it predicts, whatever it takes in
        transformer = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, "in_channels": in_channels},
                                             out_channels=latent_channels, guidance_embeds=guidance)
        vae = AutoencoderKL(**TINY_FLUX_VAE)
        clip_l = CLIPTextModel(CLIPTextConfig(**TINY_SD3_CLIP, hidden_act="quick_gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=len(T5_PIECES), **TINY_T5))
    return TinyFlux(*(m.eval() for m in (transformer, vae, clip_l, t5)))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' final adaLN holds (scale, shift) where BFL's has (shift, scale): its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_bfl(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel names -> BFL's names (no prefix)."""
    simple = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
              "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
              "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    out = {}
    for kind in ("weight", "bias"):
        for ours, theirs in simple.items():
            if f"{ours}.{kind}" in state:
                out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
        for i in range(config.num_layers):
            b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            for ours, theirs in double.items():
                out[f"{d}{theirs}.{kind}"] = state[f"{b}{ours}.{kind}"]
            out[f"{d}img_attn.qkv.{kind}"] = torch.cat([state[f"{b}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{d}txt_attn.qkv.{kind}"] = torch.cat([state[f"{b}attn.add_{x}_proj.{kind}"] for x in "qkv"])
        for i in range(config.num_single_layers):
            b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[f"{s}modulation.lin.{kind}"] = state[f"{b}norm.linear.{kind}"]
            out[f"{s}linear1.{kind}"] = torch.cat([state[f"{b}{name}.{kind}"] for name in
                                                   ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
            out[f"{s}linear2.{kind}"] = state[f"{b}proj_out.{kind}"]
    for i in range(config.num_layers):
        for ours, theirs in norms.items():
            out[f"double_blocks.{i}.{theirs}.scale"] = state[f"transformer_blocks.{i}.{ours}.weight"]
    for i in range(config.num_single_layers):
        for x in "qk":
            name = "query_norm" if x == "q" else "key_norm"
            out[f"single_blocks.{i}.norm.{name}.scale"] = state[f"single_transformer_blocks.{i}.attn.norm_{x}.weight"]
    return out


def flux_state_dicts(models: TinyFlux) -> dict[str, dict[str, torch.Tensor]]:
    """Each part's tensors without prefix: BFL's transformer, LDM's VAE, transformers' encoders."""
    def copied(state):
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    # under `text_model.` as in real clip_l files (transformers 5's CLIPTextModel dropped that level)
    clip = {("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in copied(models.clip_l.state_dict()).items()}
    hidden = models.clip_l.config.hidden_size  # real clip_l files also carry a projection Flux does not use
    clip["text_projection.weight"] = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(1))
    return {
        "transformer": copied(transformer_to_bfl(models.transformer.state_dict(), models.transformer.config)),
        "vae": copied(ldm_layout.vae_to_ldm(models.vae.state_dict(), models.vae.config)),
        "clip_l": clip,
        "t5xxl": copied(models.t5.state_dict()),
    }


def write_tiny_flux(folder: Path, models: TinyFlux | None = None, dtype: torch.dtype = torch.float32,
                    stem: str = "tiny_flux") -> TinyFluxFiles:
    """The tiny model as users have it: an all-in-one file, a transformer + VAE file, BFL's bare
    transformer and ae.safetensors, and a text encoder folder (clip_l, t5xxl, the T5 tokenizer).
    `stem` starts the checkpoints' names ("tiny_flux_kontext": files named as Kontext's are)."""
    models = models or make_tiny_flux()
    parts = {name: {k: v.to(dtype) for k, v in state.items()} for name, state in flux_state_dicts(models).items()}
    folder = Path(folder)
    checkpoints, encoders, vaes = folder / "Stable-diffusion", folder / "text_encoder", folder / "VAE"
    for place in (checkpoints, encoders, vaes):
        place.mkdir(parents=True, exist_ok=True)

    def prefixed(prefix, state):
        return {prefix + k: v for k, v in state.items()}

    meta = {"sdui.native_resolution": "64"}
    transformer, vae = prefixed("model.diffusion_model.", parts["transformer"]), prefixed("vae.", parts["vae"])
    all_in_one = checkpoints / f"{stem}_all.safetensors"
    save_file({**transformer, **vae, **prefixed("text_encoders.clip_l.transformer.", parts["clip_l"]),
               **prefixed("text_encoders.t5xxl.transformer.", parts["t5xxl"])}, str(all_in_one), metadata=meta)
    transformer_vae = checkpoints / f"{stem}_transformer_vae.safetensors"
    save_file({**transformer, **vae}, str(transformer_vae), metadata=meta)
    bare = checkpoints / f"{stem}_bare.safetensors"
    save_file(parts["transformer"], str(bare), metadata=meta)
    ae = vaes / "ae.safetensors"
    save_file(parts["vae"], str(ae))
    save_file(parts["clip_l"], str(encoders / "clip_l.safetensors"))
    save_file(parts["t5xxl"], str(encoders / "t5xxl_fp16.safetensors"))
    write_t5_tokenizer(encoders / "t5_tokenizer")
    write_t5_tokenizer(checkpoints / "t5_tokenizer")  # beside the all-in-one file: its T5 is inside it
    return TinyFluxFiles(all_in_one, transformer_vae, bare, ae, encoders)


def picture_and_mask(size: int, disc: tuple[int, int, int], masked: tuple[slice, slice]):
    """A smooth picture with structure (a gradient and a `disc`-coloured disc) and an "L" mask, white
    over `masked` (rows, columns): the inputs the Fill and Kontext tests give both pipelines."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.float64)
    rgb[(x - 40) ** 2 + (y - 30) ** 2 < 150] = disc
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[masked] = 255
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), Image.fromarray(mask, "L")
