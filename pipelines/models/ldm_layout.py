"""Diffusers/transformers state dicts under the original (LDM / A1111) single-file names.

The mapping is built from the model's config (number of levels, layers per block, which
levels attend), never from a fixed block count, so the same code renames the tiny test
models, the project's own trained model and full-size files (meta tensors included: the
names and shapes of a full-size file can be had without allocating it).

Every tensor is renamed, none is dropped: a key the mapping does not know raises
``KeyError`` instead of silently producing a file that loads half the weights. The names
come without the component's prefix (`families.UNET_PREFIX`, ...); `export` adds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Sub-module renames inside one residual block (diffusers name -> LDM name).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
_VAE_CONV_WEIGHTS = {"q.weight", "k.weight", "v.weight", "proj_out.weight"}


def _config_dict(config: Any) -> dict:
    """Accept a diffusers config (FrozenDict), a plain mapping or a model that has ``.config``."""
    if not isinstance(config, Mapping) and hasattr(config, "config"):
        config = config.config
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a config mapping or a model with .config, got {type(config).__name__}")
    return dict(config)


def _per_level(value: Any, n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} levels")
    return value


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def _indices(keys, prefix: str) -> list[int]:
    """Sorted integer indices ``i`` of keys that start with ``prefix + 'i.'``."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _rename(
    state_dict: Mapping[str, torch.Tensor],
    prefix_map: dict[str, tuple[str, dict[str, str] | None]],
    what: str,
) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching module prefix, then rename the sub-module."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            src = ".".join(parts[:cut])
            if src in prefix_map:
                break
        else:
            unknown.append(key)
            continue
        dst, sub = prefix_map[src]
        rest = ".".join(parts[cut:])
        if sub and rest:
            for old, new in sub.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
        new_key = f"{dst}.{rest}" if rest else dst
        if new_key in out:
            raise ValueError(f"{what}: two tensors map to {new_key!r}")
        out[new_key] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise KeyError(f"{what}: no LDM name for {len(unknown)} tensor(s): {shown}")
    return out


