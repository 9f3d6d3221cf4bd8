"""IP-Adapter files and the CLIP vision encoders they read: what a file is, from its names and
shapes, and its weights, offline.

Facts of the files (h94/IP-Adapter's, which ComfyUI and A1111's ControlNet extension use as they are):
- an IP-Adapter is `image_proj.*` (how the image becomes extra context tokens) plus `ip_adapter.N.to_k_ip`
  / `.to_v_ip` (a key and value projection for the U-Net's N-th attention processor; only the
  cross-attention ones, so N = 1, 3, 5, ...). A .safetensors file holds them flat under those two
  prefixes, a .bin as two nested dicts;
- the base adapter projects the encoder's image embedding (`image_proj.proj`, 4 tokens), "plus" runs a
  resampler over the penultimate hidden states (`image_proj.latents`, `proj_in`, ...), "full face"
  an MLP over them (`image_proj.proj.3`); FaceID adapters need a face model and are refused;
- the encoder is a CLIP vision tower with its projection under transformers' names (`vision_model.*`,
  `visual_projection.weight`): OpenCLIP ViT-H/14 for SD 1.x and the "vit-h" SDXL adapters, ViT-bigG/14
  for the other SDXL ones. Its config is read from the shapes; the head count and activation are the
  two facts shapes do not carry (`encoder_heads`, `encoder_activation`).

Weights are applied by diffusers' own IP-Adapter code (`pipelines.generate.ip_adapter`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from pipelines.models.build import empty_modules
from pipelines.models.checkpoint_file import CheckpointError, TensorSource, no_gc, read_header

PROJ, ADAPTER = "image_proj", "ip_adapter"
BASE, PLUS, FULL = "base", "plus", "full"
ENCODER_PREFIX = "vision_model."
# the widths whose CLIP vision towers are not 64 wide per head (OpenCLIP ViT-H/14: 1280 = 16 x 80;
# ViT-bigG/14: 1664 = 16 x 104); OpenAI's ViT-B and ViT-L are 64 wide, as are the tests' tiny ones
_HEADS_BY_WIDTH = {1280: 16, 1664: 16}
_QUICK_GELU_WIDTHS = (768, 1024)  # OpenAI's towers use quick_gelu, OpenCLIP's gelu
# cross-attention width -> the family the adapter was made for (messages only: the fit is checked on the U-Net)
_FAMILY_BY_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_ENCODER_NAMES = {1280: "OpenCLIP ViT-H/14 (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
                  1664: "OpenCLIP ViT-bigG/14 (e.g. CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)"}


@dataclass(frozen=True)
class IPAdapterSpec:
    """What an IP-Adapter needs: the encoder output it reads and the U-Net it fits."""

    variant: str  # BASE | PLUS | FULL
    encoder_width: int  # base: the encoder's projection width; plus/full: its hidden width
    context_width: int  # the U-Net's cross-attention width
    layers: int  # cross-attention processors it has weights for

    @property
    def hidden_states(self) -> bool:
        """Whether it reads the encoder's penultimate hidden states (else the projected embedding)."""
        return self.variant != BASE

    @property
    def family_label(self) -> str:
        return _FAMILY_BY_CONTEXT.get(self.context_width, f"a U-Net of context width {self.context_width}")

    def encoder_needed(self) -> str:
        """Words for the encoder this adapter reads, for errors."""
        kind = "hidden width" if self.hidden_states else "projection width"
        by_width = {1024: 1280, 1280: 1664} if not self.hidden_states else {}  # ViT-H projects to 1024, bigG 1280
        known = _ENCODER_NAMES.get(by_width.get(self.encoder_width, self.encoder_width))
        return f"a CLIP vision encoder of {kind} {self.encoder_width}" + (f": {known}" if known else "")


