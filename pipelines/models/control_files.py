"""ControlNet and T2I-Adapter files: what one is (from its header alone) and its diffusers module, offline.

The layouts people have (facts of the files, not of any one loader):
- ControlNet, original (lllyasviel's and A1111's `control_*.pth|.safetensors`): the U-Net
  encoder's LDM names (`input_blocks`, `middle_block`, `time_embed`, SDXL's `label_emb`) plus
  `input_hint_block`, `zero_convs` and `middle_block_out`, under `control_model.` or bare;
- ControlNet, diffusers (`diffusers_xl_canny_*.safetensors`, `diffusion_pytorch_model.safetensors`):
  diffusers' U-Net names plus `controlnet_cond_embedding`, `controlnet_down_blocks`, `controlnet_mid_block`;
- T2I-Adapter, original (TencentARC `t2iadapter_*_sd14v1.pth`, `*_sd15v2.pth`): `conv_in` and
  `body.N.{in_conv,block1,block2}` with N = level * res blocks + block; the "light" adapter
  (color): `body.L.{in_conv,out_conv}` and `body.L.body.N.*`;
- T2I-Adapter, diffusers (all SDXL adapters): `adapter.conv_in`, `adapter.body.L.{in_conv,resnets.N}`.
Control-LoRA, "diff" ControlNets, the style adapter and IP-Adapter files are refused with a reason.

A ControlNet is a U-Net encoder, so its config is read by `architecture.infer_unet_config`
(diffusers names are renamed to LDM ones first by `ldm_layout.unet_to_ldm`), heads and the
family's other unreadable facts from `families`; original keys go through diffusers' own
`convert_controlnet_checkpoint`. Weights load strictly: a missing or unknown weight is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from pipelines.models.architecture import infer_unet_config
from pipelines.models.build import empty_modules
from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, TensorSource, no_gc, read_header
from pipelines.models.families import SD1, SD2, SDXL, UNET_PREFIX, Family, UnsupportedCheckpoint
from pipelines.models.ldm_layout import unet_to_ldm
from pipelines.models.prediction import yaml_beside

CONTROLNET, T2I_ADAPTER = "controlnet", "t2i_adapter"
ORIGINAL, DIFFUSERS = "original", "diffusers"
LDM_CONTROL_PREFIX = "control_model."
# the cross-attention width of real ControlNets says the family (tiny test models fall back to structure)
CONTEXT_WIDTH_FAMILIES = {768: SD1, 1024: SD2, 2048: SDXL}
# SDXL's time-id embedding width: the ADM input is pooled text + 6 ids of this width, and a
# ControlNet file (no text encoder) cannot tell the two apart; every SDXL U-Net uses 256
SDXL_TIME_ID_WIDTH = 256
SDXL_TIME_IDS = 6
# diffusers' conditioning embedding: conv_in, 2 convs per step, conv_out (input_hint_block 0..14)
HINT_CONVS = 8
# T2I-Adapters unshuffle the image by 8 (SD 1.x: features at 1/8, 1/16, ...) or 16 (SDXL)
ADAPTER_DOWNSCALE = {SD1.name: 8, SDXL.name: 16}
ADAPTER_INPUTS = (1, 3)  # sketch/canny adapters read one channel, the others RGB

_CONTROLNET_MODULE_KEYS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
# keys of files that sit in models/ControlNet but are not what this loader builds: key -> why
_REFUSED_MARKERS = {
    "lora_controlnet": "a Control-LoRA (it needs the checkpoint's U-Net merged in); use a full ControlNet file",
    "difference": "a 'diff' ControlNet (weights relative to SD 1.5); use the full control_*.safetensors file",
    "style_embedding": "the T2I style adapter (CLIP-vision tokens), which is not supported",
}
# a key containing one of these: what the file is instead
_OTHER_KINDS = (
    (("image_proj.", "ip_adapter"), "an IP-Adapter, which is not supported"),
    (("lllite_unet_",), "a ControlNet-LLLite (kohya), which is not supported"),
    ((UNET_PREFIX,), "a Stable Diffusion checkpoint: it goes in models/Stable-diffusion"),
    (("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", ".lora.down."), "a LoRA: it goes in models/Lora"),
)


@dataclass(frozen=True)
class ControlSpec:
    """What a control file is and the config of the diffusers module it makes."""
    control_type: str  # CONTROLNET | T2I_ADAPTER
    layout: str  # ORIGINAL | DIFFUSERS
    family: Family
    config: dict
    prefix: str = ""  # original ControlNets: "control_model." or bare
    renames: dict | None = None  # original T2I-Adapters: file name -> diffusers name


def _numbers(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _other_kind(keys) -> str | None:
    """What a file that is no control model is, when its keys say it."""
    for markers, what in _OTHER_KINDS:
        if any(marker in key for key in keys for marker in markers):
            return what
    return None


def sniff_layout(keys) -> tuple[str, str, str]:
    """(control type, layout, key prefix), from key names; CheckpointError with the reason otherwise."""
    keys = set(keys)
    for marker, reason in _REFUSED_MARKERS.items():  # before the ControlNet markers some of these carry
        if marker in keys:
            raise CheckpointError(f"not loadable: {reason}")
    if any(k.startswith(_CONTROLNET_MODULE_KEYS) for k in keys):
        return CONTROLNET, DIFFUSERS, ""
    for prefix in (LDM_CONTROL_PREFIX, ""):
        if prefix + "input_hint_block.0.weight" in keys:
            return CONTROLNET, ORIGINAL, prefix
    if "adapter.conv_in.weight" in keys or "adapter.body.0.in_conv.weight" in keys:
        return T2I_ADAPTER, DIFFUSERS, ""
    if ("conv_in.weight" in keys and "body.0.block1.weight" in keys) or "body.0.body.0.block1.weight" in keys:
        return T2I_ADAPTER, ORIGINAL, ""
    reason = _other_kind(keys)
    raise CheckpointError(f"not a ControlNet or T2I-Adapter: {reason}" if reason else
                          "not a ControlNet or T2I-Adapter (no input_hint_block, controlnet_cond_embedding "
                          "or adapter weights)")


# --- ControlNet -------------------------------------------------------------------------------

def ldm_shapes_of_diffusers_controlnet(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """A diffusers-layout ControlNet's U-Net part under LDM names, so one reader serves both layouts."""
    unet_part = {k: v for k, v in shapes.items() if not k.startswith(_CONTROLNET_MODULE_KEYS)}
    levels = _numbers(unet_part, r"down_blocks\.(\d+)\.")
    if not levels:
        raise CheckpointError("ControlNet without down blocks")
    down_types = ["CrossAttnDownBlock2D" if _numbers(unet_part, rf"down_blocks\.{i}\.attentions\.(\d+)\.")
                  else "DownBlock2D" for i in levels]
    layout = {"down_block_types": down_types, "up_block_types": down_types[::-1],
              "layers_per_block": len(_numbers(unet_part, r"down_blocks\.0\.resnets\.(\d+)\."))}
    try:
        return unet_to_ldm(unet_part, layout)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"unexpected ControlNet weights ({exc})") from exc


