"""Read a checkpoint into diffusers components, offline.

1. Sniff the format from the bytes (never the file name): safetensors, a torch
   pickle/zip that only `torch.load(weights_only=True)` may open, or a diffusers folder.
2. Read the header (names, shapes, dtypes, offsets, metadata) and detect the family.
3. Infer each component's config from tensor shapes; the prediction type from a `.yaml`
   beside the file, the safetensors metadata, or the family's rule (`resolve_prediction`).
4. Build the modules on the meta device (no random init) and assign the weights as views
   of the mmapped file (no copy), cast to the run dtype on the way where it differs;
   diffusers' own U-Net/VAE key conversion is used, the open_clip text encoders are
   renamed here (`open_clip_to_hf`).
Tokenizer files ship in `configs/`; the Hub is never contacted.

Memory: a safetensors file is mapped once (private, read-only in practice). A tensor whose
dtype already is the run dtype stays a view of the mapping, so a model loaded at the
file's dtype costs no anonymous memory at all; a tensor is cast as it is read and the
file pages it came from are dropped from this process at once, so at no point do two
copies of a model (or of one component) live in RAM. A tensor to be cast is handed to the
kernel's read-ahead first, so a cold file is read in large chunks rather than page by page.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import mmap
import re
import struct
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from pipelines.models.families import (
    EPSILON,
    FAMILIES,
    SD1,
    SD2,
    SDXL,
    SDXL_REFINER,
    UNET_PREFIX,
    V_PREDICTION,
    VAE_PREFIX,
    Family,
    TextEncoderSpec,
    UnsupportedCheckpoint,
    detect_family,
)
from pipelines.models.registry import metadata_card

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"
EMA_PREFIX = "model_ema."


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message says why, for the user."""


# --- 1. format ----------------------------------------------------------------------------

def sniff_format(path: Path) -> str:
    """'safetensors', 'torch' or 'diffusers' from the content; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "diffusers"
        raise CheckpointError(f"{path.name}: a folder without model_index.json is not a diffusers model")
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

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


@dataclass
class CheckpointHeader:
    path: Path
    format: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    # safetensors only: name -> (dtype, begin, end) with offsets from the start of the file
    entries: dict[str, tuple[str, int, int]] = field(default_factory=dict)


@contextlib.contextmanager
def _no_gc():
    """Loading builds tens of thousands of objects (header entries, modules, tensors) and no
    garbage cycles; a full collection set off by them walks the whole heap, torch's and
    diffusers' half a million objects included (0.2 s, more than the rest of a warm load)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_no_gc()
