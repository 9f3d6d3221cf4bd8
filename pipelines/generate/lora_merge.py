"""A job's LoRA set merged into the weights, and kept there for the next job that asks for it.

As peft layers, a LoRA costs every step an extra low-rank pass per layer, and putting the set
on the cached model and taking it off again cost each request about 0.7 s (SD 1.5, a rank-64
LCM LoRA). So, as A1111, Forge and ComfyUI do, `lora.applied` merges the set: every layer a
LoRA touches gets a merged copy of its weight (peft's own `merge`, so LoHa, LoKr and DoRA
merge as peft defines them), the original Parameter is kept aside, and the peft layers are
taken out. The set stays merged until a job asks for another set, or none: then the originals
go back (the very same tensors, nothing is subtracted, so no bf16 rounding builds up).
The price is memory: the layers a set touches are held twice while it is merged (a set whose
copies would take more than half the free memory is not merged).

What cannot be merged keeps the per-job peft layers (`mergeable`): quantized weights (GGUF,
fp8), weights that accelerate's offload hooks hold, and DoRA with a magnitude per input
channel (a forward pre-hook, which peft's merge does not know).

The record is per module (U-Net and each text encoder): a text encoder shared by two
checkpoints is never left with the other checkpoint's set merged.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from dataclasses import dataclass

import torch

from pipelines.models.memory import available_bytes

log = logging.getLogger(__name__)

MERGEABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_owners = itertools.count(1)


@dataclass(frozen=True)
class MergedSet:
    """A LoRA set as merged: what identifies it, the uses that loaded, what loading said."""

    key: tuple
    loaded: list  # the LoraUse objects that took effect
    warnings: tuple[str, ...]  # said again for every job that reuses the set


@dataclass
class _Record:
    merged: MergedSet
    originals: list  # (module, parameter name, original Parameter)


# module -> its merged set and original parameters; weak, so an evicted model takes its record along
_records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_owner_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _modules(components) -> list:
    return [components.unet, *components.text_encoders]


def set_key(components, uses) -> tuple:
    """What a merged set must match to be reused: this checkpoint's U-Net and, per LoRA, the file
    (path, size, mtime: an edited file loads again) and its two multipliers."""
    unet = components.unet
    if unet not in _owner_tokens:
        _owner_tokens[unet] = next(_owners)
    files = []
    for use in uses:
        try:
            stat = os.stat(use.path)
            stamp = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        files.append((str(use.path), *stamp, float(use.te), float(use.unet)))
    return (_owner_tokens[unet], tuple(files))


def current(components, key: tuple) -> MergedSet | None:
    """The merged set every module of `components` carries, when it is `key`'s."""
    records = [_records.get(module) for module in _modules(components)]
    if records and all(r is not None and r.merged.key == key for r in records):
        return records[0].merged
    return None


def restore(components) -> None:
    """Put back the original weights of any set merged into `components`' modules."""
    for module in _modules(components):
        record = _records.pop(module, None)
        for owner, name, original in reversed(record.originals if record else []):
            now = getattr(owner, name)
            if original.device != now.device:  # the module moved (model offload) while merged
                original = torch.nn.Parameter(original.to(now.device), requires_grad=False)
            setattr(owner, name, original)


