"""Tiny LoRA files for the tiny SD 3 and Flux models, in the layouts trainers write (a helper module,
not a test file).

- diffusers/peft (diffusers' trainers, ai-toolkit's diffusers output): ``transformer.<diffusers module
  path>.lora_A.weight`` / ``.lora_B.weight`` (peft's A is down, B is up, scale 1), text encoders under
  ``text_encoder.`` (CLIP-L) and ``text_encoder_2.`` (SD 3's CLIP-G);
- kohya/sd-scripts: ``lora_unet_<original module path, dots as underscores>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` over BFL's Flux names (``double_blocks_0_img_attn_qkv``) or SAI's
  MMDiT names (``joint_blocks_0_x_block_attn_qkv``), CLIPs as ``lora_te1_``/``lora_te2_``;
- BFL/ComfyUI: ``diffusion_model.<original module path>.lora_A.weight`` / ``.lora_B.weight``.
The original names come from the tiny models' own writers (`tiny_flux.transformer_to_bfl`,
`tiny_sd3.transformer_to_sai`), so a fused layer (qkv) is exactly what those files hold.
"""

from __future__ import annotations

import torch

try:
    from tiny_flux import transformer_to_bfl
    from tiny_sd3 import transformer_to_sai
except ImportError:
    from tests.tiny_flux import transformer_to_bfl
    from tests.tiny_sd3 import transformer_to_sai

RANK = 4


def _randn(shape, g: torch.Generator, scale: float) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def original_linears(transformer, family: str) -> dict[str, tuple[int, int]]:
    """{module path in the original (BFL / SAI) layout: (out, in)} of the transformer's 2-D weights."""
    state = transformer.state_dict()
    named = transformer_to_bfl(state, transformer.config) if family == "flux" else \
        transformer_to_sai(state, transformer.config.num_layers)
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in named.items()
            if k.endswith(".weight") and v.ndim == 2 and not k.startswith("pos_embed")}


def clip_linears(encoder) -> dict[str, tuple[int, int]]:
    """{kohya's CLIP path (under ``text_model.``): (out, in)} of the attention and MLP layers."""
    out = {}
    for name, m in encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            path = name if name.startswith("text_model.") else "text_model." + name
            out[path] = (m.out_features, m.in_features)
    return out


def kohya_lora(layers: dict[str, tuple[int, int]], prefix: str, seed: int = 0, scale: float = 0.3,
               alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """kohya: lora_down (rank, in), lora_up (out, rank), alpha (the delta is up @ down * alpha / rank)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (o, i) in layers.items():
        key = prefix + path.replace(".", "_")
        out[key + ".lora_down.weight"] = _randn((RANK, i), g, scale)
        out[key + ".lora_up.weight"] = _randn((o, RANK), g, scale)
        out[key + ".alpha"] = torch.tensor(alpha)
    return out


def peft_lora(layers: dict[str, tuple[int, int]], prefix: str, seed: int = 0,
              scale: float = 0.3) -> dict[str, torch.Tensor]:
    """peft: lora_A (rank, in), lora_B (out, rank), no alpha (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (o, i) in layers.items():
        out[f"{prefix}{path}.lora_A.weight"] = _randn((RANK, i), g, scale)
        out[f"{prefix}{path}.lora_B.weight"] = _randn((o, RANK), g, scale)
    return out


def diffusers_attention(transformer) -> dict[str, tuple[int, int]]:
    """{diffusers module path: (out, in)} of every attention and feed-forward Linear of the blocks."""
    return {name: (m.out_features, m.in_features) for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name
            and (".attn." in name or ".ff" in name or name.endswith((".proj_mlp", ".proj_out")))}


def shared_qkv_down(peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`peft` with k and v taking q's lora_A in each attention (what a fused qkv layer of kohya's is)."""
    out = dict(peft)
    for key in peft:
        for q, others in ((".to_q.", (".to_k.", ".to_v.")), (".add_q_proj.", (".add_k_proj.", ".add_v_proj."))):
            if q in key and key.endswith(".lora_A.weight"):
                out.update({key.replace(q, other): peft[key].clone() for other in others})
    return out


def sd3_kohya_from_peft(peft: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """The same SD 3 LoRA as sd-scripts writes it, from a peft file whose q, k and v share one lora_A
    per attention: SAI's fused qkv takes the three lora_Bs stacked and the shared lora_A, alpha = rank.
    Built through `transformer_to_sai`, the tiny model's own writer of SAI's layout."""
    state = transformer.state_dict()
    prefix = "transformer."
    ups = {**state, **{k[len(prefix):].replace(".lora_B.weight", ".weight"): v
                       for k, v in peft.items() if k.endswith(".lora_B.weight")}}
    downs = {**state, **{k[len(prefix):].replace(".lora_A.weight", ".weight"): v
                         for k, v in peft.items() if k.endswith(".lora_A.weight")}}
    layers = transformer.config.num_layers
    sai_ups, sai_downs = transformer_to_sai(ups, layers), transformer_to_sai(downs, layers)
    out = {}
    for key, up in sai_ups.items():
        if not key.endswith(".weight") or up.ndim != 2 or up.shape[1] != RANK:
            continue  # not a LoRA layer: the model's own weight
        name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
        out[name + ".lora_up.weight"] = up
        out[name + ".lora_down.weight"] = sai_downs[key][:RANK]  # qkv: the shared lora_A, stacked 3 times
        out[name + ".alpha"] = torch.tensor(float(RANK))
    return out
