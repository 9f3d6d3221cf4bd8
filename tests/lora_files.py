"""LoRA files in the layouts trainers write, made for a loaded tiny model (a helper module, not a test file).

Layer names follow kohya's sd-scripts: ``lora_unet_`` + the U-Net module path with dots as
underscores (SD 1.x/2.x: diffusers paths; SDXL: the original U-Net's paths such as
``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), ``lora_te_`` (SD 1.x/2.x) or
``lora_te1_``/``lora_te2_`` (SDXL) + the CLIP path under ``text_model.``. Targets are what
kohya trains: Linear/1x1 layers of the U-Net's transformer blocks and CLIP's attention and MLP
layers, plus, with ``convs=True``, the resnets' 3x3 convolutions (LoCon / LyCORIS conv layers).
"""

from __future__ import annotations

import torch

from pipelines.models import ldm_layout


def kohya_targets(components, convs: bool = False, encoders: bool = True, unet: bool = True):
    """[(kohya layer name, module)] for `components` (a loaded model)."""
    targets = []
    model = components.unet
    sdxl = components.spec.family.name == "sdxl"
    original = {}
    if sdxl:
        params = [name for name, _ in model.named_parameters()]
        original = {v: k for k, v in ldm_layout.unet_to_ldm({p: p for p in params}, model.config).items()}
    for name, m in model.named_modules() if unet else ():
        if isinstance(m, torch.nn.Linear) and ".attentions." in name or \
                convs and isinstance(m, torch.nn.Conv2d) and ".resnets." in name and m.kernel_size == (3, 3):
            path = original[name + ".weight"].rsplit(".", 1)[0] if sdxl else name
            targets.append(("lora_unet_" + path.replace(".", "_"), m))
    prefixes = ["lora_te1", "lora_te2"] if sdxl else ["lora_te"]
    for prefix, encoder in zip(prefixes, components.text_encoders) if encoders else ():
        for name, m in encoder.named_modules():
            if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
                path = name if name.startswith("text_model.") else "text_model." + name
                targets.append((f"{prefix}_{path.replace('.', '_')}", m))
    return targets


def _dims(m) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d."""
    if isinstance(m, torch.nn.Conv2d):
        return m.out_channels, m.in_channels, tuple(m.kernel_size)
    return m.out_features, m.in_features, ()


def lora_file(targets, rank: int = 4, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """kohya LoRA: lora_down (rank, in[, kh, kw]), lora_up (out, rank[, 1, 1]), alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, m in targets:
        o, i, k = _dims(m)
        out[key + ".lora_down.weight"] = torch.randn(rank, i, *k, generator=g) * scale
        out[key + ".lora_up.weight"] = torch.randn(o, rank, *(1 for _ in k), generator=g) * scale
        out[key + ".alpha"] = torch.tensor(float(rank))
    return out


def loha_file(targets, rank: int = 4, seed: int = 0, scale: float = 0.5, alpha: float = 2.0):
    """LyCORIS LoHa: hada_w{1,2}_a (out, rank), hada_w{1,2}_b (rank, in*kh*kw), alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, m in targets:
        o, i, k = _dims(m)
        flat_in = i * (k[0] * k[1] if k else 1)
        for w in ("w1", "w2"):
            out[f"{key}.hada_{w}_a"] = torch.randn(o, rank, generator=g) * scale
            out[f"{key}.hada_{w}_b"] = torch.randn(rank, flat_in, generator=g) * scale
        out[key + ".alpha"] = torch.tensor(alpha)
    return out


def lokr_file(targets, rank: int = 4, seed: int = 0, scale: float = 0.5, alpha: float = 2.0,
              decompose: bool = True, factor: int = 4):
    """LyCORIS LoKr: lokr_w1 (factor, factor) whole; lokr_w2 (out/f, in/f[, kh, kw]) whole, or
    with `decompose` as lokr_w2_a (out/f, rank) @ lokr_w2_b (rank, in/f*kh*kw); alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, m in targets:
        o, i, k = _dims(m)
        assert o % factor == 0 and i % factor == 0, key
        out[key + ".lokr_w1"] = torch.randn(factor, factor, generator=g) * scale
        if decompose:
            flat_in = i // factor * (k[0] * k[1] if k else 1)
            out[key + ".lokr_w2_a"] = torch.randn(o // factor, rank, generator=g) * scale
            out[key + ".lokr_w2_b"] = torch.randn(rank, flat_in, generator=g) * scale
        else:
            out[key + ".lokr_w2"] = torch.randn(o // factor, i // factor, *k, generator=g) * scale
        out[key + ".alpha"] = torch.tensor(alpha)
    return out


def model_state(components):
    """Everything removal must restore: module tree, parameter names and values."""
    modules = [components.unet, *components.text_encoders]
    return ([[(n, type(m).__name__) for n, m in module.named_modules()] for module in modules],
            [{k: v.clone() for k, v in module.state_dict().items()} for module in modules])


def state_without_lora(components):
    """`model_state` as the next job without a LoRA sees it (a job's LoRA set stays merged until then)."""
    from pipelines.generate import lora

    with lora.applied(components, []):
        return model_state(components)


def assert_same_state(before, after) -> None:
    (tree, weights), (tree2, weights2) = before, after
    assert tree == tree2
    for a, b in zip(weights, weights2):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