def read_header(path: Path) -> CheckpointHeader:
    """Names, shapes and metadata. For safetensors this reads only the JSON header."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "diffusers":
        return CheckpointHeader(path, fmt, {}, _diffusers_metadata(path))
    if fmt == "safetensors":
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            size = path.stat().st_size
            metadata = header.pop("__metadata__", None) or {}
            shapes, entries, data_end = {}, {}, 0
            base = 8 + header_len
            for key, entry in header.items():
                shapes[key] = tuple(int(n) for n in entry["shape"])
                begin, end = (int(n) for n in entry["data_offsets"])
                entries[key] = (str(entry["dtype"]), base + begin, base + end)
                data_end = max(data_end, end)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path.name}: unreadable safetensors header ({exc})") from exc
        if base + data_end > size:
            raise CheckpointError(f"{path.name}: file is truncated ({size} bytes, header needs {base + data_end})")
        return CheckpointHeader(path, fmt, shapes, {str(k): str(v) for k, v in metadata.items()}, entries)
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
    """Reads tensors by name from a checkpoint: views of a private mmap for safetensors."""

    def __init__(self, header: CheckpointHeader):
        self.header = header
        self._map: mmap.mmap | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> "TensorSource":
        if self.header.format == "safetensors":
            with open(self.header.path, "rb") as f:
                # ACCESS_COPY: a private mapping, so torch gets a writable buffer and nothing
                # can ever write back to the user's file
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        else:
            self._state = _torch_state_dict(self.header.path)
        return self

    def __exit__(self, *exc) -> None:
        # tensors still viewing the mapping keep it alive; it is unmapped when the last one goes
        self._map = None
        self._state = None

    def get(self, key: str, dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
        """The tensor: a view of the file, or, if `dtype` differs (floating point only) or a 4-D
        weight is wanted channels-last, a copy made in one pass whose file pages are dropped
        from this process at once."""
        tensor = self._view(key)
        cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
        relayout = channels_last and tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last)
        if cast or relayout:
            self._read_ahead(key)
            tensor = tensor.to(dtype=dtype if cast else tensor.dtype,
                               memory_format=torch.channels_last if relayout else torch.preserve_format)
            self.release([key])
        return tensor

    def _view(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        dtype_name, begin, end = self.header.entries[key]
        shape = self.header.shapes[key]
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{self.header.path.name}: tensor {key} has unsupported dtype {dtype_name}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if begin % itemsize:  # a misaligned tensor (very old writers): copy just this one
            return torch.frombuffer(bytearray(self._map[begin:end]), dtype=dtype).reshape(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=begin).reshape(shape)

    def _read_ahead(self, key: str) -> None:
        """Have the kernel read a tensor about to be cast in one go, not page fault by page fault
        (a view that stays a view is left to be read when first used)."""
        if self._map is None or key not in self.header.entries or not hasattr(mmap, "MADV_WILLNEED"):
            return
        _, begin, end = self.header.entries[key]
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_WILLNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def with_prefix(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {k: self.get(k, dtype) for k in self.header.shapes if k.startswith(prefix)}

    def release(self, keys) -> None:
        """Drop the file pages of these tensors from this process (they were copied by a cast).

        On a private file mapping MADV_DONTNEED only forgets the pages: a later read of the
        same range faults them in again from the file, so this is safe even if a view of
        one of these tensors is still in use.
        """
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for key in keys:
            entry = self.header.entries.get(key)
            if entry is None:
                continue
            start = -(-entry[1] // page) * page
            stop = entry[2] // page * page
            if stop > start:
                try:
                    self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
                except (OSError, ValueError):
                    return


# --- 3. configs from shapes --------------------------------------------------------------

@dataclass
class ModelSpec:
    family: Family
    inpainting: bool
    prediction_type: str  # diffusers' name: "epsilon" | "v_prediction"
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_configs: list[dict[str, Any]]
    native_resolution: int
    prediction_source: str = "family default"  # where prediction_type came from, for the UI
    ema: bool = False  # the U-Net weights are the file's EMA copy
    declared_resolution: int | None = None  # what the file's metadata says it was trained at

    @property
    def description(self) -> str:
        return self.family.label + (" inpainting" if self.inpainting else "")

    def with_prediction(self, prediction_type: str, source: str) -> "ModelSpec":
        prediction_type = normalise_prediction(prediction_type) or EPSILON
        native = self.declared_resolution or self.family.resolution_for(prediction_type, self.inpainting)
        return replace(self, prediction_type=prediction_type, prediction_source=source, native_resolution=native)


def declared_resolution(metadata: dict[str, str]) -> int | None:
    """The training size a file states (`sdui.native_resolution`, or the model spec's
    `modelspec.resolution` "WxH"), so a 64 px demo model or a 768 px fine-tune opens at its size."""
    for key in ("sdui.native_resolution", "modelspec.resolution"):
        text = str(metadata.get(key, "")).lower().split("x")[0].strip()
        if text.isdigit() and 64 <= int(text) <= 4096 and int(text) % 8 == 0:
            return int(text)
    return None


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


# --- prediction type ---------------------------------------------------------------------

def normalise_prediction(value: str | None) -> str | None:
    """'v', 'v-prediction', 'v_prediction' -> 'v_prediction'; 'eps', 'epsilon' -> 'epsilon'."""
    if value is None:
        return None
    v = str(value).strip().strip("\"'").lower().replace("-", "_")
    if v in ("v", "v_prediction", "vpred", "v_pred", "v_parameterization"):
        return V_PREDICTION
    if v in ("eps", "epsilon", "noise"):
        return EPSILON
    return None


def yaml_beside(path: Path) -> Path | None:
    for suffix in (".yaml", ".yml"):
        candidate = Path(path).with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def prediction_from_yaml(path: Path) -> str | None:
    """A1111's `<checkpoint>.yaml`: `model.params.parameterization: "v"`; LDM's default is eps."""
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        params = (config.get("model") or {}).get("params") or {}
    except Exception:  # an unreadable yaml is ignored, like a missing one
        return None
    return normalise_prediction(params.get("parameterization", "eps"))


def prediction_from_metadata(metadata: dict[str, str]) -> str | None:
    for key in ("modelspec.prediction_type", "prediction_type", "sd_prediction_type"):
        found = normalise_prediction(metadata.get(key))
        if found:
            return found
    if str(metadata.get("ss_v_parameterization", "")).lower() == "true":  # kohya's trainers
        return V_PREDICTION
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if arch.endswith("-v") or "v-prediction" in arch or "v_prediction" in arch:
        return V_PREDICTION
    return None


def prediction_from_name(path: Path) -> str | None:
    """Stability's SD 2.x file names: `768-v-ema`, `v2-1_768-ema-pruned` (v); `512-base-ema` (eps)."""
    stem = Path(path).stem.lower()
    if re.search(r"(^|[^0-9])768([^0-9]|$)", stem) or re.search(r"(^|[-_ .])v([-_ .]|$)", stem):
        return V_PREDICTION
    if re.search(r"(^|[^0-9])512([^0-9]|$)", stem) or "base" in stem:
        return EPSILON
    return None


