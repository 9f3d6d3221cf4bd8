"""What the weights of an original-layout (LDM / A1111) file say about the architecture.

Each component's diffusers/transformers config is read from tensor names and shapes (channel
counts, depths, attention placement, context width, ADM input width), so tiny test files and
real ones take the same path; what shapes cannot tell (heads, the conditioning layer) comes
from the `Family`. Also here: which U-Net weights are a full file's EMA copy, and the rename
of open_clip text towers to transformers' CLIP names.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pipelines.models.families import (
    EMA_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Family,
    TextEncoderSpec,
    UnsupportedCheckpoint,
)


def _indices(shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def infer_unet_config(shapes: dict[str, tuple], family: Family, prefix: str = UNET_PREFIX) -> dict[str, Any]:
    def shape(key: str) -> tuple[int, ...]:
        return shapes[prefix + key]

    p = re.escape(prefix)
    input_blocks = _indices(shapes, p + r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in input_blocks if prefix + f"input_blocks.{i}.0.op.weight" in shapes]
    layers_per_block = (downsamplers[0] if downsamplers else len(input_blocks)) - 1
    levels = len(downsamplers) + 1
    channels, attention, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (layers_per_block + 1)
        channels.append(shape(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        has_attn = prefix + f"input_blocks.{first}.1.proj_in.weight" in shapes
        attention.append(has_attn)
        depths.append(len(_indices(shapes, p + rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")))
    # diffusers gives the middle block the last level's depth; a level without attention
    # (SDXL refiner's last level) carries the middle block's depth for that reason
    mid_depth = len(_indices(shapes, p + r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    depths = [d if a else mid_depth for d, a in zip(depths, attention)]
    if depths[-1] != mid_depth:
        raise UnsupportedCheckpoint(f"U-Net middle block depth {mid_depth} differs from the last level's {depths[-1]}")
    attn_keys = [k for k in shapes if k.startswith(prefix) and k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise UnsupportedCheckpoint("U-Net without cross-attention layers")
    cross_dim = shapes[attn_keys[0]][1]
    proj_in = next(k for k in shapes if k.startswith(prefix) and k.endswith("proj_in.weight"))
    if family.unet_heads is not None:
        heads = [family.unet_heads] * levels
    else:
        heads = [max(1, c // family.unet_head_width) for c in channels]
    config = {
        "sample_size": family.native_resolution // 8,
        "in_channels": shape("input_blocks.0.0.weight")[1],
        "out_channels": shape("out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": depths,
        "cross_attention_dim": cross_dim,
        # diffusers' historical naming: for these U-Nets attention_head_dim is the head count
        "attention_head_dim": heads,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "norm_num_groups": 32,
        "upcast_attention": family.upcast_attention,
    }
    adm_key = prefix + "label_emb.0.0.weight"
    if adm_key in shapes:
        if family.time_ids is None:
            raise UnsupportedCheckpoint(f"{family.label} U-Net with an unexpected class embedding (label_emb)")
        adm_in = shapes[adm_key][1]
        pooled = _pooled_dim(shapes, family)
        n_ids = 6 if family.time_ids == "size_crop_target" else 5
        if (adm_in - pooled) % n_ids or adm_in <= pooled:
            raise UnsupportedCheckpoint(f"ADM input width {adm_in} does not fit {n_ids} time ids + pooled {pooled}")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled) // n_ids,
                      projection_class_embeddings_input_dim=adm_in)
    elif family.time_ids is not None:
        raise UnsupportedCheckpoint(f"{family.label} U-Net without its size conditioning (label_emb)")
    return config


def _pooled_dim(shapes, family: Family) -> int:
    spec = next(s for s in family.text_encoders if s.pooled)
    return shapes[spec.prefix + "text_projection"][1]


def infer_vae_config(shapes: dict[str, tuple], scaling_factor: float, sample_size: int = 512,
                     prefix: str = VAE_PREFIX) -> dict[str, Any]:
    return _vae_config(shapes, prefix, scaling_factor, sample_size, down="down", block="block")


def _vae_config(shapes, prefix: str, scaling_factor: float, sample_size: int, *, down: str,
                block: str) -> dict[str, Any]:
    """AutoencoderKL config from shapes; `down`/`block` name the encoder levels and their resnets
    ("down"/"block" in original files, "down_blocks"/"resnets" in diffusers folders)."""
    p = re.escape(prefix)
    levels = _indices(shapes, p + rf"encoder\.{down}\.(\d+)\.")
    if not levels:
        raise UnsupportedCheckpoint(f"no VAE weights ({prefix}encoder.*)")
    layers = len(_indices(shapes, p + rf"encoder\.{down}\.0\.{block}\.(\d+)\."))
    channels = [shapes[prefix + f"encoder.{down}.{i}.{block}.{layers - 1}.conv2.weight"][0] for i in levels]
    return {
        "in_channels": shapes[prefix + "encoder.conv_in.weight"][1],
        "out_channels": shapes[prefix + "decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": shapes[prefix + "post_quant_conv.weight"][0],
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


def _clip_common(vocab: int, hidden: int, intermediate: int, layers: int, positions: int, act: str) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),  # CLIP/OpenCLIP text encoders use head width 64
        "max_position_embeddings": positions,
        "hidden_act": act,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def infer_clip_config(shapes: dict[str, tuple], spec: TextEncoderSpec) -> dict[str, Any]:
    if spec.layout == "open_clip":
        p = spec.prefix
        vocab, hidden = shapes[p + "token_embedding.weight"]
        layers = _indices(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        config = _clip_common(vocab, hidden, shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                              len(layers), shapes[p + "positional_embedding"][0], spec.hidden_act)
        if spec.pooled:
            config["projection_dim"] = shapes[p + "text_projection"][1]
        return config
    p = spec.prefix + "text_model."
    if p + "embeddings.token_embedding.weight" not in shapes:
        p = spec.prefix  # older files: no `text_model.` level
    vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
    layers = _indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    return _clip_common(vocab, hidden, shapes[p + "encoder.layers.0.mlp.fc1.weight"][0], len(layers),
                        shapes[p + "embeddings.position_embedding.weight"][0], spec.hidden_act)


def diffusers_vae_config(shapes, prefix: str, scaling_factor: float, sample_size: int) -> dict[str, Any]:
    """AutoencoderKL config of a VAE file already in diffusers' layout."""
    return _vae_config(shapes, prefix, scaling_factor, sample_size, down="down_blocks", block="resnets")