def _tuner_layers(module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer  # heavy: only when a LoRA is used

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def mergeable(components) -> bool:
    """Whether every peft layer on `components` can be merged into a plain weight copy, and the
    copies fit in half the memory free where the weights are (the job needs the rest)."""
    copies, devices = {}, set()
    for module in _modules(components):
        for layer in _tuner_layers(module):
            base = layer.get_base_layer()
            weight = getattr(base, "weight", None)
            if type(weight) is not torch.nn.Parameter or weight.dtype not in MERGEABLE_DTYPES \
                    or weight.device.type == "meta" or hasattr(base, "_hf_hook") \
                    or getattr(base, "_diffusers_hook", None) is not None or layer._forward_pre_hooks \
                    or not hasattr(layer, "merge"):
                return False
            copies[id(base)] = weight.numel() * weight.element_size()
            devices.add(weight.device)
    needed, free = sum(copies.values()), min((available_bytes(d) for d in devices), default=0)
    if needed > free // 2:
        log.info("LoRA kept as peft layers for this job: merging copies %.1f GB, %.1f GB free",
                 needed / 1e9, free / 1e9)
        return False
    return True


def merge(components, merged: MergedSet) -> None:
    """Merge the active peft adapters of `components` into new weights for the layers they sit on,
    keeping the originals, and record `merged` on every module. The caller then takes the peft
    layers out (their base layers now hold the merged weights)."""
    try:
        for module in _modules(components):
            record = _records.setdefault(module, _Record(merged, []))
            originals = {}  # id(base) -> its original weight
            for layer in _tuner_layers(module):
                if not _acts(layer):  # its adapters are at weight 0 (left inactive): nothing to copy
                    continue
                base = layer.get_base_layer()
                if id(base) not in originals:  # a LoRA layer wrapped in a LoHa/LoKr one: one base
                    originals[id(base)] = base.weight
                    record.originals += [(base, name, base._parameters[name]) for name in ("weight", "bias")
                                         if base._parameters.get(name) is not None]
                weight = _merged_lora_weight(layer, base)
                if weight is not None:
                    setattr(base, "weight", torch.nn.Parameter(weight, requires_grad=False))
                    continue
                if base.weight is originals[id(base)]:  # peft merges in place: into a copy
                    for name in ("weight", "bias"):
                        param = base._parameters.get(name)
                        if param is not None:
                            setattr(base, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
                layer.merge()  # LoHa, LoKr, DoRA: as peft defines them
    except BaseException:
        restore(components)  # half merged is no state to keep
        raise


def _acts(layer) -> bool:
    """Whether one of the layer's own adapters (LoRA, LoHa, LoKr: peft's `adapter_layer_names`) is active."""
    own: set[str] = set()
    for name in getattr(layer, "adapter_layer_names", ()):
        own.update(getattr(layer, name, {}).keys())
    return any(adapter in own for adapter in layer.active_adapters)


def _merged_lora_weight(layer, base) -> torch.Tensor | None:
    """W + sum of scale * B@A over a plain peft LoRA layer's active adapters, on a Linear or a 1-group
    Conv2d whose up matrix is 1x1 (as kohya and diffusers write them): one GEMM per adapter with W as
    its addend, in W's dtype and memory layout (a new tensor; W stays as it is). None for anything
    else, which peft's own `merge` then does. (peft computes a conv delta as a convolution of the
    two factors in fp32, then adds it in W's dtype: 9.5 s for a rank-64 SD 1.5 LoRA on resnets and
    attention on this 2-core CPU.)"""
    from peft.tuners.lora.layer import LoraLayer  # heavy: only when a LoRA is used

    if not isinstance(layer, LoraLayer) or getattr(layer, "fan_in_fan_out", False) \
            or not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(base, "groups", 1) != 1:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(a)
           or getattr(layer, "lora_bias", {}).get(a) or layer.lora_B[a].weight.shape[2:] not in ((), (1, 1))
           for a in active):
        return None
    weight = base.weight.detach()
    # the very strides of W: a 1x1 conv weight counts as contiguous either way, but a copy in the other
    # layout makes every step convert it (10% slower steps, measured)
    nhwc = weight.dim() == 4 and weight.stride() == _channels_last_strides(weight.shape)
    merged = None
    for adapter in active:
        up, down = layer.lora_B[adapter].weight.flatten(1), layer.lora_A[adapter].weight
        if nhwc:  # (out, kh, kw, in) in memory: the GEMM's output is the channels-last weight as it lies
            down = down.permute(0, 2, 3, 1)
        down = down.reshape(down.shape[0], -1)
        into = merged if merged is not None else \
            (weight.permute(0, 2, 3, 1) if nhwc else weight).reshape(weight.shape[0], -1)
        # one GEMM with W as the addend: accumulated in fp32 by the kernel, rounded once (also for bf16)
        merged = torch.addmm(into, up.to(weight.dtype), down.to(weight.dtype), alpha=float(layer.scaling[adapter]))
    if merged is None:
        return None
    if nhwc:
        out, _, kh, kw = weight.shape
        return merged.view(out, kh, kw, -1).permute(0, 3, 1, 2)
    return merged.view(weight.shape)


def _channels_last_strides(shape) -> tuple[int, ...]:
    _, channels, height, width = shape
    return (channels * height * width, 1, width * channels, channels)


def merged_bytes(components) -> int:
    """Bytes held twice because a set is merged (the originals kept aside)."""
    return sum(p.numel() * p.element_size() for module in _modules(components)
               for _, _, p in (_records[module].originals if module in _records else []))