def resolve_prediction(header: CheckpointHeader, family: Family, inpainting: bool) -> tuple[str, str]:
    """(prediction type, where it came from): yaml beside the file, metadata, then the family rule.

    The family rule: epsilon, except SD 2.x (non-inpainting) files whose weights cannot say:
    the file name (Stability's names say 768 or v for the v models, 512 or base for the
    epsilon ones), else 'probe' — decided when loaded by running the U-Net once
    (`probe_v_prediction`). A user override (registry) wins over all of this.
    """
    found = yaml_beside(header.path)
    if found is not None:
        value = prediction_from_yaml(found)
        if value:
            return value, f"{found.name}"
    value = prediction_from_metadata(header.metadata)
    if value:
        return value, "file metadata"
    if family.prediction_undecidable and not inpainting:
        value = prediction_from_name(header.path)
        if value:
            return value, "file name"
        return EPSILON, "probe"
    return EPSILON, "family default"


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """A1111's test for SD 2.x: at t=999 on a constant latent, a v model's output minus the
    input averages below -1, an epsilon model's stays near 0."""
    dtype = unet.dtype
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=dtype, device=unet.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=dtype, device=unet.device)
    out = unet(x, torch.tensor([999], device=unet.device), encoder_hidden_states=context).sample
    return bool((out.float() - x.float()).mean().item() < -1)


# --- inspection ------------------------------------------------------------------------------

def _unet_ema_keys(shapes) -> dict[str, str] | None:
    """LDM U-Net name -> its EMA copy's name, when the file is a full (EMA + training) one."""
    if sum(1 for k in shapes if k.startswith(EMA_PREFIX)) <= 100:
        return None
    mapping = {}
    for key in shapes:
        if key.startswith(UNET_PREFIX):
            ema = EMA_PREFIX + key[len("model."):].replace(".", "")
            if ema not in shapes or shapes[ema] != shapes[key]:
                return None
            mapping[key] = ema
    return mapping or None


def inspect_checkpoint(header: CheckpointHeader) -> ModelSpec:
    """Family, variant, prediction type and component configs, from names and shapes alone."""
    if header.format == "diffusers":
        return inspect_diffusers_folder(header.path)
    family = detect_family(header.shapes)
    try:
        unet = infer_unet_config(header.shapes, family)
        vae = infer_vae_config(header.shapes, family.latent_scaling_factor, family.native_resolution)
        encoders = [infer_clip_config(header.shapes, spec) for spec in family.text_encoders]
    except (KeyError, IndexError, StopIteration) as exc:
        raise CheckpointError(f"{header.path.name}: incomplete {family.label} checkpoint (missing {exc})") from exc
    inpainting = unet["in_channels"] == 9
    prediction, source = resolve_prediction(header, family, inpainting)
    spec = ModelSpec(
        family=family,
        inpainting=inpainting,
        prediction_type=prediction,
        prediction_source=source,
        unet_config=unet,
        vae_config=vae,
        text_encoder_configs=encoders,
        native_resolution=family.native_resolution,
        ema=_unet_ema_keys(header.shapes) is not None,
        declared_resolution=declared_resolution(header.metadata),
    )
    return spec.with_prediction(prediction, source)