def hint_convs(shapes: dict[str, tuple], layout: str, prefix: str = "") -> list[tuple]:
    """The conditioning embedding's conv shapes in order: conv_in, the blocks, conv_out."""
    if layout == DIFFUSERS:
        blocks = _numbers(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
        names = ["conv_in", *(f"blocks.{b}" for b in blocks), "conv_out"]
        return [shapes[f"controlnet_cond_embedding.{n}.weight"] for n in names]
    p = prefix + "input_hint_block."
    return [shapes[f"{p}{i}.weight"] for i in _numbers(shapes, re.escape(p) + r"(\d+)\.weight")]


def controlnet_family(ldm_shapes: dict[str, tuple]) -> Family:
    """SD 1.x / 2.x / SDXL from the cross-attention width; from the structure where the width is
    not a real model's (SDXL: the ADM embedding `label_emb`; SD 2.x: linear `proj_in`)."""
    widths = [s[1] for k, s in ldm_shapes.items() if k.endswith("attn2.to_k.weight")]
    if widths and widths[0] in CONTEXT_WIDTH_FAMILIES:
        return CONTEXT_WIDTH_FAMILIES[widths[0]]
    if "label_emb.0.0.weight" in ldm_shapes:
        return SDXL
    proj_in = [s for k, s in ldm_shapes.items() if k.endswith("proj_in.weight")]
    return SD2 if proj_in and len(proj_in[0]) == 2 else SD1


def controlnet_config(ldm_shapes: dict[str, tuple], family: Family, hint: list[tuple],
                      time_ids_width: int | None = None) -> dict:
    """ControlNetModel's config. SDXL's time-id width: `time_ids_width` (the U-Net's
    `addition_time_embed_dim`), else SDXL's 256 where the ADM width fits it, else None."""
    shapes = dict(ldm_shapes)
    # infer_unet_config also reads the U-Net's output conv, which a ControlNet has not: the
    # output width is not part of a ControlNet's config, so the input width stands in for it
    shapes["out.2.weight"] = shapes["input_blocks.0.0.weight"][:2]
    adm = shapes.get("label_emb.0.0.weight")
    width = None
    if adm is not None:
        width = time_ids_width or (SDXL_TIME_ID_WIDTH if adm[1] > SDXL_TIME_IDS * SDXL_TIME_ID_WIDTH else None)
        pooled_key = next(s.prefix for s in family.text_encoders if s.pooled) + "text_projection"
        # likewise the pooled width, which only the text encoder's projection says
        shapes[pooled_key] = (0, adm[1] - SDXL_TIME_IDS * (width or 1))
    try:
        unet = infer_unet_config(shapes, family, prefix="")
    except (KeyError, IndexError, StopIteration) as exc:
        raise CheckpointError(f"incomplete {family.label} ControlNet (missing {exc})") from exc
    except UnsupportedCheckpoint as exc:
        raise CheckpointError(f"unexpected {family.label} ControlNet: {exc}") from exc
    if len(hint) != HINT_CONVS:
        raise CheckpointError(f"ControlNet conditioning embedding with {len(hint)} convolutions "
                              f"(known layouts have {HINT_CONVS})")
    keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block",
            "transformer_layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
            "norm_num_groups", "upcast_attention", "mid_block_type", "addition_embed_type",
            "projection_class_embeddings_input_dim")
    config = {k: unet[k] for k in keep if k in unet}
    if adm is not None:
        config["addition_time_embed_dim"] = width
    config["conditioning_channels"] = hint[0][1]
    # conv_in gives the first width; every second block (the strided ones) the next
    config["conditioning_embedding_out_channels"] = [hint[0][0], *(s[0] for s in hint[2:-1:2])]
    return config


