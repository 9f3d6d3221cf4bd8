"""LoRA from ``<lora:name:weight>`` tags, applied to the cached model for one request.

Files come from the registry's "lora" folder (models/Lora); kohya/A1111 key layouts
(``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``/``lora_te2_*`` for SDXL) and diffusers/peft
layouts are read by diffusers' own loader (`lora_state_dict` detects and converts them),
and injected through peft as adapters (LyCORIS LoHa/LoKr layers through peft's
LoHa/LoKr layers, see `lycoris`; DoRA layers, kohya names with a ``dora_scale``, through peft's
DoRA, see `_split_dora`): `applied(...)` loads them, sets each adapter's text-encoder and
U-Net weights, then merges them into copies of the weights and keeps the set merged for the
next job that asks for it (`lora_merge`); a job with another set, or none, gets the very same
original tensors back first. Layers that cannot be merged keep the peft layers for the job.
SD 3 and Flux files (their own layouts, on the transformer and the CLIPs) are read by `flow_lora`.

The infotext's ``Lora hashes: "name: 0123456789ab"`` uses A1111's short hash of a LoRA:
the first 12 hex digits of the sha256 of a .safetensors file's tensor data (the bytes after
its JSON header; kohya's "addnet" hash), or of the whole file for other formats.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from pipelines.core.extra_networks import ExtraNetwork, extract_extra_networks
from pipelines.core.fileio import sha256_file_cached
from pipelines.generate import flow_lora, lora_merge, lycoris
from pipelines.generate.flow_lora import OtherFamilyLora, has_adapter
from pipelines.generate.lora_files import listing, read_metadata, trigger_words
from pipelines.models.checkpoint_file import safetensors_data_start, torch_state_dict

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "sdui_lora_"


@dataclass
class LoraUse:
    """One LoRA of a request: its file and multipliers (A1111 order: te, then unet)."""

    name: str  # as written in the prompt
    path: Path
    te: float
    unet: float

    @property
    def short_hash(self) -> str:
        return short_hash(self.path)


def resolve(prompt: str, registry) -> tuple[list[LoraUse], list[str]]:
    """The LoRAs the prompt's tags name, and warnings for those that cannot be used
    (unknown name, bad weight). Other tag kinds (hypernet, ...) are warned about too."""
    _, networks = extract_extra_networks(prompt)
    uses: list[LoraUse] = []
    warnings: list[str] = []
    for net in networks:
        if not net.is_lora:
            warnings.append(f"{net.text}: extra network kind {net.kind!r} is not supported; ignored")
            continue
        file = registry.find("lora", net.name)  # file name, with or without folder, or stem
        if file is None:
            warnings.append(f"{net.text}: no LoRA named {net.name!r} in the Lora folder; ignored")
            continue
        try:
            te, unet = net.lora_weights()
        except ValueError as exc:
            warnings.append(f"{exc}; ignored")
            continue
        uses.append(LoraUse(net.name, Path(file.path), te, unet))
    return uses, warnings


def infotext_params(uses: list[LoraUse]) -> dict[str, str]:
    """``Lora hashes`` as A1111 writes it: the name as the prompt mentions it, without the
    ":" and "," that would break the list, then the short hash."""
    if not uses:
        return {}
    return {"Lora hashes": ", ".join(f"{u.name.replace(':', '').replace(',', '')}: {u.short_hash}"
                                     for u in uses)}


# --- hashes ------------------------------------------------------------------------------------

def file_hash(path: Path) -> str:
    """sha256 of a .safetensors file's data after the header (A1111/kohya "addnet" hash),
    of the whole file otherwise. Cached by path, size and mtime."""
    start = safetensors_data_start(path) if str(path).endswith(".safetensors") else 0
    return sha256_file_cached(path, start=start)


def short_hash(path: Path) -> str:
    return file_hash(path)[:12]


# --- applying ------------------------------------------------------------------------------------

def _mixin(components):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # heavy

    if len(components.text_encoders) == 2:
        return StableDiffusionXLLoraLoaderMixin
    return StableDiffusionLoraLoaderMixin


def _text_encoder_prefixes(components) -> list[tuple[str, object]]:
    if flow_lora.is_flow(components):  # SD 3, Flux: their CLIPs (T5 takes no LoRA)
        return flow_lora.text_encoder_prefixes(components)
    encoders = components.text_encoders
    if len(encoders) == 2:
        return [("text_encoder", encoders[0]), ("text_encoder_2", encoders[1])]
    if components.spec.family.name == "sdxl_refiner" or (len(encoders) == 1 and getattr(
            components.spec.family.text_encoders[0], "pooled", False)):
        return [("text_encoder_2", encoders[0])]
    return [("text_encoder", encoders[0])]


def read_state_dict(path: Path) -> dict:
    """A LoRA file's tensors (.safetensors, or a weights-only torch pickle)."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    return torch_state_dict(path)