def describe(header: CheckpointHeader) -> dict:
    """Listing facts for the checkpoint browser (header only, never the weights)."""
    spec = inspect_checkpoint(header)
    return {
        "family": spec.description,
        "family_id": spec.family.name,
        "inpainting": spec.inpainting,
        "resolution": spec.native_resolution,
        "prediction": spec.prediction_type,
        "prediction_source": spec.prediction_source,
        "ema": spec.ema,
        "format": header.format,
        **metadata_card(header.metadata),
        "metadata": {k: v for k, v in header.metadata.items() if len(v) < 2000},
    }


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
        return modules_nbytes(self.modules())

    def with_prediction(self, prediction_type: str, source: str = "user override") -> "Components":
        """The same modules under another prediction type (no reload: only the schedule changes)."""
        return replace(self, spec=self.spec.with_prediction(prediction_type, source))

    def with_vae(self, vae) -> "Components":
        return replace(self, vae=vae)


def modules_nbytes(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def load_tokenizer(spec: TextEncoderSpec):
    """The shipped CLIP BPE tokenizer with the family's pad token (shared: read-only in use)."""
    return _tokenizer(spec.pad_token)


@functools.lru_cache(maxsize=None)
def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token, local_files_only=True)


def _fit_names(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match `text_model.`-prefixed names to the module: transformers 5 dropped that level in
    CLIPTextModel (but not in CLIPTextModelWithProjection); files and transformers 4 have it."""
    expected = module.state_dict(keep_vars=True).keys()
    out = {}
    for key in expected:
        if key in state:
            out[key] = state[key]
        elif "text_model." + key in state:
            out[key] = state["text_model." + key]
    if "embeddings.position_ids" in " ".join(expected):
        for key in expected:
            if key.endswith("embeddings.position_ids") and key not in out:
                n = module.config.max_position_embeddings
                out[key] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    return out


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
            path: Path) -> bool:
    """Put the tensors into the meta module (no copy where the dtype matches); True if any was cast."""
    expected = module.state_dict(keep_vars=True)  # keep_vars: no detach() per tensor
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path.name}: {what} is missing {len(missing)} weights, e.g. {missing[0]}")
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{path.name}: {what} weight {k} has shape {tuple(state[k].shape)}, "
                              f"expected {tuple(expected[k].shape)}")
    # Set each tensor straight into its module's parameter/buffer slot: what
    # load_state_dict(assign=True) does, minus its per-attribute Python overhead (a third
    # of a second for a U-Net); shapes were checked above.
    submodules = dict(module.named_modules())
    any_cast = False
    for k in expected:
        t = state[k]
        if t.is_floating_point() and t.dtype != dtype:
            t, any_cast = t.to(dtype), True
        owner_name, _, leaf = k.rpartition(".")
        owner = submodules[owner_name]
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
    return any_cast


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


def _text_encoder_state(source: TensorSource, spec: TextEncoderSpec,
                        dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    keys = [k for k in source.header.shapes if k.startswith(spec.prefix)]
    raw = {k: source.get(k, dtype) for k in keys}
    if spec.layout == "open_clip":
        return open_clip_to_hf(raw, spec.prefix, spec.pooled), keys
    state = {}
    for k, v in raw.items():
        name = k[len(spec.prefix):]
        if not name.startswith("text_model."):
            name = "text_model." + name  # older files
        state[name] = v
    return state, keys


def build_text_encoder(config: dict[str, Any], spec: TextEncoderSpec):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if spec.pooled else CLIPTextModel
    with init_empty_weights(include_buffers=False), _no_init_weights():
        return cls(CLIPTextConfig(**config))


_TORCH_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "eye_",
                         "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                         "orthogonal_")
_init_patch_lock = threading.Lock()


def _skip_meta(init_function):
    @functools.wraps(init_function)
    def init(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else init_function(tensor, *args, **kwargs)
    return init


@contextlib.contextmanager
def _empty_modules():
    """Construct modules with meta parameters and no weight initialisation: the weights come
    from the file. accelerate puts the parameters on meta; torch.nn.init is told to leave meta
    tensors alone (random init on meta still runs torch's Python decompositions: 40% of building
    a U-Net). Real tensors, in other threads too, are initialised as usual."""
    init = torch.nn.init
    with _init_patch_lock:
        from accelerate import init_empty_weights

        originals = {name: getattr(init, name) for name in _TORCH_INIT_FUNCTIONS if hasattr(init, name)}
        try:
            for name, function in originals.items():
                setattr(init, name, _skip_meta(function))
            with init_empty_weights():
                yield
        finally:
            for name, function in originals.items():
                setattr(init, name, function)


def _no_init_weights():
    """transformers' switch that skips the (pointless, on meta tensors) weight initialisation."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            from contextlib import nullcontext as no_init_weights
    return no_init_weights()


@_no_gc()
def load_components(path: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                    header: CheckpointHeader | None = None, probe: bool = True, unet_channels_last: bool = False,
                    vae_channels_last: bool = False) -> Components:
    """Build every component of a checkpoint, the weights going from the file straight in
    (cast, and made channels-last where asked, in the same single copy)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    path = Path(path)
    header = header or read_header(path)
    if header.format == "diffusers":
        return load_diffusers_folder(path, dtype, vae_dtype)
    spec = inspect_checkpoint(header)
    with TensorSource(header) as source:
        with _empty_modules():
            unet = UNet2DConditionModel(**spec.unet_config)
        unet_keys = [k for k in header.shapes if k.startswith(UNET_PREFIX)]
        ema = _unet_ema_keys(header.shapes)
        raw = {k: source.get(ema[k] if ema else k, dtype, unet_channels_last) for k in unet_keys}
        unet_state = convert_ldm_unet_checkpoint(raw, unet.config)
        del raw
        if _assign(unet, unet_state, dtype, "the U-Net", path):
            source.release([ema[k] for k in unet_keys] if ema else unet_keys)
        del unet_state

        with _empty_modules():
            vae = AutoencoderKL(**spec.vae_config)
        vae_keys = [k for k in header.shapes if k.startswith(VAE_PREFIX)]
        vae_raw = {k: source.get(k, vae_dtype or dtype, vae_channels_last) for k in vae_keys}
        vae_state = convert_ldm_vae_checkpoint(vae_raw, vae.config)
        del vae_raw
        if _assign(vae, vae_state, vae_dtype or dtype, "the VAE", path):
            source.release(vae_keys)
        del vae_state

        encoders, tokenizers = [], []
        for enc_spec, config in zip(spec.family.text_encoders, spec.text_encoder_configs):
            encoder = build_text_encoder(config, enc_spec)
            try:
                state, keys = _text_encoder_state(source, enc_spec, dtype)
            except KeyError as exc:
                raise CheckpointError(f"{path.name}: the text encoder is missing {exc}") from exc
            if _assign(encoder, _fit_names(encoder, state), dtype, "the text encoder", path):
                source.release(keys)
            del state
            encoders.append(encoder)
            tokenizers.append(load_tokenizer(enc_spec))
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    if probe and spec.prediction_source == "probe":
        v = probe_v_prediction(unet)
        spec = spec.with_prediction(V_PREDICTION if v else EPSILON, "probe")
    return Components(spec=spec, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers)


# --- separate VAE files ----------------------------------------------------------------------

@_no_gc()
def load_vae(path: Path, dtype: torch.dtype, scaling_factor: float, sample_size: int = 512):
    """A VAE file (models/VAE or a `<checkpoint>.vae.safetensors` sidecar): original layout
    (`encoder.down.0...`, optionally under `first_stage_model.`) or diffusers layout."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    header = read_header(path)
    if header.format == "diffusers":
        raise CheckpointError(f"{path.name}: a VAE must be a single file")
    shapes = header.shapes
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX + "encoder.") for k in shapes) else ""
    diffusers_layout = any(k.startswith(prefix + "encoder.down_blocks.") for k in shapes)
    with TensorSource(header) as source:
        if diffusers_layout:
            config = _diffusers_vae_config(shapes, prefix, scaling_factor, sample_size)
            state = {k[len(prefix):]: source.get(k, dtype) for k in shapes
                     if k.startswith(prefix) and not k.startswith((prefix + "loss.", EMA_PREFIX))}
        else:
            try:
                config = infer_vae_config(shapes, scaling_factor, sample_size, prefix=prefix)
            except (KeyError, IndexError, UnsupportedCheckpoint) as exc:
                raise CheckpointError(f"{path.name}: not a VAE (no encoder/decoder weights)") from exc
            keys = [k for k in shapes if k.startswith(prefix) and not k.startswith(("loss.", EMA_PREFIX))]
            state = None
        with _empty_modules():
            vae = AutoencoderKL(**config)
        if state is None:
            state = convert_ldm_vae_checkpoint({k: source.get(k, dtype) for k in keys}, vae.config)
        if _assign(vae, state, dtype, "the VAE", path):
            source.release(list(shapes))
    return vae.eval().requires_grad_(False)


