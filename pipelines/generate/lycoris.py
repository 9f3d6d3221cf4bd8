"""LyCORIS LoHa and LoKr layers of a LoRA file, as peft adapters on the cached modules.

Such files name each layer as kohya does (``lora_unet_<module path, dots as underscores>``,
``lora_te_``, ``lora_te1_``/``lora_te2_`` for SDXL's two text encoders; SDXL U-Net paths in
the original layout, ``input_blocks_4_1_...``) and store per layer, besides an optional
``alpha``:
- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and ``hada_t1``/``hada_t2``
  for Tucker-decomposed convolutions); delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank;
- LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``
  (and ``lokr_t2``); delta = kron(w1, w2), times alpha / rank only when a factor is
  rank-decomposed (LyCORIS' and A1111's rule).
peft's LoHa/LoKr layers compute exactly these deltas, but derive their factor shapes from a
config (rank, decompose factor) that a file does not state; so the layers are injected with
peft and the file's factors are then put in place as they are. Removal is the same as for
LoRA: the peft wrappers are taken out and the original modules come back untouched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod

import torch

from pipelines.models.ldm_layout import unet_to_ldm

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# plain LoRA layers, for diffusers' kohya converter (anything else under a kohya name makes it fail);
# a dora_scale makes a DoRA layer, which lora._split_dora renames to peft keys first
LORA_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class Layer:
    """One layer's LyCORIS weights from a file."""

    key: str  # kohya layer name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    kind: str  # "loha" or "lokr"
    factors: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        f = self.factors
        if self.kind == "loha":
            return f["hada_w1_b"].shape[0]
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in f:
                return f[name].shape[0]
        return None  # both Kronecker factors stored whole: no rank

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def delta_shape(self) -> tuple[int, int]:
        """(output channels, numel per output channel) of the weight delta the factors make."""
        f = self.factors
        if self.kind == "loha":
            if "hada_t1" in f:  # Tucker: w_a is (rank, out), w_b (rank, in), t (rank, rank, kh, kw)
                return f["hada_w1_a"].shape[1], f["hada_w1_b"].shape[1] * prod(f["hada_t1"].shape[2:])
            return f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]
        w1 = f["lokr_w1"].shape if "lokr_w1" in f else (f["lokr_w1_a"].shape[0], f["lokr_w1_b"].shape[1])
        if "lokr_w2" in f:
            w2 = tuple(f["lokr_w2"].shape)
        elif "lokr_t2" in f:
            w2 = (f["lokr_w2_a"].shape[1], f["lokr_w2_b"].shape[1], *f["lokr_t2"].shape[2:])
        else:
            w2 = (f["lokr_w2_a"].shape[0], f["lokr_w2_b"].shape[1])
        return w1[0] * w2[0], w1[1] * prod(w2[1:])


def _kind(parts: set[str]) -> str | None:
    if {"lora_down.weight", "lora_up.weight"} <= parts <= LORA_SUFFIXES:
        return "lora"
    factors = parts - {"alpha"}
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= factors <= set(LOHA_FACTORS) \
            and ("hada_t1" in factors) == ("hada_t2" in factors):
        return "loha"
    if factors <= set(LOKR_FACTORS) \
            and ("lokr_w1" in factors or {"lokr_w1_a", "lokr_w1_b"} <= factors) \
            and ("lokr_w2" in factors or {"lokr_w2_a", "lokr_w2_b"} <= factors):
        return "lokr"
    return None


def split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[Layer], list[str]]:
    """A file's tensors as (plain LoRA tensors for diffusers' loader, LoHa/LoKr layers, names of
    kohya-named layers in a layout neither reads, e.g. OFT, IA3, full diffs, LoCon's lora_mid)."""
    plain: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(KOHYA_PREFIXES) and "." in key:
            layer, suffix = key.split(".", 1)
            groups.setdefault(layer, {})[suffix] = tensor
        else:
            plain[key] = tensor  # diffusers/peft layouts: diffusers' loader knows them
    layers: list[Layer] = []
    unknown: list[str] = []
    for name, parts in groups.items():
        kind = _kind(set(parts))
        if kind == "lora":
            plain.update({f"{name}.{suffix}": t for suffix, t in parts.items()})
        elif kind is None:
            unknown.append(name)
        else:
            alpha = parts.get("alpha")
            layers.append(Layer(name, kind, {k: v for k, v in parts.items() if k != "alpha"},
                                None if alpha is None else float(alpha)))
    return plain, layers, unknown