@dataclass
class _Prepared:
    use: LoraUse
    adapter: str
    plain: dict  # LoRA tensors for diffusers' loader (kohya or diffusers/peft layout)
    lycoris: list  # LoHa/LoKr layers
    names: list  # the peft adapters it became
    unmatched: list  # its LoHa/LoKr layers that fit no module
    failed: bool = False


def _prepare(use: LoraUse, adapter: str, warnings) -> _Prepared | None:
    try:
        plain, layers, unknown = lycoris.split(read_state_dict(use.path))
    except Exception as exc:  # noqa: BLE001 - a broken file must not fail the request
        _warn(warnings, f"LoRA {use.name}: {use.path.name} could not be read ({exc}); ignored")
        return None
    if unknown:
        _warn(warnings, f"LoRA {use.name}: {use.path.name} has {len(unknown)} layer(s) in a format this app "
                        f"does not read (e.g. {unknown[0]}); those are ignored")
    if not plain and not layers:
        return None
    return _Prepared(use, adapter, plain, layers, [], [])


@contextlib.contextmanager
def applied(components, uses: list[LoraUse], warnings: list[str] | None = None):
    """`uses` in effect on the cached modules for the block (a job): merged into the weights and
    left merged for the next job with the same set (`lora_merge`), or, where the layers cannot be
    merged, as peft adapters removed afterwards. No `uses`: the modules as loaded.
    A file that cannot be read or matched is reported in `warnings` and skipped."""
    key = lora_merge.set_key(components, uses)
    reused = lora_merge.current(components, key) if uses else None
    if reused is not None:  # the set is merged already
        for message in reused.warnings:
            _warn(warnings, message)
        yield list(reused.loaded)
        return
    lora_merge.restore(components)
    if not uses:
        yield []
        return
    said = [] if warnings is None else warnings
    before = len(said)
    encoders = _text_encoder_prefixes(components)
    try:
        prepared = [p for k, use in enumerate(uses) if (p := _prepare(use, f"{ADAPTER_PREFIX}{k}", warnings))]
        # module paths as they are before any peft layer goes in
        index = lycoris.module_index(components.unet, encoders) \
            if any(p.lycoris or _has_dora(p.plain) for p in prepared) else {}
        # plain LoRA first: peft can wrap a LoRA layer in a LoHa/LoKr layer, not the other way round
        for item in prepared:
            if item.plain:
                _load(components, item, warnings, lambda: _load_plain(components, encoders, item, index, warnings))
        for item in prepared:
            if item.lycoris and not item.failed:
                _load(components, item, warnings, lambda: lycoris.inject(item.lycoris, index, item.adapter))
        loaded = []
        for item in prepared:
            if item.failed:
                continue
            if not item.names:
                _warn(warnings, f"LoRA {item.use.name}: none of its layers match this model; ignored")
                continue
            if item.unmatched:
                _warn(warnings, f"LoRA {item.use.name}: {len(item.unmatched)} of its layers match nothing in this "
                                f"model (e.g. {item.unmatched[0]}); those are ignored")
            loaded.append((item.names, item.use))
        _set_weights(components, loaded)
        uses_loaded = [use for _, use in loaded]
        if loaded and lora_merge.mergeable(components):
            lora_merge.merge(components, lora_merge.MergedSet(key, uses_loaded, tuple(said[before:])))
            remove_all(components)  # the base layers hold the merged weights now
        yield uses_loaded
    finally:
        remove_all(components)


def _load(components, item: _Prepared, warnings, load) -> None:
    """Run one loading step of `item`; if it fails, take all of the file's adapters out again."""
    try:
        names, unmatched = load()
    except Exception as exc:  # noqa: BLE001 - a file that does not fit must not fail the request
        reason = str(exc) if isinstance(exc, OtherFamilyLora) else f"does not fit this model ({exc})"
        _warn(warnings, f"LoRA {item.use.name}: {reason}; ignored")
        for name in (item.adapter, *item.names,
                     *(f"{item.adapter}_{kind}" for kind in ("dora", "dora_in", "loha", "lokr"))):
            _remove_adapter(components, name)
        item.failed, item.names = True, []
        return
    item.names += names
    item.unmatched += unmatched