def _unet_prefix_map(cfg: dict, keys) -> dict[str, tuple[str, dict[str, str] | None]]:
    down_types = list(cfg["down_block_types"])
    up_types = list(cfg["up_block_types"])
    levels = len(down_types)
    if len(up_types) != levels:
        raise ValueError("down_block_types and up_block_types differ in length")
    layers = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")

    m: dict[str, tuple[str, dict[str, str] | None]] = {
        "time_embedding.linear_1": ("time_embed.0", None),
        "time_embedding.linear_2": ("time_embed.2", None),
        "conv_in": ("input_blocks.0.0", None),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
        # SDXL-style ADM embedding and class-conditioned U-Nets (label_emb in LDM).
        "add_embedding.linear_1": ("label_emb.0.0", None),
        "add_embedding.linear_2": ("label_emb.0.2", None),
        "class_embedding.linear_1": ("label_emb.0.0", None),
        "class_embedding.linear_2": ("label_emb.0.2", None),
        "class_embedding.weight": ("label_emb.weight", None),
    }

    # Encoder: input_blocks.0 is conv_in, then per level `layers` (resnet[, attention])
    # entries, then one downsampler entry on every level but the last.
    idx = 1
    for level, block_type in enumerate(down_types):
        attn = _has_attention(block_type)
        for j in range(layers[level]):
            m[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{idx}.0", _UNET_RESNET)
            if attn:
                m[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{idx}.1", None)
            idx += 1
        if level != levels - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", None)
            idx += 1

    # Middle: resnet, (attention, resnet)*; a block without attention is resnets only.
    mid_resnets = _indices(keys, "mid_block.resnets.")
    mid_attn = bool(_indices(keys, "mid_block.attentions."))
    for k in mid_resnets:
        m[f"mid_block.resnets.{k}"] = (f"middle_block.{2 * k if mid_attn else k}", _UNET_RESNET)
    for k in _indices(keys, "mid_block.attentions."):
        m[f"mid_block.attentions.{k}"] = (f"middle_block.{2 * k + 1}", None)

    # Decoder: levels reversed, one more layer per level than the encoder; the
    # upsampler sits in the level's last output block after the resnet (and attention).
    idx = 0
    up_layers = list(reversed(layers))
    for level, block_type in enumerate(up_types):
        attn = _has_attention(block_type)
        for j in range(up_layers[level] + 1):
            m[f"up_blocks.{level}.resnets.{j}"] = (f"output_blocks.{idx}.0", _UNET_RESNET)
            if attn:
                m[f"up_blocks.{level}.attentions.{j}"] = (f"output_blocks.{idx}.1", None)
            idx += 1
        if level != levels - 1:
            m[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{idx - 1}.{2 if attn else 1}.conv", None)
    return m


def unet_to_ldm(unet_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> LDM names (without ``model.diffusion_model.``).

    Transformer internals (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj``
    ...) have the same names in both layouts, and tensors are passed through unchanged
    (conv or linear ``proj_in`` alike, 4 or 9 input channels alike).
    """
    cfg = _config_dict(config)
    return _rename(unet_state_dict, _unet_prefix_map(cfg, unet_state_dict.keys()), "U-Net")


def _vae_prefix_map(cfg: dict, keys) -> dict[str, tuple[str, dict[str, str] | None]]:
    m: dict[str, tuple[str, dict[str, str] | None]] = {
        "quant_conv": ("quant_conv", None),
        "post_quant_conv": ("post_quant_conv", None),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        for k in _indices(keys, f"{part}.mid_block.resnets."):
            m[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", _VAE_RESNET)
        for k in _indices(keys, f"{part}.mid_block.attentions."):
            m[f"{part}.mid_block.attentions.{k}"] = (f"{part}.mid.attn_{k + 1}", _VAE_ATTENTION)

    down_levels = len(cfg["down_block_types"])
    up_levels = len(cfg["up_block_types"])
    down_layers = _per_level(cfg.get("layers_per_block", 2), down_levels, "layers_per_block")
    up_layers = list(reversed(_per_level(cfg.get("layers_per_block", 2), up_levels, "layers_per_block")))
    for level in range(down_levels):
        for j in range(down_layers[level]):
            m[f"encoder.down_blocks.{level}.resnets.{j}"] = (f"encoder.down.{level}.block.{j}", _VAE_RESNET)
        m[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", None)
    for level in range(up_levels):
        # diffusers runs up_blocks.0 first (lowest resolution); LDM numbers the decoder
        # levels by resolution like the encoder, so up.0 is the full-resolution level.
        ldm_level = up_levels - 1 - level
        for j in range(up_layers[level] + 1):
            m[f"decoder.up_blocks.{level}.resnets.{j}"] = (f"decoder.up.{ldm_level}.block.{j}", _VAE_RESNET)
        m[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{ldm_level}.upsample.conv", None)
    return m


def vae_to_ldm(vae_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM names (without ``first_stage_model.``).

    Decoder levels are numbered in reverse (diffusers ``up_blocks.0`` is LDM ``up.{n-1}``),
    and the mid attention's linear q/k/v/proj_out weights become 1x1 conv weights.
    """
    cfg = _config_dict(config)
    out = _rename(vae_state_dict, _vae_prefix_map(cfg, vae_state_dict.keys()), "VAE")
    for key, tensor in out.items():
        if ".mid.attn_" in key and ".".join(key.split(".")[-2:]) in _VAE_CONV_WEIGHTS:
            if tensor.ndim == 2:
                out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def clip_to_ldm(text_encoder_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformers ``CLIPTextModel`` state dict -> SD 1.x names (without ``cond_stage_model.transformer.``).

    The names stay Hugging Face CLIP names under ``text_model.``.  transformers >= 5.6
    flattened ``CLIPTextModel`` (no ``text_model.`` wrapper, and ``position_ids`` is a
    non-persistent buffer), so the wrapper is put back here and ``position_ids``
    (int64 ``[1, max_positions]``) is added as real SD 1.x files carry it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in text_encoder_state_dict.items():
        if key.startswith("text_projection.") or key == "text_projection":
            raise KeyError("clip_to_ldm: SD 1.x text encoders have no text_projection")
        name = key if key.startswith("text_model.") else "text_model." + key
        out[name] = tensor
    pos_key = "text_model.embeddings.position_ids"
    emb_key = "text_model.embeddings.position_embedding.weight"
    if pos_key not in out and emb_key in out:
        n = out[emb_key].shape[0]
        out[pos_key] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    return out


def clip_to_open_clip(
    text_encoder_state_dict: Mapping[str, torch.Tensor],
    text_projection: torch.Tensor | None = None,
    logit_scale: float | None = 4.6052,
) -> dict[str, torch.Tensor]:
    """Transformers ``CLIPTextModel[WithProjection]`` state dict -> open_clip text-tower names
    (without the ``cond_stage_model.model.`` / ``conditioner.embedders.N.model.`` prefix).

    q/k/v projections are stacked into ``attn.in_proj_weight``/``in_proj_bias``; the HF
    ``text_projection.weight`` ([dim, width]) becomes open_clip's ``text_projection``
    ([width, dim]). A model without a projection (SD 2.x's encoder) may be given one, since
    real SD 2.x files carry the unused ViT-H projection; ``logit_scale`` (ln 100, as open_clip
    initialises it) is written too, as in real files. Works on meta tensors.
    """
    sd = {}
    for key, tensor in text_encoder_state_dict.items():
        name = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        sd[name] = tensor
    sd.pop("text_model.embeddings.position_ids", None)
    out: dict[str, torch.Tensor] = {}
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer_renames = {
        "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in sd.items():
        if key in simple:
            out[simple[key]] = tensor
            continue
        if key == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
            continue
        prefix = "text_model.encoder.layers."
        if key.startswith(prefix):
            layer, rest = key[len(prefix):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[module[-6]] = tensor
                continue
            if module in layer_renames:
                out[f"transformer.resblocks.{layer}.{layer_renames[module]}.{kind}"] = tensor
                continue
        unknown.append(key)
    if unknown:
        raise KeyError(f"clip_to_open_clip: no open_clip name for {', '.join(unknown[:5])}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"clip_to_open_clip: layer {layer} lacks one of q/k/v {kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "text_projection" not in out and text_projection is not None:
        out["text_projection"] = text_projection
    if logit_scale is not None:
        out["logit_scale"] = torch.tensor(logit_scale, dtype=torch.float32)
    return out
