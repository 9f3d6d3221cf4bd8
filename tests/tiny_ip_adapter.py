"""Tiny IP-Adapters and CLIP vision encoders in the real files' layouts (a helper module, not a test file).

- the encoder: a CLIPVisionModelWithProjection under transformers' names (as ComfyUI's clip_vision
  files and h94's image_encoder are), 64 wide with one 64-wide head, GELU (OpenCLIP style), 32 px;
- the adapter: h94's layout, `image_proj.*` plus `ip_adapter.N.to_k_ip|to_v_ip` where N is the
  position of the U-Net's cross-attention processor in `unet.attn_processors`; "base" projects the
  image embedding to 4 tokens, "plus" is the resampler over the penultimate hidden states, written
  under its original names (`layers.i.0.to_kv`, `layers.i.1.1`, ...), which diffusers converts.

    state = tiny_ip_adapter_state(unet, "plus", seed=1)      # flat: what the .safetensors holds
    write_tiny_ip_adapter(path, unet, "base")                 # .safetensors or nested .bin
    write_tiny_image_encoder(path)
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_ENCODER_CONFIG = dict(hidden_size=64, intermediate_size=128, projection_dim=32, num_hidden_layers=2,
                           num_attention_heads=1, num_channels=3, image_size=32, patch_size=8, hidden_act="gelu")
PLUS_QUERIES = 4  # the resampler's tokens (real plus adapters: 16)
PLUS_WIDTH = 64  # its inner width: one 64-wide head


def make_tiny_image_encoder(seed: int = 0, **changes):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_ENCODER_CONFIG, **changes})).eval()


def write_tiny_image_encoder(path, seed: int = 0, **changes) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in make_tiny_image_encoder(seed, **changes).state_dict().items()}
    save_file(state, str(path))
    return path


def _plus_projection_original_names(encoder_width: int, context_width: int) -> dict[str, torch.Tensor]:
    """A random resampler (diffusers' module, default init) under the original file's names."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    module = IPAdapterPlusImageProjection(embed_dims=encoder_width, output_dims=context_width,
                                          hidden_dims=PLUS_WIDTH, heads=PLUS_WIDTH // 64, num_queries=PLUS_QUERIES)
    state = module.state_dict()
    out = {}
    for key, value in state.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, i, rest = key.split(".", 2)
        if rest.startswith("attn.to_v."):
            continue  # joined with to_k below
        renames = {"ln0.": "0.norm1.", "ln1.": "0.norm2.", "attn.to_q.": "0.to_q.", "attn.to_out.0.": "0.to_out.",
                   "ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3."}
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{i}.attn.to_v.weight"]])
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                out[f"layers.{i}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise KeyError(key)
    return out


def tiny_ip_adapter_state(unet, variant: str = "base", seed: int = 1, encoder_width: int | None = None,
                          scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The flat tensors of a tiny IP-Adapter for `unet` (the .safetensors layout). `encoder_width`:
    the encoder's projection width (base) or hidden width (plus); default the tiny encoder's."""
    context = unet.config.cross_attention_dim
    state: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if variant == "base":
            width = encoder_width or TINY_ENCODER_CONFIG["projection_dim"]
            state["image_proj.proj.weight"] = torch.randn(4 * context, width) / width ** 0.5
            state["image_proj.proj.bias"] = torch.randn(4 * context) * 0.1
            state["image_proj.norm.weight"] = 1 + torch.randn(context) * 0.1
            state["image_proj.norm.bias"] = torch.randn(context) * 0.1
        elif variant == "plus":
            width = encoder_width or TINY_ENCODER_CONFIG["hidden_size"]
            projection = _plus_projection_original_names(width, context)
            state.update({f"image_proj.{k}": v for k, v in projection.items()})
        else:
            raise ValueError(variant)
        for position, (name, processor) in enumerate(unet.attn_processors.items()):
            if name.endswith("attn1.processor"):
                continue
            attention = unet.get_submodule(name.removesuffix(".processor"))
            hidden = attention.to_q.in_features
            for which in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{position}.{which}.weight"] = torch.randn(hidden, context) * scale / context ** 0.5
    return {k: v.contiguous() for k, v in state.items()}


def nested(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The flat names as the two dicts of a .bin file (and of diffusers' loader)."""
    out: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, _, name = key.partition(".")
        out[group][name] = value
    return out


def write_tiny_ip_adapter(path, unet, variant: str = "base", seed: int = 1, **kwargs) -> Path:
    """A tiny adapter file: .safetensors (flat) or .bin (nested), as h94's repository has both."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_ip_adapter_state(unet, variant, seed, **kwargs)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(nested(state), path)
    return path
