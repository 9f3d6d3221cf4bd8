"""Tiny ControlNet and T2I-Adapter files for tests (a helper module, not a test file).

Each fits the tiny U-Net of `tiny.make_tiny(family)`: a ControlNet copies its config (block
channels, cross-attention width, transformer depths, SDXL's ADM embedding); a T2I-Adapter
gives one feature map per U-Net level (SDXL: the real adapters' four, the last for the middle
block). Every weight is random and non-zero, the zero convolutions included, so a control
changes the image. The files come in the layouts people have:
- ControlNet "original": LDM names under `control_model.` (`input_hint_block`, `zero_convs`, ...);
- ControlNet "diffusers": the module's own names;
- T2I-Adapter "original": TencentARC's `conv_in` / `body.N.*` names; "diffusers": `adapter.*`.
A `.pth`/`.pt`/`.bin` path is written with torch.save (plain tensors), anything else as safetensors.

    from tests.tiny_control import make_tiny_controlnet, write_tiny_controlnet
    module = make_tiny_controlnet("sd1", seed=0)          # what the file below holds
    path = write_tiny_controlnet(tmp_path / "cn.safetensors", family="sd1", layout="original", seed=0)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

try:
    from pipelines.models import export, ldm_layout
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipelines.models import export, ldm_layout

try:
    from tiny import TINY_FAMILIES
except ImportError:
    from tests.tiny import TINY_FAMILIES

LAYOUTS = ("original", "diffusers")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
ZERO_INIT_STD = 0.05  # the weights diffusers starts at zero: small, so the U-Net's output stays finite


def _fill_zeros(module: torch.nn.Module) -> torch.nn.Module:
    """Random values where diffusers initialises zeros (zero convolutions, conv_out, biases)."""
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.normal_(0.0, ZERO_INIT_STD)
    return module.eval()


def make_tiny_controlnet(family: str = "sd1", seed: int = 0):
    """A ControlNetModel that fits `tiny.make_tiny(family)`'s U-Net, random non-zero weights from `seed`."""
    from diffusers import ControlNetModel

    unet_config = TINY_FAMILIES[family][0]
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet_config.items() if k in accepted}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _fill_zeros(ControlNetModel(**config))


def adapter_config(family: str = "sd1", light: bool = False) -> dict:
    """A T2IAdapter config giving one feature per level of the tiny U-Net of `family`."""
    channels = list(TINY_FAMILIES[family][0]["block_out_channels"])
    if light:  # light adapters exist for SD 1.x only; this one does not fit a U-Net, it tests loading
        return {"in_channels": 3, "channels": channels[:1], "num_res_blocks": 2, "downscale_factor": 8,
                "adapter_type": "light_adapter"}
    if family == "sdxl":  # four features like the real ones: three levels and the middle block
        return {"in_channels": 3, "channels": [*channels, channels[-1]], "num_res_blocks": 2,
                "downscale_factor": 16, "adapter_type": "full_adapter_xl"}
    return {"in_channels": 3, "channels": channels, "num_res_blocks": 2, "downscale_factor": 8,
            "adapter_type": "full_adapter"}


def make_tiny_t2i_adapter(family: str = "sd1", seed: int = 0, light: bool = False):
    """A T2IAdapter for `tiny.make_tiny(family)`'s U-Net, random weights from `seed`."""
    from diffusers import T2IAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _fill_zeros(T2IAdapter(**adapter_config(family, light)))


def controlnet_original_state_dict(module, prefix: str = "control_model.") -> dict:
    """A ControlNetModel's tensors under the original (lllyasviel / A1111) names."""
    state = module.state_dict()
    cond = "controlnet_cond_embedding."
    blocks = sorted({int(k[len(cond + "blocks."):].split(".")[0]) for k in state if k.startswith(cond + "blocks.")})
    out, unet_part = {}, {}
    for key, tensor in state.items():
        leaf = key.rsplit(".", 1)[1]
        if key.startswith(cond + "conv_in."):
            out[f"input_hint_block.0.{leaf}"] = tensor
        elif key.startswith(cond + "blocks."):
            out[f"input_hint_block.{2 * int(key.split('.')[2]) + 2}.{leaf}"] = tensor
        elif key.startswith(cond + "conv_out."):
            out[f"input_hint_block.{2 * len(blocks) + 2}.{leaf}"] = tensor
        elif key.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{key.split('.')[1]}.0.{leaf}"] = tensor
        elif key.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{leaf}"] = tensor
        else:
            unet_part[key] = tensor
    config = dict(module.config)
    config["up_block_types"] = list(reversed(config["down_block_types"]))  # no decoder: only the count matters
    out.update(ldm_layout.unet_to_ldm(unet_part, config))
    return {prefix + k: v for k, v in out.items()}


def adapter_original_state_dict(module) -> dict:
    """A T2IAdapter's tensors under TencentARC's names (`body.N` = level * res blocks + block)."""
    light = module.config.adapter_type == "light_adapter"
    per_level = module.config.num_res_blocks
    out = {}
    for key, tensor in module.state_dict().items():
        parts = key.split(".")  # adapter.body.L.(in_conv|out_conv|resnets.J).* or adapter.conv_in.*
        if parts[1] == "conv_in":
            out[".".join(parts[1:])] = tensor
        elif parts[3] == "resnets":
            level, block, rest = int(parts[2]), int(parts[4]), ".".join(parts[5:])
            name = f"body.{level}.body.{block}" if light else f"body.{level * per_level + block}"
            out[f"{name}.{rest}"] = tensor
        else:
            level, rest = int(parts[2]), ".".join(parts[3:])
            out[f"body.{level if light else level * per_level}.{rest}"] = tensor
    return out


def save_state(path, state: dict, dtype: torch.dtype | None = None) -> Path:
    """safetensors, or a plain-tensor torch.save file for .pth/.pt/.bin paths."""
    path = Path(path)
    if path.suffix.lower() in TORCH_SUFFIXES:
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                 for k, v in state.items()}
        torch.save(state, path)
        return path
    return export.save_checkpoint(path, state, dtype=dtype)


def write_tiny_controlnet(path, family: str = "sd1", layout: str = "original", seed: int = 0,
                          dtype: torch.dtype | None = None, prefix: str = "control_model.") -> Path:
    """`make_tiny_controlnet(family, seed)` written in `layout` (original: under `prefix`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    module = make_tiny_controlnet(family, seed)
    state = controlnet_original_state_dict(module, prefix) if layout == "original" else module.state_dict()
    return save_state(path, state, dtype)


def write_tiny_t2i_adapter(path, family: str = "sd1", layout: str = "original", seed: int = 0,
                           dtype: torch.dtype | None = None, light: bool = False) -> Path:
    """`make_tiny_t2i_adapter(family, seed, light)` written in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    module = make_tiny_t2i_adapter(family, seed, light)
    state = adapter_original_state_dict(module) if layout == "original" else module.state_dict()
    return save_state(path, state, dtype)