def _diffusers_vae_config(shapes, prefix: str, scaling_factor: float, sample_size: int) -> dict[str, Any]:
    return _vae_config(shapes, prefix, scaling_factor, sample_size, down="down_blocks", block="resnets")


# --- diffusers folders -------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(path).parent.name}/{Path(path).name}: unreadable ({exc})") from exc


def _diffusers_metadata(folder: Path) -> dict[str, str]:
    index = _read_json(folder / "model_index.json")
    return {"diffusers.pipeline": str(index.get("_class_name", ""))}


def _component_present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def inspect_diffusers_folder(folder: Path) -> ModelSpec:
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    for part in ("unet", "vae"):
        if not _component_present(index, part) or not (folder / part / "config.json").is_file():
            raise CheckpointError(f"{folder.name}: not a Stable Diffusion pipeline (no {part}/config.json)")
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    has_te1 = _component_present(index, "text_encoder")
    has_te2 = _component_present(index, "text_encoder_2")
    if unet.get("addition_embed_type") == "text_time":
        family = SDXL if has_te1 and has_te2 else SDXL_REFINER
    else:
        te = _read_json(folder / "text_encoder" / "config.json") if has_te1 else {}
        family = SD2 if te.get("hidden_act") == "gelu" else SD1
    encoder_dirs = {SDXL.name: ["text_encoder", "text_encoder_2"], SDXL_REFINER.name: ["text_encoder_2"]}.get(
        family.name, ["text_encoder"])
    encoders = []
    for name in encoder_dirs:
        if not (folder / name / "config.json").is_file():
            raise CheckpointError(f"{folder.name}: {family.label} pipeline without {name}/config.json")
        encoders.append(_read_json(folder / name / "config.json"))
    scheduler = {}
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    inpainting = unet.get("in_channels") == 9
    prediction = normalise_prediction(scheduler.get("prediction_type")) or EPSILON
    spec = ModelSpec(family=family, inpainting=inpainting, prediction_type=prediction,
                     prediction_source="scheduler config" if scheduler else "family default",
                     unet_config=unet, vae_config=vae, text_encoder_configs=encoders,
                     native_resolution=family.native_resolution)
    spec = spec.with_prediction(prediction, spec.prediction_source)
    sample = unet.get("sample_size")
    if isinstance(sample, int) and sample * 8 in (512, 768, 1024):
        spec = replace(spec, native_resolution=sample * 8)
    return spec