# --- T2I-Adapter ------------------------------------------------------------------------------

def adapter_renames(keys) -> dict[str, str]:
    """Original T2I-Adapter names -> diffusers' (`adapter.` + body per level, res blocks inside)."""
    keys = list(keys)
    renames = {}
    if any(re.match(r"body\.\d+\.body\.", k) for k in keys):  # the light adapter
        for key in keys:
            m = re.match(r"body\.(\d+)\.(in_conv|out_conv|body\.(\d+))\.(.+)$", key)
            if not m:
                raise CheckpointError(f"unexpected light T2I-Adapter weight {key}")
            inner = f"resnets.{m.group(3)}" if m.group(3) else m.group(2)
            renames[key] = f"adapter.body.{m.group(1)}.{inner}.{m.group(4)}"
        return renames
    with_in_conv = _numbers(keys, r"body\.(\d+)\.in_conv\.")
    per_level = with_in_conv[0] if with_in_conv else 2  # the first level never changes width
    for key in keys:
        if key.startswith("conv_in."):
            renames[key] = "adapter." + key
            continue
        m = re.match(r"body\.(\d+)\.(.+)$", key)
        if not m or per_level < 1:
            raise CheckpointError(f"unexpected T2I-Adapter weight {key}")
        n, rest = int(m.group(1)), m.group(2)
        level, block = divmod(n, per_level)
        if rest.startswith("in_conv."):
            if block:
                raise CheckpointError(f"unexpected T2I-Adapter weight {key}")
            renames[key] = f"adapter.body.{level}.{rest}"
        else:
            renames[key] = f"adapter.body.{level}.resnets.{block}.{rest}"
    return renames


