"""Tiny SD 3 models and files for tests (a helper module, not a test file).

The modules are diffusers' and transformers' own classes at tiny widths, following SD 3's
conventions where the loader reads them from shapes: MMDiT head width 64, a 16-channel VAE
without quant convs, CLIP-L and CLIP-G with projections (pooled widths adding up to the
transformer's pooled width), T5 as wide as the transformer's context. Files are written in
SAI's single-file layout by converting the diffusers transformer back (the inverse of
diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`), so loading them runs the
exact code real files do.

    files = write_tiny_sd3(tmp_path)   # all-in-one file, split files, a T5 tokenizer folder
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

TINY_SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
                            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16)
TINY_SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                    layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=64,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
TINY_SD3_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=1, max_position_embeddings=77, projection_dim=32,
                     bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
# a small SentencePiece-style vocabulary: T5's special tokens, then word pieces
T5_PIECES = ["<pad>", "</s>", "<unk>", "▁", *[f"▁{w}" for w in "a cat dog red blue photo of the sky".split()],
             *"abcdefghijklmnopqrstuvwxyz,."]


@dataclass
class TinySD3:
    transformer: object
    vae: object
    clip_l: object
    clip_g: object
    t5: object


@dataclass
class TinySD3Files:
    all_in_one: Path  # transformer + VAE + CLIP-L + CLIP-G + T5, SAI's layout
    transformer_only: Path  # `model.diffusion_model.*` + VAE, no text encoders
    text_encoder_dir: Path  # clip_l / clip_g / t5xxl files and t5_tokenizer/, like models/text_encoder
    tokenizer_dir: Path


def make_tiny_sd3(seed: int = 0, qk_norm: str | None = None, dual_attention_layers=()) -> TinySD3:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER, qk_norm=qk_norm,
                                            dual_attention_layers=tuple(dual_attention_layers))
        vae = AutoencoderKL(**TINY_SD3_VAE)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SD3_CLIP, hidden_act="quick_gelu"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SD3_CLIP, hidden_act="gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=len(T5_PIECES), **TINY_T5))
    return TinySD3(*(m.eval() for m in (transformer, vae, clip_l, clip_g, t5)))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' final adaLN puts (scale, shift) where SAI's has (shift, scale): its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_sai(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel names -> SAI's MMDiT names (no prefix)."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    simple = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
              "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    for ours, theirs in simple.items():
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    for i in range(num_layers):
        b, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        for kind in ("weight", "bias"):
            out[f"{j}x_block.attn.qkv.{kind}"] = torch.cat([state[f"{b}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{j}context_block.attn.qkv.{kind}"] = torch.cat(
                [state[f"{b}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            out[f"{j}x_block.attn.proj.{kind}"] = state[f"{b}attn.to_out.0.{kind}"]
            out[f"{j}x_block.adaLN_modulation.1.{kind}"] = state[f"{b}norm1.linear.{kind}"]
            context_ada = state[f"{b}norm1_context.linear.{kind}"]
            out[f"{j}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(context_ada) if last else context_ada
            out[f"{j}x_block.mlp.fc1.{kind}"] = state[f"{b}ff.net.0.proj.{kind}"]
            out[f"{j}x_block.mlp.fc2.{kind}"] = state[f"{b}ff.net.2.{kind}"]
            if not last:
                out[f"{j}context_block.attn.proj.{kind}"] = state[f"{b}attn.to_add_out.{kind}"]
                out[f"{j}context_block.mlp.fc1.{kind}"] = state[f"{b}ff_context.net.0.proj.{kind}"]
                out[f"{j}context_block.mlp.fc2.{kind}"] = state[f"{b}ff_context.net.2.{kind}"]
            if f"{b}attn2.to_q.{kind}" in state:
                out[f"{j}x_block.attn2.qkv.{kind}"] = torch.cat([state[f"{b}attn2.to_{x}.{kind}"] for x in "qkv"])
                out[f"{j}x_block.attn2.proj.{kind}"] = state[f"{b}attn2.to_out.0.{kind}"]
        norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                 "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
                 "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
        for ours, theirs in norms.items():
            if f"{b}{ours}.weight" in state:
                out[f"{j}{theirs}.weight"] = state[f"{b}{ours}.weight"]
    return out


def write_t5_tokenizer(folder: Path) -> Path:
    """A T5 tokenizer (tokenizers' Unigram, T5's special tokens) over `T5_PIECES`."""
    from transformers import T5TokenizerFast

    vocab = [(piece, 0.0 if i < 3 else -float(i)) for i, piece in enumerate(T5_PIECES)]
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(str(folder))
    return Path(folder)


def sd3_state_dicts(models: TinySD3) -> dict[str, dict[str, torch.Tensor]]:
    """Each part's tensors under its single-file prefix."""
    def prefixed(prefix, state):
        return {prefix + k: v.detach().clone().contiguous() for k, v in state.items()}

    transformer = transformer_to_sai(models.transformer.state_dict(), models.transformer.config.num_layers)
    return {
        "transformer": prefixed("model.diffusion_model.", transformer),
        "vae": prefixed("first_stage_model.", ldm_layout.vae_to_ldm(models.vae.state_dict(), models.vae.config)),
        "clip_l": prefixed("text_encoders.clip_l.transformer.", models.clip_l.state_dict()),
        "clip_g": prefixed("text_encoders.clip_g.transformer.", models.clip_g.state_dict()),
        "t5xxl": prefixed("text_encoders.t5xxl.transformer.", models.t5.state_dict()),
    }


def write_tiny_sd3(folder: Path, models: TinySD3 | None = None, dtype: torch.dtype = torch.float32) -> TinySD3Files:
    """The tiny model as users have it: one all-in-one file, a transformer(+VAE)-only file, and a
    text encoder folder with clip_l / clip_g / t5xxl files (no prefix) and the T5 tokenizer."""
    models = models or make_tiny_sd3()
    parts = {name: {k: v.to(dtype) for k, v in state.items()} for name, state in sd3_state_dicts(models).items()}
    folder = Path(folder)
    checkpoints, encoders = folder / "Stable-diffusion", folder / "text_encoder"
    checkpoints.mkdir(parents=True, exist_ok=True)
    encoders.mkdir(parents=True, exist_ok=True)
    meta = {"sdui.native_resolution": "64"}
    all_in_one = checkpoints / "tiny_sd3_all.safetensors"
    save_file({k: v for state in parts.values() for k, v in state.items()}, str(all_in_one), metadata=meta)
    transformer_only = checkpoints / "tiny_sd3_transformer.safetensors"
    save_file({**parts["transformer"], **parts["vae"]}, str(transformer_only), metadata=meta)
    for name in ("clip_l", "clip_g", "t5xxl"):
        prefix = f"text_encoders.{name}.transformer."
        save_file({k[len(prefix):]: v for k, v in parts[name].items()}, str(encoders / f"{name}.safetensors"))
    tokenizer = write_t5_tokenizer(encoders / "t5_tokenizer")
    write_t5_tokenizer(checkpoints / "t5_tokenizer")  # beside the all-in-one file: its T5 is inside it
    return TinySD3Files(all_in_one, transformer_only, encoders, tokenizer)
