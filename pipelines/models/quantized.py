"""Denoisers whose weights stay small in memory: GGUF files kept quantized, fp8-stored files
kept in fp8, and NF4 (bitsandbytes) files refused where they cannot run. Family-agnostic: the
caller names diffusers' model class and gives the config it read from the shapes.

- GGUF: diffusers' own GGUF support (`from_single_file` with a `GGUFQuantizationConfig`), fed
  the file's tensors still quantized and our config written to a local folder, so nothing is
  fetched; each linear layer dequantizes its weight when it runs, with our faster decoders
  (`gguf_dequant`: diffusers' `GGUFLinear` subclassed for our layers only), or, when asked
  for (`--gguf-dequantize-once`) and the memory plan has room, once on its first step.
- fp8 (F8_E4M3 / F8_E5M2 safetensors): the weights stay in fp8 (views of the file until the
  first step) and diffusers' layerwise casting lifts one layer at a time to the run dtype.
  torch stores and converts fp8 on the CPU and on every CUDA GPU; Apple's MPS has no fp8 type,
  so there the weights are cast as they are read (twice the memory) instead.
- NF4: bitsandbytes' 4-bit blocks only compute on CUDA with bitsandbytes; on the CPU the file
  is refused with what to use instead.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from pipelines.models.checkpoint_file import SAFETENSORS_DTYPES, CheckpointError, CheckpointHeader
from pipelines.models.gguf_dequant import use_fast_dequantize
from pipelines.models.gguf_files import decoded_bytes, is_gguf, main_quant_type, quantized_state, stored_bytes

FP8_NAMES = ("F8_E4M3", "F8_E5M2")  # safetensors' names of float8_e4m3fn and float8_e5m2
NF4_MARKERS = (".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4")
# ComfyUI's "fp8_scaled" files: fp8 weights times a per-layer `scale_weight` (and a `scaled_fp8` marker)
SCALED_FP8_MARKERS = ("scaled_fp8", ".scale_weight")
NF4_ON_CPU = ("NF4 needs bitsandbytes on CUDA; use a GGUF Q4 or fp8 file on the CPU "
              "(the same model is usually shared as both)")


# --- what a file is stored as ------------------------------------------------------------------

def is_nf4(shapes) -> bool:
    """A bitsandbytes 4-bit file (Forge's "bnb-nf4" checkpoints): packed weights with their
    absmax / quant_map / quant_state companions."""
    return any(key.endswith(NF4_MARKERS) for key in shapes)


def stored_fp8_dtype(header: CheckpointHeader, keys=None) -> torch.dtype | None:
    """The fp8 dtype most of these tensors (default: all) are stored in, or None when the
    file holds no fp8 weights."""
    counts: dict[str, int] = {}
    for key in header.shapes if keys is None else keys:
        entry = header.entries.get(key)
        if entry and entry[0] in FP8_NAMES:
            counts[entry[0]] = counts.get(entry[0], 0) + 1
    if not counts:
        return None
    return SAFETENSORS_DTYPES.get(max(counts, key=counts.get))


def storage_description(header: CheckpointHeader) -> str | None:
    """What the listing says about how the weights are stored: "GGUF Q4_0", "fp8 (e4m3fn)",
    "NF4", or None for plain fp32/fp16/bf16 files."""
    if is_gguf(header):
        return f"GGUF {main_quant_type(header)}"
    if is_nf4(header.shapes):
        return "NF4"
    fp8 = stored_fp8_dtype(header)
    return f"fp8 ({str(fp8).removeprefix('torch.float8_')})" if fp8 is not None else None


def fp8_storage_supported(device: torch.device | str) -> bool:
    """Whether fp8 tensors can live on this device (storage and conversion; no fp8 math is
    asked for): the CPU and CUDA can, MPS has no float8 type."""
    return torch.device(device).type in ("cpu", "cuda")


def weights_bytes(header: CheckpointHeader, keys, compute_dtype: torch.dtype, keep_fp8: bool = True,
                  gguf_decoded: bool = False) -> int:
    """What these weights take in memory once loaded: GGUF blocks as stored (plus every
    weight at the compute dtype when `gguf_decoded`: layers that keep their decoded weights),
    fp8 weights one byte each when kept in fp8, everything else at the compute dtype."""
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    keys = list(keys)
    if is_gguf(header):
        decoded = decoded_bytes(header, keys, itemsize) if gguf_decoded else 0
        return stored_bytes(header, keys, itemsize) + decoded
    total = 0
    for key in keys:
        count = 1
        for n in header.shapes[key]:
            count *= n
        entry = header.entries.get(key)
        total += count * (1 if keep_fp8 and entry and entry[0] in FP8_NAMES else itemsize)
    return total


def is_scaled_fp8(shapes) -> bool:
    return any(key.endswith(SCALED_FP8_MARKERS) for key in shapes)


def check_runnable(header: CheckpointHeader, device: torch.device | str) -> None:
    """A CheckpointError naming the file when its weights' format cannot run on `device`
    (NF4 anywhere but CUDA with bitsandbytes; ComfyUI's scaled fp8 anywhere yet), from the
    header alone: called before anything loaded is evicted."""
    if is_scaled_fp8(header.shapes):
        raise CheckpointError(f"{header.path.name}: a scaled fp8 file (ComfyUI's \"fp8_scaled\": each layer's "
                              "weights times its scale_weight) cannot be loaded yet; use the plain fp8_e4m3fn "
                              "file or a GGUF file of the same model")
    if not is_nf4(header.shapes):
        return
    if torch.device(device).type != "cuda":
        raise CheckpointError(f"{header.path.name}: {NF4_ON_CPU}")
    if importlib.util.find_spec("bitsandbytes") is None:  # optional: only NF4 files would need it
        raise CheckpointError(f"{header.path.name}: NF4 needs bitsandbytes on CUDA (pip install bitsandbytes), "
                              "or use a GGUF Q4 or fp8 file of the same model")
    raise CheckpointError(f"{header.path.name}: NF4 files cannot be loaded yet (diffusers' single-file loader "
                          "takes no pre-quantized bitsandbytes weights); use a GGUF Q4 or fp8 file of the same model")


# --- loading ------------------------------------------------------------------------------------

def load_gguf_transformer(header: CheckpointHeader, model_class, config: dict, compute_dtype: torch.dtype,
                          prefix: str = "", convert=None, *, keep_dequantized: bool = False) -> torch.nn.Module:
    """A diffusers transformer (`model_class`, e.g. SD3Transformer2DModel) from a GGUF file,
    its linear layers' weights kept quantized and computed in `compute_dtype`. `config` is the
    model's diffusers config (read from the shapes); `prefix` the key prefix inside the file
    (GGUF files have none); `convert`: the caller's original -> diffusers names function, run
    on the still quantized tensors (default: diffusers' own converter for `model_class`).
    `keep_dequantized`: each layer keeps its weight decoded after its first step (faster
    steps, `gguf_files.decoded_bytes` more memory: the caller checks the room first).
    Offline: the config goes to a local folder, nothing is fetched."""
    # heavy: diffusers' GGUF quantizer, only when loading
    from diffusers import GGUFQuantizationConfig

    state = quantized_state(header, prefix)
    if convert is not None:
        state = convert(state)
    with tempfile.TemporaryDirectory(prefix="sdui-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps({"_class_name": model_class.__name__, **config}))
        try:
            model = model_class.from_single_file(
                state, config=folder, local_files_only=True, torch_dtype=compute_dtype,
                quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{header.path.name}: could not load the GGUF {model_class.__name__} "
                                  f"({str(exc).splitlines()[0]})") from exc
    check_complete(model, header.path, model_class.__name__)
    use_fast_dequantize(model, keep_dequantized)
    return model.eval().requires_grad_(False)


def check_complete(model: torch.nn.Module, path: Path, what: str) -> None:
    """A CheckpointError naming the first weight the file did not fill (it would still be on
    the meta device, where the first step would fail obscurely)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointError(f"{path.name}: the {what} is missing weights, e.g. {name}")


def keep_fp8(module: torch.nn.Module, state: dict[str, torch.Tensor], compute_dtype: torch.dtype,
             storage_dtype: torch.dtype) -> torch.nn.Module:
    """Put `state` (checked: every weight there with its shape) into the meta-built `module`:
    the tensors the file stores in `storage_dtype` (fp8) stay in it, each leaf layer holding
    some lifts them to `compute_dtype` while it runs and drops the copies after (a diffusers
    layerwise-casting hook, so `module.dtype` is the compute dtype); every other tensor is held
    in `compute_dtype`. Nothing is rounded beyond what the file stores. fp8 tensors stay views
    of the file's mapping until first used."""
    state = {k: (v.to(compute_dtype) if v.is_floating_point() and v.dtype != storage_dtype else v)
             for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    hook_class = fp8_hook_class()
    for sub in module.modules():
        stored = [t for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)] if t.dtype == storage_dtype]
        if not stored:
            continue
        if list(sub.children()):  # a container's own tensors (rare): lifted once
            for name, param in list(sub.named_parameters(recurse=False)):
                if param.dtype == storage_dtype:
                    setattr(sub, name, torch.nn.Parameter(param.to(compute_dtype), requires_grad=False))
            for name, buffer in list(sub.named_buffers(recurse=False)):
                if buffer.dtype == storage_dtype:
                    setattr(sub, name, buffer.to(compute_dtype))
            continue
        hook_class.attach(sub, storage_dtype, compute_dtype)
    return module.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def fp8_hook_class():
    """diffusers' layerwise casting hook, changed to keep the stored fp8 tensors: `pre_forward`
    puts compute-dtype copies in their place, `post_forward` puts the originals back (no cast
    back to fp8, so a layer's non-fp8 bias is never rounded and no time goes to re-casting)."""
    # heavy: diffusers' hooks, only when an fp8 file is loaded
    from diffusers.hooks import HookRegistry  # heavy: as above
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook  # heavy: as above

    class KeepStoredFp8(LayerwiseCastingHook):
        def initialize_hook(self, module):
            self.stored = {}
            return module  # the tensors stay as loaded

        def pre_forward(self, module, *args, **kwargs):
            self.post_forward(module, None)  # a step that raised left copies in place: put the originals back
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.dtype == self.storage_dtype:
                    self.stored[name] = tensor
                    lifted = tensor.to(self.compute_dtype, non_blocking=self.non_blocking)
                    setattr(module, name, torch.nn.Parameter(lifted, requires_grad=False)
                            if isinstance(tensor, torch.nn.Parameter) else lifted)
            return args, kwargs

        def post_forward(self, module, output):
            for name, tensor in self.stored.items():
                setattr(module, name, tensor)
            self.stored = {}
            return output

        @classmethod
        def attach(cls, module, storage_dtype, compute_dtype):
            # the name diffusers' own hook has, which `ModelMixin.dtype` looks for
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                cls(storage_dtype, compute_dtype, non_blocking=False), "layerwise_casting")

    return KeepStoredFp8