def adapter_config(shapes: dict[str, tuple]) -> tuple[Family, dict]:
    """(family, T2IAdapter config) from diffusers-named shapes: the input width says the family
    (SD 1.x unshuffles by 8, SDXL by 16) and the input channels."""
    bodies = _numbers(shapes, r"adapter\.body\.(\d+)\.")
    blocks = len(_numbers(shapes, r"adapter\.body\.0\.resnets\.(\d+)\."))
    try:
        if "adapter.conv_in.weight" not in shapes:  # light: the first body reads the unshuffled image
            family, kind, width = SD1, "light_adapter", shapes["adapter.body.0.in_conv.weight"][1]
            channels = [shapes[f"adapter.body.{b}.out_conv.weight"][0] for b in bodies[:-1]]
        else:
            width = shapes["adapter.conv_in.weight"][1]
            xl = width % ADAPTER_DOWNSCALE[SDXL.name] ** 2 == 0
            family, kind = (SDXL, "full_adapter_xl") if xl else (SD1, "full_adapter")
            channels = [shapes[f"adapter.body.{b}.resnets.0.block1.weight"][0] for b in bodies]
    except KeyError as exc:
        raise CheckpointError(f"incomplete T2I-Adapter (missing {exc})") from exc
    downscale = ADAPTER_DOWNSCALE[family.name]
    inputs, rest = divmod(width, downscale ** 2)
    if rest or inputs not in ADAPTER_INPUTS or not channels or not blocks:
        raise CheckpointError(f"unexpected T2I-Adapter input width {width}")
    return family, {"in_channels": inputs, "channels": channels, "num_res_blocks": blocks,
                    "downscale_factor": downscale, "adapter_type": kind}


# --- both ---------------------------------------------------------------------------------------

def inspect_control(shapes: dict[str, tuple], time_ids_width: int | None = None) -> ControlSpec:
    """What a control file is, from names and shapes alone (meta/shape-only dicts work too)."""
    control_type, layout, prefix = sniff_layout(shapes)
    if control_type == T2I_ADAPTER:
        renames = adapter_renames(shapes) if layout == ORIGINAL else None
        named = {renames[k]: v for k, v in shapes.items()} if renames else shapes
        family, config = adapter_config(named)
        return ControlSpec(control_type, layout, family, config, renames=renames)
    if layout == DIFFUSERS:
        ldm = ldm_shapes_of_diffusers_controlnet(shapes)
    else:
        ldm = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    family = controlnet_family(ldm)
    config = controlnet_config(ldm, family, hint_convs(shapes, layout, prefix), time_ids_width)
    return ControlSpec(control_type, layout, family, config, prefix=prefix)


def describe_control_file(path: Path) -> dict:
    """What the ControlNet listing shows about a file (header only; a .pth through weights_only)."""
    path = Path(path)
    try:
        header = read_header(path)
        if header.format == "diffusers":
            raise CheckpointError("a folder: put its diffusion_pytorch_model.safetensors in models/ControlNet")
        spec = inspect_control(header.shapes)
    except CheckpointError as exc:
        message = str(exc)
        return {"error": message if message.startswith(path.name) else f"{path.name}: {message}"}
    details = {"family": spec.family.name, "family_label": spec.family.label, "control_type": spec.control_type,
               "layout": spec.layout, "format": header.format}
    if spec.control_type == T2I_ADAPTER:
        details.update(adapter_type=spec.config["adapter_type"], conditioning_channels=spec.config["in_channels"])
    else:
        details["conditioning_channels"] = spec.config["conditioning_channels"]
        details["global_pool"] = pools_conditions(path)
    return details


