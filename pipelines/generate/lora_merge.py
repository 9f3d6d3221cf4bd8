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
    """Merge the active peft adapters of `components` into copies of the weights they sit on,
    keeping the originals, and record `merged` on every module. The caller then takes the peft
    layers out (their base layers now hold the merged weights)."""
    try:
        for module in _modules(components):
            record, copied = _records.setdefault(module, _Record(merged, [])), set()
            for layer in _tuner_layers(module):
                base = layer.get_base_layer()
                if id(base) not in copied:  # a LoRA layer wrapped in a LoHa/LoKr one: one base, one copy
                    copied.add(id(base))
                    for name in ("weight", "bias"):
                        param = base._parameters.get(name)
                        if param is not None:
                            record.originals.append((base, name, param))
                            setattr(base, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
                layer.merge()
    except BaseException:
        restore(components)  # half merged is no state to keep
        raise


def merged_bytes(components) -> int:
    """Bytes held twice because a set is merged (the originals kept aside)."""
    return sum(p.numel() * p.element_size() for module in _modules(components)
               for _, _, p in (_records[module].originals if module in _records else []))