def _load_plain(components, encoders, item: _Prepared, index, warnings) -> tuple[list[str], list[str]]:
    """Plain LoRA tensors through diffusers' loader (it converts kohya names): the adapters
    any module took (`item.adapter`; `item.adapter` + "_dora" and "_dora_in" for DoRA layers,
    see `_split_dora`) and the DoRA layers that match no module, shaped like `lycoris.inject`'s answer."""
    prefixes = {id(components.unet): "unet", **{id(encoder): prefix for prefix, encoder in encoders}}
    plain, dora, dora_in, magnitudes, unmatched = _split_dora(item.plain, index, prefixes)
    names = []
    for state, adapter in ((plain, item.adapter), (dora, f"{item.adapter}_dora"),
                           (dora_in, f"{item.adapter}_dora_in")):
        if not state:
            continue
        hit, missing, notes = _load_into(components, encoders, state, adapter)
        names += [adapter] if hit else []
        unmatched += missing
        for note in notes:
            _warn(warnings, f"LoRA {item.use.name}: {note}")
    for (root, path), magnitude in magnitudes.items():  # the peft layers are in place now
        layer = root.get_submodule(path)
        if has_adapter(layer, f"{item.adapter}_dora_in"):
            magnitude = magnitude.to(layer.get_base_layer().weight)
            layer.register_forward_pre_hook(_input_magnitude(f"{item.adapter}_dora_in", magnitude))
    return names, unmatched


def _load_into(components, encoders, state: dict, adapter: str) -> tuple[bool, list[str], list[str]]:
    """`state` (kohya, diffusers or peft layout) as adapter `adapter`: whether any module took it, its
    layers that match no module, notes on what was left out (SD 3 and Flux: `flow_lora.load_into`)."""
    if flow_lora.is_flow(components):
        return flow_lora.load_into(components, state, adapter)
    flow_lora.check_family(components, state)  # an SD 3 / Flux file on a U-Net model
    mixin = _mixin(components)
    unet = components.unet
    try:
        state, alphas = mixin.lora_state_dict(state, unet_config=unet.config)
    except TypeError:
        state, alphas = mixin.lora_state_dict(state)
    hit = False
    if any(key.startswith("unet.") for key in state):
        mixin.load_lora_into_unet(state, alphas, unet=unet, adapter_name=adapter,
                                  low_cpu_mem_usage=flow_lora.FILE_WEIGHTS_ONLY)
        hit = hit or has_adapter(unet, adapter)
    for prefix, encoder in encoders:
        if any(key.startswith(prefix + ".") for key in state):
            mixin.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix, adapter_name=adapter,
                                              low_cpu_mem_usage=flow_lora.FILE_WEIGHTS_ONLY)
            hit = hit or has_adapter(encoder, adapter)
    return hit, [], []


def _has_dora(state: dict) -> bool:
    return any(key.endswith(".dora_scale") for key in state)