def pools_conditions(path: Path) -> bool:
    """Whether a ControlNet averages its residuals over the image (the shuffle model). Its
    weights do not say: A1111's `.yaml` beside the file does
    (`model.params.control_stage_config.params.global_average_pooling`), else the name (`*_shuffle`)."""
    found = yaml_beside(path)
    params = None
    if found is not None:
        try:
            with open(found, encoding="utf-8") as f:
                params = yaml.safe_load(f)["model"]["params"]["control_stage_config"]["params"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):  # an unreadable or other yaml: as if none
            params = None
    if isinstance(params, dict):
        return bool(params.get("global_average_pooling", False))
    return Path(path).stem.lower().removesuffix("_fp16").endswith("shuffle")


def check_control_file(header: CheckpointHeader, time_ids_width: int | None = None) -> ControlSpec:
    """The spec of a file about to be loaded; CheckpointError naming the file if it cannot be."""
    path = Path(header.path)
    if header.format == "diffusers":
        raise CheckpointError(f"{path.name}: a control model must be a single file")
    try:
        spec = inspect_control(header.shapes, time_ids_width)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc
    if spec.control_type == CONTROLNET:
        spec = replace(spec, config={**spec.config, "global_pool_conditions": pools_conditions(path)})
    if spec.config.get("addition_embed_type") and not spec.config.get("addition_time_embed_dim"):
        raise CheckpointError(f"{path.name}: SDXL ControlNet whose time-id width the file cannot tell; "
                              "load it with the U-Net's (addition_time_embed_dim)")
    return spec


@no_gc()
def load_control_model(path: Path, details: dict | None = None, dtype: torch.dtype = torch.float32,
                       time_ids_width: int | None = None):
    """The ControlNetModel or T2IAdapter of a file, weights cast to `dtype` and loaded strictly.

    `details`: the listing's (an "error" there is raised as it is). `time_ids_width`: the
    U-Net's `addition_time_embed_dim`, for an SDXL ControlNet (default: SDXL's)."""
    from diffusers import ControlNetModel, T2IAdapter  # heavy: only when loading

    path = Path(path)
    if details and details.get("error"):
        raise CheckpointError(details["error"])
    header = read_header(path)
    spec = check_control_file(header, time_ids_width)
    cls = ControlNetModel if spec.control_type == CONTROLNET else T2IAdapter
    with empty_modules():
        module = cls(**spec.config)
    with TensorSource(header) as source:
        keys = [k for k in header.shapes if k.startswith(spec.prefix)]
        raw = {k[len(spec.prefix):]: source.get(k, dtype) for k in keys}
    if spec.renames:
        raw = {spec.renames[k]: v for k, v in raw.items()}
    if spec.control_type == CONTROLNET and spec.layout == ORIGINAL:
        raw = convert_original_controlnet(raw, dict(module.config), path)
    _load_strictly(module, raw, path)
    return module.eval().requires_grad_(False)


def convert_original_controlnet(raw: dict, config: dict, path: Path) -> dict:
    """Original names -> diffusers' through diffusers' converter (plus SDXL's ADM embedding,
    which it leaves out); a weight the converter did not take is an error, not a silent drop."""
    from diffusers.loaders.single_file_utils import (  # heavy: only when loading
        DIFFUSERS_TO_LDM_MAPPING,
        convert_controlnet_checkpoint,
    )

    state = dict(convert_controlnet_checkpoint(raw, config))
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if ldm_key in raw:
            state[diffusers_key] = raw[ldm_key]
    state = {k: v for k, v in state.items() if v is not None}
    taken = {id(v) for v in state.values()}
    left = [k for k, v in raw.items() if id(v) not in taken]
    if left:
        raise CheckpointError(f"{path.name}: {len(left)} ControlNet weights of no known layout, e.g. {left[0]}")
    return state


def _load_strictly(module: torch.nn.Module, state: dict, path: Path) -> None:
    expected = module.state_dict(keep_vars=True)
    what = type(module).__name__
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing {len(missing)} weights, e.g. {missing[0]}" if missing else "",
                 f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]}" if unexpected else ""]
        raise CheckpointError(f"{path.name}: does not fit a {what}: " + "; ".join(p for p in parts if p))
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"{path.name}: {what} weight {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                              f"expected {tuple(expected[bad[0]].shape)}")
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise CheckpointError(f"{path.name}: {what} has tensors the file does not provide")
