"""LoRA files for the flow-matching transformers (SD 3 / 3.5, Flux.1), as peft adapters.

`lora.applied` runs the job's LoRA lifecycle for every family (files read, multipliers set, every
peft layer removed afterwards); for these families it hands each file's tensors to `load_into`,
which reads the layouts users have and injects them on the transformer and the CLIP encoders:
- diffusers/peft: ``transformer.<module>.lora_A/lora_B``, ``text_encoder.``/``text_encoder_2.``;
- kohya/sd-scripts: ``lora_unet_`` + the original module path with dots as underscores (Flux:
  BFL's ``double_blocks_0_img_attn_qkv``, ``single_blocks_*``; SD 3: SAI's
  ``joint_blocks_0_x_block_attn_qkv``), ``lora_te1_`` (CLIP-L) and, for SD 3, ``lora_te2_``
  (CLIP-G); OneTrainer's ``lora_transformer_`` + the diffusers path;
- BFL/ComfyUI: ``diffusion_model.<original module path>.lora_A/lora_B`` (or lora_down/lora_up),
  ``text_encoders.clip_l.transformer.``/``clip_g`` for the CLIPs;
- XLabs' Flux files (``double_blocks.0.processor.proj_lora1.down``).
Flux files go through diffusers' own converter (`FluxLoraLoaderMixin.lora_state_dict`). diffusers
has none for SD 3's kohya layout (`SD3LoraLoaderMixin.lora_state_dict` only reads its own), so
`sd3_kohya_to_peft` maps SAI's MMDiT names to diffusers' (the fused qkv split into q, k, v), and
the CLIP parts go through diffusers' SDXL kohya converter (SD 3's CLIP-L and CLIP-G are SDXL's).
Layers for T5 (``lora_te3_`` in SD 3 files, ``lora_te2_`` in Flux files) are not read by diffusers'
loaders and are reported, as are layers of a module this model does not have. A file made for
another family (an SD 1.5 LoRA on Flux) raises `OtherFamilyLora`, which the caller reports.
"""

from __future__ import annotations

import torch

from pipelines.generate.flow_runner import is_flow, is_flux
from pipelines.models.families import FLUX, SD3

# peft makes an adapter's layers without drawing the random initial weights the file replaces at once
# (diffusers' `low_cpu_mem_usage`); `lora` loads the U-Net families' files the same way
FILE_WEIGHTS_ONLY = True

KOHYA_TRANSFORMER = ("lora_unet_", "lora_transformer_")
COMFY_TO_KOHYA = {"diffusion_model.": "lora_unet_", "text_encoders.clip_l.transformer.": "lora_te1_",
                  "text_encoders.clip_g.transformer.": "lora_te2_"}
PEFT_TO_KOHYA = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}
T5_LAYERS = {FLUX.name: ("lora_te2_", "text_encoders.t5xxl."), SD3.name: ("lora_te3_", "text_encoders.t5xxl.")}
# words in a layer's name that only one kind of denoiser has
FAMILY_MARKERS = {
    FLUX.name: ("double_blocks", "single_blocks", "single_transformer_blocks"),
    SD3.name: ("joint_blocks", "x_block", "context_block"),
    "unet": ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block"),
}
FAMILY_LABELS = {FLUX.name: FLUX.label, SD3.name: SD3.label, "unet": "a U-Net model (SD 1.x, SD 2.x or SDXL)"}


class OtherFamilyLora(ValueError):
    """A LoRA whose layers belong to another family of model than the one loaded."""


def text_encoder_prefixes(components) -> list[tuple[str, torch.nn.Module]]:
    """The CLIP encoders a LoRA file can hold layers for, with their diffusers prefix (T5 holds none)."""
    clips = [encoder for encoder in components.text_encoders if "CLIP" in type(encoder).__name__]
    return list(zip(("text_encoder", "text_encoder_2"), clips[:1] if is_flux(components) else clips[:2]))


def lora_family(state: dict) -> str | None:
    """The family a LoRA file's layer names belong to (a `FAMILY_MARKERS` key); None when they do not say
    (text-encoder layers only, or diffusers names that SD 3 and Flux share)."""
    for key in state:
        if key.startswith(("unet.", "lora_unet_")) and any(m in key for m in FAMILY_MARKERS["unet"]):
            return "unet"
        name = key.split(".lora", 1)[0]
        for family, markers in FAMILY_MARKERS.items():
            if family != "unet" and any(m in name for m in markers):
                return family
    return None