def _split_dora(state: dict, index, prefixes) -> tuple[dict, dict, dict, dict, list[str]]:
    """(the file's plain tensors without its DoRA layers, its DoRA layers with a magnitude per
    output channel and those with one per input channel, both in peft's layout, the latter's
    magnitudes by (root module, path), the names of DoRA layers that match no module).

    diffusers' loaders drop kohya's ``dora_scale`` (with only a log message), so DoRA layers are
    renamed here to peft keys, s = alpha / rank folded into lora_up (peft then scales by 1,
    times the multiplier). DoRA's weight is W' = m * (W + s*B@A) / ||W + s*B@A||; LyCORIS
    stores m as ``dora_scale``, and its ``wd_on_out`` says which norm:
    - True, shape (out, 1[, 1, 1]): the norm per output channel, peft's DoRA (loaded with
      peft's ``lora_magnitude_vector``, which makes diffusers create the layers with ``use_dora``);
    - False (the default of LyCORIS' kohya network, so of most SD/SDXL files), shape
      (1, in[, 1, 1]): the norm per input channel, which peft does not have; then
      W' = (W + s*B@A) * c with c = m / norm per input channel, i.e. a plain LoRA layer applied
      to the input scaled by c (`_input_magnitude`)."""
    plain = dict(state)
    dora, dora_in, magnitudes, unmatched = {}, {}, {}, []
    for key in [k for k in plain if k.endswith(".dora_scale")]:
        name = key[:-len(".dora_scale")]
        down, up = plain.pop(name + ".lora_down.weight"), plain.pop(name + ".lora_up.weight")
        scale, alpha = plain.pop(key), plain.pop(name + ".alpha", None)
        root, path = index.get(name, (None, None))
        if root is None:
            unmatched.append(name)
            continue
        weight = root.get_submodule(path).weight
        peft_name = f"{prefixes[id(root)]}.{path}"
        # diffusers' text-encoder loader reads peft names of attention layers only, so those get its
        # own naming (which it converts to peft's for every layer)
        a, b = ("lora_A", "lora_B") if prefixes[id(root)] == "unet" else \
            ("lora_linear_layer.down", "lora_linear_layer.up")
        per_output = scale.shape[0] == weight.shape[0] and scale.numel() == weight.shape[0]
        if not per_output and scale.numel() != weight.shape[1]:
            unmatched.append(name)  # a magnitude of no shape this module has
            continue
        target = dora if per_output else dora_in
        target[f"{peft_name}.{a}.weight"] = down
        target[f"{peft_name}.{b}.weight"] = up * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        if per_output:
            dora[peft_name + ".lora_magnitude_vector.weight"] = scale.reshape(
                (-1,) if weight.ndim == 2 else (1, -1, *(1 for _ in weight.shape[2:])))
        else:
            magnitudes[(root, path)] = scale.flatten()
    return plain, dora, dora_in, magnitudes, unmatched


def _input_magnitude(adapter: str, magnitude):
    """A forward pre-hook for a peft LoRA layer of `adapter` that scales the input per channel by
    magnitude / the norm of (W + delta) per input channel (DoRA with LyCORIS' wd_on_out=False).
    Other adapters on the same layer see the scaled input too (DoRA does not add up)."""
    def hook(layer, args):
        if adapter not in layer.active_adapters:
            return None
        weight = layer.get_base_layer().weight
        merged = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        c = magnitude / merged.transpose(0, 1).flatten(1).norm(dim=1)
        x = args[0]
        # Linear: the input's last dim; conv: dim 1
        c = c.reshape((-1,) if weight.ndim == 2 else (-1, *(1 for _ in weight.shape[2:])))
        return (x * c.to(x.dtype), *args[1:])
    return hook


def _warn(warnings, message: str) -> None:
    log.warning(message)
    if warnings is not None and message not in warnings:
        warnings.append(message)


def _set_weights(components, loaded) -> None:
    """Each adapter's multiplier: the te weight on text encoders, the unet weight on the U-Net.
    An adapter at 0 is left inactive: a DoRA layer's magnitude would change the module even
    with its low-rank part scaled to 0 (peft scales only that part)."""
    # heavy: diffusers' LoRA helpers, only when a LoRA is used
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    for module in (components.unet, *components.text_encoders):
        pairs = [(name, use.unet if module is components.unet else use.te)
                 for names, use in loaded for name in names if has_adapter(module, name)]
        if pairs:
            active = [(n, w) for n, w in pairs if w != 0]
            set_weights_and_activate_adapters(module, [n for n, _ in active], [w for _, w in active])


def _remove_adapter(components, adapter: str) -> None:
    # heavy: diffusers' LoRA helpers, only when a LoRA is used
    from diffusers.utils.peft_utils import delete_adapter_layers

    for module in (components.unet, *components.text_encoders):
        if has_adapter(module, adapter):
            delete_adapter_layers(module, adapter)


def remove_all(components) -> None:
    """Take every peft layer out of the modules (restores the original module objects)."""
    # heavy: diffusers' LoRA helpers, only when a LoRA is used
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for module in (components.unet, *components.text_encoders):
        if getattr(module, "peft_config", None) or _has_any_tuner(module):
            recurse_remove_peft_layers(module)
            if hasattr(module, "peft_config"):
                try:
                    del module.peft_config
                except AttributeError:
                    module.peft_config = {}
            if hasattr(module, "_hf_peft_config_loaded"):
                module._hf_peft_config_loaded = False


def _has_any_tuner(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer  # heavy: peft imports transformers

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


__all__ = ["LoraUse", "resolve", "applied", "remove_all", "infotext_params", "short_hash", "read_metadata",
           "trigger_words", "listing", "ExtraNetwork"]