def unet_ema_keys(shapes) -> dict[str, str] | None:
    """LDM U-Net name -> its EMA copy's name, when the file is a full (EMA + training) one."""
    if sum(1 for k in shapes if k.startswith(EMA_PREFIX)) <= 100:
        return None
    mapping = {}
    for key in shapes:
        if key.startswith(UNET_PREFIX):
            # model.diffusion_model.a.b -> model_ema.diffusion_modelab
            ema = EMA_PREFIX + key[len("model."):].replace(".", "")
            if ema not in shapes or shapes[ema] != shapes[key]:
                return None
            mapping[key] = ema
    return mapping or None


def open_clip_to_hf(state: dict[str, torch.Tensor], prefix: str, pooled: bool) -> dict[str, torch.Tensor]:
    """open_clip text tower names -> transformers CLIPTextModel(WithProjection) names, as views.

    `attn.in_proj_weight` holds q, k and v stacked; `text_projection` is [width, dim] where
    transformers' Linear weight is [dim, width]. `logit_scale` and (unless pooled) the
    projection are not part of the text model.
    """
    s = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {
        "text_model.embeddings.token_embedding.weight": s["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": s["positional_embedding"],
        "text_model.final_layer_norm.weight": s["ln_final.weight"],
        "text_model.final_layer_norm.bias": s["ln_final.bias"],
    }
    if pooled:
        out["text_projection.weight"] = s["text_projection"].t().contiguous()
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    rx = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, tensor in s.items():
        m = rx.match(key.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias"))
        if not m:
            continue
        layer, module, kind = m.groups()
        base = f"text_model.encoder.layers.{layer}."
        if module == "attn.in_proj":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part
        elif module in renames:
            out[f"{base}{renames[module]}.{kind}"] = tensor
    return out
