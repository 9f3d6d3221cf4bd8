"""Read a single-file checkpoint into diffusers components, offline.

1. Sniff the format from the bytes (never the file name): safetensors, or a torch
   pickle/zip that only `torch.load(weights_only=True)` may open.
2. Read the header (names, shapes, metadata) and detect the family.
3. Infer each component's config from tensor shapes.
4. Build the modules on the meta device (no random init) and assign the converted
   weights, cast to the run dtype on the way; diffusers' own key conversion is used.
Tokenizer files ship in `configs/`; the Hub is never contacted.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .families import UNET_PREFIX, VAE_PREFIX, Family, TextEncoderSpec, UnsupportedCheckpoint, detect_family

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message says why, for the user."""


# --- 1. format ----------------------------------------------------------------------------

def sniff_format(path: Path) -> str:
    """'safetensors' or 'torch' from the first bytes; anything else is refused."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"  # zip archive (torch.save) or legacy pickle
    raise CheckpointError(f"{path.name}: not a safetensors or PyTorch checkpoint file")


# --- 2. header ----------------------------------------------------------------------------

@dataclass
class CheckpointHeader:
    path: Path
    format: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: Path) -> CheckpointHeader:
    """Names, shapes and metadata. For safetensors this reads only the JSON header."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            size = path.stat().st_size
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: unreadable safetensors header ({exc})") from exc
        metadata = header.pop("__metadata__", None) or {}
        shapes, data_end = {}, 0
        for key, entry in header.items():
            shapes[key] = tuple(entry["shape"])
            data_end = max(data_end, entry["data_offsets"][1])
        if 8 + header_len + data_end > size:
            raise CheckpointError(f"{path.name}: file is truncated ({size} bytes, header needs {8 + header_len + data_end})")
        return CheckpointHeader(path, fmt, shapes, {str(k): str(v) for k, v in metadata.items()})
    state = _torch_state_dict(path)
    return CheckpointHeader(path, fmt, {k: tuple(v.shape) for k, v in state.items()})


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # weights_only refuses arbitrary pickles: never retry without it
        raise CheckpointError(
            f"{path.name}: refused to load: it is not a plain weights file "
            f"(only tensors are allowed in .ckpt/.pt files; convert it to .safetensors). Detail: {exc}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


class TensorSource:
    """Reads tensors by name from a checkpoint, mmapped where the format allows."""

    def __init__(self, header: CheckpointHeader):
        self.header = header
        self._file = None
        self._state: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> "TensorSource":
        if self.header.format == "safetensors":
            from safetensors import safe_open

            self._file = safe_open(str(self.header.path), framework="pt", device="cpu")
        else:
            self._state = _torch_state_dict(self.header.path)
        return self

    def __exit__(self, *exc) -> None:
        self._file = None
        self._state = None

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        return self._file.get_tensor(key)

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.header.shapes if k.startswith(prefix)}


# --- 3. configs from shapes --------------------------------------------------------------