def load_diffusers_folder(folder: Path, dtype: torch.dtype = torch.float32,
                          vae_dtype: torch.dtype | None = None) -> Components:
    """A diffusers pipeline folder, from its own files only (never the Hub)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    spec = inspect_diffusers_folder(folder)

    def variant(sub: str) -> dict:
        files = [p.name for p in (folder / sub).iterdir() if p.is_file()]
        plain = any(re.fullmatch(r"[\w-]+\.(safetensors|bin)", f) for f in files)
        return {} if plain or not any(".fp16." in f for f in files) else {"variant": "fp16"}

    common = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **common, **variant("unet"))
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype or dtype, **common, **variant("vae"))
        dirs = {SDXL.name: ["text_encoder", "text_encoder_2"], SDXL_REFINER.name: ["text_encoder_2"]}.get(
            spec.family.name, ["text_encoder"])
        tok_dirs = [d.replace("text_encoder", "tokenizer") for d in dirs]
        encoders, tokenizers = [], []
        for enc_spec, d, t in zip(spec.family.text_encoders, dirs, tok_dirs):
            cls = CLIPTextModelWithProjection if enc_spec.pooled else CLIPTextModel
            encoders.append(cls.from_pretrained(folder / d, torch_dtype=dtype, **common, **variant(d)))
            if (folder / t).is_dir():
                tokenizers.append(CLIPTokenizer.from_pretrained(str(folder / t), **common))
            else:
                tokenizers.append(load_tokenizer(enc_spec))
    except (OSError, ValueError, EnvironmentError) as exc:
        raise CheckpointError(f"{folder.name}: could not load the diffusers folder ({exc})") from exc
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return Components(spec=spec, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers)


__all__ = [
    "CheckpointError", "CheckpointHeader", "Components", "ModelSpec", "TensorSource", "FAMILIES",
    "sniff_format", "read_header", "inspect_checkpoint", "describe", "load_components", "load_vae",
    "load_diffusers_folder", "metadata_card", "resolve_prediction", "probe_v_prediction", "open_clip_to_hf",
]