def _flat(name: str) -> str:
    return name.replace(".", "_")


def module_index(unet, encoders: list[tuple[str, torch.nn.Module]]) -> dict[str, tuple[torch.nn.Module, str]]:
    """kohya layer name -> (root module, module path) for every Linear/Conv2d layer.

    `encoders` pairs each text encoder with its diffusers prefix ("text_encoder" answers to
    kohya's ``lora_te_`` and ``lora_te1_``, "text_encoder_2" to ``lora_te2_``). Call it on
    modules without peft layers (their paths change while adapters are in)."""
    index: dict[str, tuple[torch.nn.Module, str]] = {}
    layers = {name for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name in layers:
        index["lora_unet_" + _flat(name)] = (unet, name)
    try:  # SDXL files use the original U-Net's paths (input_blocks_4_1_transformer_blocks_0_attn1_to_q)
        params = [name for name, _ in unet.named_parameters()]
        original = unet_to_ldm({p: p for p in params}, unet.config)
    except (KeyError, ValueError):
        original = {}
    for ldm_key, key in original.items():
        module = key.rsplit(".", 1)[0]
        if module in layers:
            index.setdefault("lora_unet_" + _flat(ldm_key.rsplit(".", 1)[0]), (unet, module))
    for prefix, encoder in encoders:
        kohya = ("lora_te_", "lora_te1_") if prefix == "text_encoder" else ("lora_te2_",)
        for name, m in encoder.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                path = name if name.startswith("text_model.") else "text_model." + name  # kohya's CLIP paths
                for p in kohya:
                    index[p + _flat(path)] = (encoder, name)
    return index


def _fits(layer: Layer, module: torch.nn.Module) -> bool:
    weight = module.weight
    out, rest = layer.delta_shape()
    return out == weight.shape[0] and out * rest == weight.numel()


def inject(layers: list[Layer], index, adapter: str) -> tuple[list[str], list[str]]:
    """Add `layers` as peft adapters named `adapter` + "_loha"/"_lokr" on the modules `index`
    finds. Returns (adapter names created, kohya names that match no module of this model)."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model  # heavy: peft imports transformers

    unmatched: list[str] = []
    targets: dict[tuple[str, int], list[tuple[str, Layer]]] = {}
    roots: dict[int, torch.nn.Module] = {}
    for layer in layers:
        root, path = index.get(layer.key, (None, None))
        if root is None or not _fits(layer, root.get_submodule(path)):
            unmatched.append(layer.key)
            continue
        roots[id(root)] = root
        targets.setdefault((layer.kind, id(root)), []).append((path, layer))
    created: list[str] = []
    for (kind, root_id), items in targets.items():
        name = f"{adapter}_{kind}"
        config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=1, alpha=1, target_modules=[p for p, _ in items])
        root = roots[root_id]
        with warnings.catch_warnings():  # several adapters on one model is what we mean to do
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, root, adapter_name=name)
        for path, layer in items:
            _put_factors(root.get_submodule(path), name, layer)
        if name not in created:
            created.append(name)
    return created, unmatched


def _put_factors(peft_layer, name: str, layer: Layer) -> None:
    """Replace the factors peft initialised with the file's, and its scale with LyCORIS' scale."""
    weight = peft_layer.get_base_layer().weight
    for attr in peft_layer.adapter_layer_names:
        factors = getattr(peft_layer, attr)
        if name in factors:
            del factors[name]
    for attr, tensor in layer.factors.items():
        getattr(peft_layer, attr)[name] = torch.nn.Parameter(tensor.to(weight.device, weight.dtype),
                                                              requires_grad=False)
    # peft scales by alpha / r (times the multiplier set later): r = 1 keeps LyCORIS' scale as alpha
    peft_layer.r[name] = 1
    peft_layer.alpha[name] = layer.scale
    peft_layer.scaling[name] = layer.scale