@dataclass
class ModelSpec:
    family: Family
    inpainting: bool
    prediction_type: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_configs: list[dict[str, Any]]
    native_resolution: int

    @property
    def description(self) -> str:
        return self.family.label + (" inpainting" if self.inpainting else "")


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
        depths.append(len(_indices(shapes, p + rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) or 1)
    attn_keys = [k for k in shapes if k.startswith(prefix) and k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise UnsupportedCheckpoint("U-Net without cross-attention layers")
    cross_dim = shapes[attn_keys[0]][1]
    proj_in = next(k for k in shapes if k.startswith(prefix) and k.endswith("proj_in.weight"))
    if family.unet_heads is not None:
        heads = [family.unet_heads] * levels
    else:
        heads = [max(1, c // family.unet_head_width) for c in channels]
    return {
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
    }


def infer_vae_config(shapes: dict[str, tuple], family: Family, prefix: str = VAE_PREFIX) -> dict[str, Any]:
    p = re.escape(prefix)
    levels = _indices(shapes, p + r"encoder\.down\.(\d+)\.")
    if not levels:
        raise UnsupportedCheckpoint("no VAE weights (first_stage_model.encoder.*)")
    layers = len(_indices(shapes, p + r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [shapes[prefix + f"encoder.down.{i}.block.{layers - 1}.conv2.weight"][0] for i in levels]
    return {
        "in_channels": shapes[prefix + "encoder.conv_in.weight"][1],
        "out_channels": shapes[prefix + "decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": shapes[prefix + "post_quant_conv.weight"][0],
        "norm_num_groups": 32,
        "sample_size": family.native_resolution,
        "scaling_factor": family.latent_scaling_factor,
    }


def infer_clip_config(shapes: dict[str, tuple], spec: TextEncoderSpec) -> dict[str, Any]:
    p = spec.prefix + "text_model."
    vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
    layers = _indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // 64),  # CLIP text encoders use head width 64
        "max_position_embeddings": shapes[p + "embeddings.position_embedding.weight"][0],
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def inspect_checkpoint(header: CheckpointHeader) -> ModelSpec:
    """Family, variant and component configs, from names and shapes alone."""
    family = detect_family(header.shapes)
    try:
        unet = infer_unet_config(header.shapes, family)
        vae = infer_vae_config(header.shapes, family)
        encoders = [infer_clip_config(header.shapes, spec) for spec in family.text_encoders]
    except (KeyError, IndexError, StopIteration) as exc:
        raise CheckpointError(f"{header.path.name}: incomplete {family.label} checkpoint (missing {exc})") from exc
    return ModelSpec(
        family=family,
        inpainting=unet["in_channels"] == 9,
        prediction_type=family.scheduler.get("prediction_type", "epsilon"),
        unet_config=unet,
        vae_config=vae,
        text_encoder_configs=encoders,
        native_resolution=family.native_resolution,
    )


# --- 4. build modules ---------------------------------------------------------------------

@dataclass
class Components:
    spec: ModelSpec
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return {**self.spec.family.scheduler, "prediction_type": self.spec.prediction_type}

    def modules(self) -> Iterator[torch.nn.Module]:
        yield self.unet
        yield self.vae
        yield from self.text_encoders

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules() for t in [*m.parameters(), *m.buffers()])


def load_tokenizer(spec: TextEncoderSpec):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=spec.pad_token, local_files_only=True)


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
            path: Path) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path.name}: {what} is missing {len(missing)} weights, e.g. {missing[0]}")
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{path.name}: {what} weight {k} has shape {tuple(state[k].shape)}, "
                              f"expected {tuple(expected[k].shape)}")
    cast = {k: state[k].to(dtype) if state[k].is_floating_point() else state[k] for k in expected}
    module.load_state_dict(cast, strict=True, assign=True)


def load_components(path: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                    header: CheckpointHeader | None = None) -> Components:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    header = header or read_header(path)
    spec = inspect_checkpoint(header)
    with TensorSource(header) as source:
        with init_empty_weights():
            unet = UNet2DConditionModel(**spec.unet_config)
        unet_state = convert_ldm_unet_checkpoint(source.with_prefix(UNET_PREFIX), unet.config)
        _assign(unet, unet_state, dtype, "the U-Net", path)
        del unet_state

        with init_empty_weights():
            vae = AutoencoderKL(**spec.vae_config)
        vae_state = convert_ldm_vae_checkpoint(source.with_prefix(VAE_PREFIX), vae.config)
        _assign(vae, vae_state, vae_dtype or dtype, "the VAE", path)
        del vae_state

        encoders, tokenizers = [], []
        for enc_spec, config in zip(spec.family.text_encoders, spec.text_encoder_configs):
            with init_empty_weights(include_buffers=False):
                encoder = CLIPTextModel(CLIPTextConfig(**config))
            state = {k[len(enc_spec.prefix):]: v for k, v in source.with_prefix(enc_spec.prefix).items()}
            if not any(k.startswith("text_model.") for k in encoder.state_dict()):
                # transformers 5 dropped the `text_model.` level that files (and transformers 4) use
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
            _assign(encoder, state, dtype, "the text encoder", path)
            encoders.append(encoder)
            tokenizers.append(load_tokenizer(enc_spec))
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return Components(spec=spec, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers)