def check_family(components, state: dict) -> None:
    """Raise `OtherFamilyLora` when `state`'s layers are for another family than `components`'."""
    family = lora_family(state)
    ours = components.spec.family
    mine = ours.name if is_flow(components) else "unet"
    if family is not None and family != mine:
        raise OtherFamilyLora(f"its layers are for {FAMILY_LABELS[family]}, not {ours.label}")


def load_into(components, state: dict, adapter: str) -> tuple[bool, list[str], list[str]]:
    """`state` (one LoRA file's plain LoRA tensors) as peft adapter `adapter` on a flow model's transformer
    and CLIP encoders: (whether any module took it, names of its layers that match no module, notes on
    what was left out)."""
    # heavy: diffusers' LoRA loaders, only when a LoRA is used
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    check_family(components, state)
    family = components.spec.family.name
    t5 = [k for k in state if k.startswith(T5_LAYERS[family])]
    notes = [f"its {len(_layers(t5))} T5 layer(s) are not applied (only the CLIP encoders take LoRA)"] if t5 else []
    state = _as_kohya({k: v for k, v in state.items() if k not in t5})
    transformer, encoders = components.unet, text_encoder_prefixes(components)
    if is_flux(components):
        mixin = FluxLoraLoaderMixin
        state, alphas = mixin.lora_state_dict(state, return_alphas=True)
    else:
        mixin = SD3LoraLoaderMixin
        state, alphas = _sd3_state(mixin.lora_state_dict(state), transformer)
    state, unmatched = _known_modules(state, transformer, encoders)
    if any(key.startswith("transformer.") for key in state):
        mixin.load_lora_into_transformer(state, transformer=transformer, adapter_name=adapter,
                                         low_cpu_mem_usage=FILE_WEIGHTS_ONLY,
                                         **({"network_alphas": alphas} if mixin is FluxLoraLoaderMixin else {}))
    for prefix, encoder in encoders:
        if any(key.startswith(prefix + ".") for key in state):
            mixin.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix, adapter_name=adapter,
                                              low_cpu_mem_usage=FILE_WEIGHTS_ONLY)
    modules = (transformer, *(encoder for _, encoder in encoders))
    return any(has_adapter(module, adapter) for module in modules), unmatched, notes


def _layers(keys) -> set[str]:
    return {key.split(".lora", 1)[0].split(".alpha", 1)[0] for key in keys}


def _as_kohya(state: dict) -> dict:
    """ComfyUI's names (``diffusion_model.`` + the original path, ``text_encoders.clip_l.transformer.``...;
    peft's lora_A/lora_B or kohya's lora_down/lora_up) as kohya's, which diffusers' Flux converter and
    `sd3_kohya_to_peft` read."""
    out = {}
    for key, tensor in state.items():
        prefix = next((p for p in COMFY_TO_KOHYA if key.startswith(p)), None)
        if prefix is not None:
            layer, _, suffix = key[len(prefix):].rpartition(".lora_")
            if layer:
                suffix = PEFT_TO_KOHYA.get(suffix, "lora_" + suffix)
            else:  # an alpha
                layer, _, suffix = key[len(prefix):].rpartition(".")
            key = COMFY_TO_KOHYA[prefix] + layer.replace(".", "_") + "." + suffix
        out[key] = tensor
    return out


def _sd3_state(state: dict, transformer) -> tuple[dict, dict]:
    """SD 3's layouts as diffusers' (peft names for the transformer, its own for the CLIPs) and the
    CLIP layers' alphas: kohya's MMDiT layers through `sd3_kohya_to_peft`, its CLIP layers through
    diffusers' SDXL converter (``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, as in SDXL)."""
    # heavy: diffusers' LoRA loaders, only when a LoRA is used
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    kohya = {k: v for k, v in state.items() if k.startswith(KOHYA_TRANSFORMER)}
    clips = {k: v for k, v in state.items() if k.startswith(("lora_te1_", "lora_te2_"))}
    rest = {k: v for k, v in state.items() if k not in kohya and k not in clips}
    alphas = {}
    if clips:
        clips, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(clips)
    return {**rest, **sd3_kohya_to_peft(kohya, transformer), **clips}, alphas