@dataclass(frozen=True)
class EncoderSpec:
    config: dict  # CLIPVisionConfig's fields

    @property
    def hidden_width(self) -> int:
        return self.config["hidden_size"]

    @property
    def projection_width(self) -> int:
        return self.config["projection_dim"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def fits(self, adapter: IPAdapterSpec) -> bool:
        return adapter.encoder_width == (self.hidden_width if adapter.hidden_states else self.projection_width)


# --- IP-Adapter ----------------------------------------------------------------------------------

def is_ip_adapter_keys(keys) -> bool:
    return any(k.startswith((PROJ + ".", ADAPTER + ".")) for k in keys)


def inspect_ip_adapter(shapes: dict[str, tuple]) -> IPAdapterSpec:
    """The spec of flat `image_proj.*` / `ip_adapter.*` shapes; CheckpointError with the reason otherwise."""
    proj = {k[len(PROJ) + 1:]: v for k, v in shapes.items() if k.startswith(PROJ + ".")}
    to_k = {k: v for k, v in shapes.items() if re.match(rf"{ADAPTER}\.\d+\.to_k_ip\.weight$", k)}
    if not proj or not to_k:
        raise CheckpointError("not an IP-Adapter (no image_proj and ip_adapter weights)")
    if any(k.startswith("perceiver_resampler.") for k in proj) or "norm.weight" in proj and "proj.0.weight" in proj:
        raise CheckpointError("a FaceID IP-Adapter (it needs a face recognition model), which is not supported")
    if any(".to_k_lora." in k for k in shapes):
        raise CheckpointError("an IP-Adapter with LoRA weights (FaceID), which is not supported")
    context = next(iter(to_k.values()))[1]
    if "proj.weight" in proj:
        return IPAdapterSpec(BASE, proj["proj.weight"][1], context, len(to_k))
    if "proj.3.weight" in proj:
        return IPAdapterSpec(FULL, proj["proj.0.weight"][0], context, len(to_k))
    if "latents" in proj and "proj_in.weight" in proj:
        return IPAdapterSpec(PLUS, proj["proj_in.weight"][1], context, len(to_k))
    raise CheckpointError("an IP-Adapter of unknown image projection (no proj, proj.3 or resampler latents)")


def _flat_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A .bin/.pth adapter's two nested dicts, flattened to the .safetensors names (weights_only:
    never an arbitrary pickle)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles: never retry without it
        raise CheckpointError(f"{path.name}: refused to load: not a plain weights file ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: does not contain a state dict")
    flat = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
        elif isinstance(value, torch.Tensor):
            flat[key] = value
    return flat


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # heavy: only when reading weights

        return load_file(str(path))
    return _flat_torch_file(path)


def _shapes(path: Path) -> dict[str, tuple]:
    """Names and shapes, read once per file version (a .bin is loaded whole to read them)."""
    st = path.stat()
    return dict(_shapes_of_version(str(path), st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=64)
def _shapes_of_version(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, tuple], ...]:
    if path.endswith(".safetensors"):
        return tuple(read_header(Path(path)).shapes.items())
    return tuple((k, tuple(v.shape)) for k, v in _flat_torch_file(Path(path)).items())


def inspect_ip_adapter_file(path: Path) -> IPAdapterSpec:
    """The spec of an IP-Adapter file (header only for .safetensors); CheckpointError naming the file."""
    path = Path(path)
    try:
        return inspect_ip_adapter(_shapes(path))
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc


def describe_ip_adapter_file(path: Path) -> dict:
    """What a listing shows about an IP-Adapter file ({"error": ...} when it is none we can use)."""
    try:
        spec = inspect_ip_adapter_file(path)
    except (CheckpointError, OSError) as exc:
        return {"error": str(exc)}
    return {"control_type": "ip_adapter", "variant": spec.variant, "family_label": spec.family_label,
            "encoder_width": spec.encoder_width, "context_width": spec.context_width}


def is_ip_adapter_file(path: Path) -> bool:
    """Whether a file (in models/ControlNet, say) is an IP-Adapter, from its key names alone."""
    try:
        return is_ip_adapter_keys(_shapes(Path(path)))
    except (CheckpointError, OSError, ValueError):
        return False


@no_gc()
def load_ip_adapter(path: Path, dtype: torch.dtype = torch.float32) -> tuple[IPAdapterSpec, dict]:
    """(spec, state) with state = {"image_proj": {...}, "ip_adapter": {...}}: what diffusers'
    `UNet2DConditionModel._load_ip_adapter_weights` takes."""
    path = Path(path)
    flat = _tensors(path)
    try:
        spec = inspect_ip_adapter({k: tuple(v.shape) for k, v in flat.items()})
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc
    state: dict[str, dict] = {PROJ: {}, ADAPTER: {}}
    for key, value in flat.items():
        group, _, name = key.partition(".")
        if group in state:
            state[group][name] = value.to(dtype)
    return spec, state


