"""Build a checkpoint's modules and put the file's weights in, offline.

The modules are built on the meta device (no random init) from the configs the shapes give
(`architecture`), and the weights are assigned as views of the mapped file (no copy), cast
to the run dtype on the way where it differs (`checkpoint_file.TensorSource`); diffusers'
own U-Net/VAE key conversion is used, the open_clip text encoders are renamed by
`architecture.open_clip_to_hf`. Tokenizer files ship in `pipelines/configs/`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path
from typing import Any

import torch

from pipelines.models.architecture import diffusers_vae_config, infer_vae_config, open_clip_to_hf, unet_ema_keys
from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, TensorSource, no_gc, read_header
from pipelines.models.clip_tokenizer import load_tokenizer
from pipelines.models.diffusers_folder import load_diffusers_folder
from pipelines.models.families import (
    EMA_PREFIX,
    EPSILON,
    UNET_PREFIX,
    V_PREDICTION,
    VAE_PREFIX,
    TextEncoderSpec,
    UnsupportedCheckpoint,
)
from pipelines.models.inspection import inspect_checkpoint
from pipelines.models.spec import Components


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
    """A transformers CLIP text model of this config, on the meta device, not initialised."""
    from accelerate import init_empty_weights  # heavy: imports only when building models
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # heavy: likewise

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
def empty_modules():
    """Construct modules with meta parameters and no weight initialisation: the weights come
    from the file. accelerate puts the parameters on meta; torch.nn.init is told to leave meta
    tensors alone (random init on meta still runs torch's Python decompositions: 40% of building
    a U-Net). Real tensors, in other threads too, are initialised as usual."""
    init = torch.nn.init
    with _init_patch_lock:
        from accelerate import init_empty_weights  # heavy: imports only when building models

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
    try:  # heavy (transformers), and where it lives depends on the version
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


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


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """A1111's test for SD 2.x: at t=999 on a constant latent, a v model's output minus the
    input averages below -1, an epsilon model's stays near 0."""
    dtype = unet.dtype
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=dtype, device=unet.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=dtype, device=unet.device)
    out = unet(x, torch.tensor([999], device=unet.device), encoder_hidden_states=context).sample
    return bool((out.float() - x.float()).mean().item() < -1)


@no_gc()
def load_components(path: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                    header: CheckpointHeader | None = None, probe: bool = True, unet_channels_last: bool = False,
                    vae_channels_last: bool = False) -> Components:
    """Build every component of a checkpoint, the weights going from the file straight in
    (cast, and made channels-last where asked, in the same single copy)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy: only when loading
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    path = Path(path)
    header = header or read_header(path)
    if header.format == "diffusers":
        return load_diffusers_folder(path, dtype, vae_dtype)
    spec = inspect_checkpoint(header)
    with TensorSource(header) as source:
        with empty_modules():
            unet = UNet2DConditionModel(**spec.unet_config)
        unet_keys = [k for k in header.shapes if k.startswith(UNET_PREFIX)]
        ema = unet_ema_keys(header.shapes)
        raw = {k: source.get(ema[k] if ema else k, dtype, unet_channels_last) for k in unet_keys}
        unet_state = convert_ldm_unet_checkpoint(raw, unet.config)
        del raw
        if _assign(unet, unet_state, dtype, "the U-Net", path):
            source.release([ema[k] for k in unet_keys] if ema else unet_keys)
        del unet_state

        with empty_modules():
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


@no_gc()
def load_vae(path: Path, dtype: torch.dtype, scaling_factor: float, sample_size: int = 512):
    """A VAE file (models/VAE or a `<checkpoint>.vae.safetensors` sidecar): original layout
    (`encoder.down.0...`, optionally under `first_stage_model.`) or diffusers layout."""
    from diffusers import AutoencoderKL  # heavy: only when loading
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
            config = diffusers_vae_config(shapes, prefix, scaling_factor, sample_size)
            state = {k[len(prefix):]: source.get(k, dtype) for k in shapes
                     if k.startswith(prefix) and not k.startswith((prefix + "loss.", EMA_PREFIX))}
        else:
            try:
                config = infer_vae_config(shapes, scaling_factor, sample_size, prefix=prefix)
            except (KeyError, IndexError, UnsupportedCheckpoint) as exc:
                raise CheckpointError(f"{path.name}: not a VAE (no encoder/decoder weights)") from exc
            keys = [k for k in shapes if k.startswith(prefix) and not k.startswith(("loss.", EMA_PREFIX))]
            state = None
        with empty_modules():
            vae = AutoencoderKL(**config)
        if state is None:
            state = convert_ldm_vae_checkpoint({k: source.get(k, dtype) for k in keys}, vae.config)
        if _assign(vae, state, dtype, "the VAE", path):
            source.release(list(shapes))
    return vae.eval().requires_grad_(False)