def sai_to_diffusers(config) -> dict[str, tuple[list[str], bool]]:
    """SAI's MMDiT module names (kohya's, flattened) -> (the diffusers modules, in the order a fused
    layer stacks them; whether the output halves are swapped: SAI's final adaLN layers are (shift,
    scale) where diffusers' are (scale, shift))."""
    table = {"context_embedder": (["context_embedder"], False), "x_embedder.proj": (["pos_embed.proj"], False),
             "final_layer.linear": (["proj_out"], False), "final_layer.adaLN_modulation.1": (["norm_out.linear"], True)}
    for sai, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for i, n in (("0", "1"), ("2", "2")):
            table[f"{sai}.mlp.{i}"] = ([f"time_text_embed.{ours}.linear_{n}"], False)
    layers = config.num_layers
    for i in range(layers):
        j, b = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        block = {"x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
                 "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                 "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
                 "x_block.attn.proj": ["attn.to_out.0"], "context_block.attn.proj": ["attn.to_add_out"],
                 "x_block.attn2.proj": ["attn2.to_out.0"],
                 "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
                 "context_block.mlp.fc1": ["ff_context.net.0.proj"], "context_block.mlp.fc2": ["ff_context.net.2"],
                 "x_block.adaLN_modulation.1": ["norm1.linear"],
                 "context_block.adaLN_modulation.1": ["norm1_context.linear"]}
        for sai, ours in block.items():
            swapped = sai == "context_block.adaLN_modulation.1" and i == layers - 1  # context_pre_only
            table[j + sai] = ([b + name for name in ours], swapped)
    return {name.replace(".", "_"): value for name, value in table.items()}


def sd3_kohya_to_peft(state: dict, transformer) -> dict:
    """kohya's SD 3 transformer layers (``lora_unet_`` + SAI's names, or ``lora_transformer_`` + diffusers'
    names) in peft's layout under ``transformer.``: alpha / rank folded into lora_A; a fused layer's
    lora_up split by rows among its modules, each taking the whole lora_down (exact: each module's
    delta is its rows of up @ down). Layers of no known name keep their kohya name (reported later)."""
    table = sai_to_diffusers(transformer.config)
    table.update({name.replace(".", "_"): ([name], False)
                  for name, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
    out = {}
    for layer in sorted(_layers(state)):
        down, up = state.get(layer + ".lora_down.weight"), state.get(layer + ".lora_up.weight")
        targets, swapped = table.get(layer.split("_", 2)[2], (None, False))
        if targets is None or down is None or up is None:
            out.update({k: v for k, v in state.items() if _layers([k]) == {layer}})
            continue
        alpha = state.get(layer + ".alpha")
        down = down * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        if swapped:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        for name, rows in zip(targets, up.chunk(len(targets), dim=0)):
            out[f"transformer.{name}.lora_A.weight"] = down
            out[f"transformer.{name}.lora_B.weight"] = rows.contiguous()
    return out


def _known_modules(state: dict, transformer, encoders) -> tuple[dict, list[str]]:
    """`state` without the transformer layers whose module this transformer does not have (peft would
    refuse the whole file), and their names. Kohya names that no converter mapped are left as they are
    by diffusers' converters; they are reported here too. diffusers' Flux kohya converter names the
    embedders and the final layer (``txt_in``, ``final_layer``...) without ``transformer.``, so its
    own loader drops them; they get the prefix here, and apply as kohya and ComfyUI apply them."""
    modules = {name for name, _ in transformer.named_modules()}
    prefixes = ("transformer.", *(prefix + "." for prefix, _ in encoders))
    kept, unmatched = {}, set()
    for key, tensor in state.items():
        if not key.startswith(prefixes) and key.split(".lora", 1)[0] in modules:
            key = "transformer." + key
        if key.startswith("transformer."):
            module = key[len("transformer."):].split(".lora", 1)[0]
            if module not in modules:
                unmatched.add(module)
                continue
        elif not key.startswith(prefixes):
            unmatched.add(key.split(".", 1)[0])
            continue
        kept[key] = tensor
    return kept, sorted(unmatched)


def has_adapter(module, name: str) -> bool:
    """Whether a peft layer of adapter `name` is anywhere in `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # heavy: peft imports transformers

    return any(isinstance(m, BaseTunerLayer) and any(name in getattr(m, attr) for attr in m.adapter_layer_names)
               for m in module.modules())