def check_fits_unet(spec: IPAdapterSpec, unet_context_width: int, unet_layers: int) -> str | None:
    """Why an adapter does not fit a U-Net (its cross-attention width and layer count), or None."""
    if spec.context_width != unet_context_width or spec.layers != unet_layers:
        return (f"it is an IP-Adapter for {spec.family_label} ({spec.layers} cross-attention layers of width "
                f"{spec.context_width}); the checkpoint's U-Net has {unet_layers} of width {unet_context_width}")
    return None


# --- CLIP vision encoder -------------------------------------------------------------------------

def encoder_heads(width: int) -> int:
    return _HEADS_BY_WIDTH.get(width, max(1, width // 64))


def encoder_activation(width: int) -> str:
    return "quick_gelu" if width in _QUICK_GELU_WIDTHS else "gelu"


def _layer_count(shapes, prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def encoder_config(shapes: dict[str, tuple]) -> EncoderSpec:
    """CLIPVisionConfig fields from a vision tower's shapes (transformers' names)."""
    p = ENCODER_PREFIX
    if any(k.startswith(("visual.transformer.", "visual.trunk.")) for k in shapes):
        raise CheckpointError("an OpenCLIP-layout vision tower; use the transformers-layout file "
                              "(vision_model.* keys, as ComfyUI's clip_vision files are)")
    try:
        patch = shapes[p + "embeddings.patch_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        projection = shapes["visual_projection.weight"][0]
        intermediate = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as exc:
        raise CheckpointError(f"not a CLIP vision encoder with projection (missing {exc.args[0]})") from None
    width, channels, patch_size = patch[0], patch[1], patch[2]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(f"unexpected vision position embedding of {positions} positions")
    return EncoderSpec({"hidden_size": width, "intermediate_size": intermediate, "projection_dim": projection,
                        "num_hidden_layers": _layer_count(shapes, p), "num_attention_heads": encoder_heads(width),
                        "num_channels": channels, "image_size": grid * patch_size, "patch_size": patch_size,
                        "hidden_act": encoder_activation(width)})


def inspect_encoder_file(path: Path) -> EncoderSpec:
    path = Path(path)
    try:
        return encoder_config(_shapes(path))
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc


def describe_encoder_file(path: Path) -> dict:
    """What a listing shows about a CLIP vision encoder file ({"error": ...} when unusable)."""
    try:
        spec = inspect_encoder_file(path)
    except (CheckpointError, OSError) as exc:
        return {"error": str(exc)}
    return {"hidden_width": spec.hidden_width, "projection_width": spec.projection_width,
            "image_size": spec.image_size}


@no_gc()
def load_image_encoder(path: Path, dtype: torch.dtype = torch.float32):
    """The file's CLIPVisionModelWithProjection (weights strictly; text-tower keys of a whole-CLIP
    file and position-id buffers are left out)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # heavy: only when loading

    path = Path(path)
    header = read_header(path) if path.suffix == ".safetensors" else None
    tensors = None if header else _flat_torch_file(path)
    shapes = header.shapes if header else {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        spec = encoder_config(shapes)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc
    with empty_modules():
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec.config))
    wanted = model.state_dict(keep_vars=True)
    if header:
        with TensorSource(header) as source:
            state = {k: source.get(k, dtype) for k in shapes if k in wanted}
    else:
        state = {k: v.to(dtype) for k, v in tensors.items() if k in wanted}
    missing = [k for k, v in wanted.items() if k not in state and v.is_meta]
    if missing:
        raise CheckpointError(f"{path.name}: not a whole CLIP vision encoder (missing {missing[0]})")
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval().requires_grad_(False)


def image_processor(spec_or_size: EncoderSpec | int):
    """CLIP's preprocessing at the encoder's size: shortest side resized (bicubic), centre crop,
    CLIP's mean and std (CLIPImageProcessor's defaults, as diffusers' pipelines feed the encoder)."""
    from transformers import CLIPImageProcessor  # heavy: only when encoding

    size = spec_or_size if isinstance(spec_or_size, int) else spec_or_size.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
