"""The loaded-model cache: the only owner of model objects.

LRU within a memory budget; a model is identified by its file's path, size and mtime,
so a changed file is reloaded and an unchanged one never is. Loading happens under a
lock so two requests for the same checkpoint load it once.

A file is checked (header, family, shapes) before anything is evicted, so a corrupt or
truncated file fails with a message and leaves the cache as it was. Room is made before
loading, from the size the header announces, so the budget holds at the peak too.
A flow checkpoint loaded with the user's own text encoders or VAE (`module_pick`: Forge's "VAE /
Text Encoder") is another entry than with the automatic pairing: a job holding one keeps it whole,
and the LRU frees the one no longer picked. Separate VAE files are cached on their own (a few, LRU),
keyed by file and by the latent
scaling factor of the checkpoint family they serve. ControlNet and T2I-Adapter modules are
cached too (LRU, counted in the same budget, evicted before checkpoints: they serve one and
reload in a fraction of its time).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from pipelines.models import memory
from pipelines.models.build import load_vae
from pipelines.models.checkpoint_file import CheckpointError, read_header
from pipelines.models.control_files import check_control_file, load_control_model
from pipelines.models.device import Placement, apply_attention
from pipelines.models.families import FAMILIES, TEXT_ENCODER_ROOTS, UNET_PREFIX, VAE_PREFIX
from pipelines.models.flux_build import (
    NOT_TRANSFORMER,
    check_checkpoint_parts,
    is_flow_checkpoint,
    load_checkpoint_components,
    load_flow_vae,
    separate_vae,
)
from pipelines.models.flux_files import bytes_text, flow_vae_prefix, transformer_weights, what_would_fit
from pipelines.models.gguf_dequant import release_scratch, use_fast_dequantize
from pipelines.models.gguf_files import decoded_bytes, is_gguf
from pipelines.models.inspection import inspect_checkpoint
from pipelines.models.module_pick import AUTOMATIC, ModulePick, beyond_automatic
from pipelines.models.quantized import check_runnable, fp8_storage_supported, weights_bytes
from pipelines.models.spec import Components, modules_nbytes

log = logging.getLogger(__name__)

# the weights a loaded model holds (not a full file's EMA copy or training state)
MODEL_WEIGHT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, *TEXT_ENCODER_ROOTS)


@dataclass
class LoadedModel:
    name: str
    components: Components
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per model
    offload_hooks: list = field(default_factory=list)  # --medvram: moved back to the CPU after each job


@dataclass
class LoadedVae:
    path: Path
    module: torch.nn.Module
    nbytes: int
    offload_hooks: list = field(default_factory=list)


@dataclass
class LoadedControl:  # a ControlNet or T2I-Adapter
    path: Path
    module: torch.nn.Module
    nbytes: int
    offload_hooks: list = field(default_factory=list)


class ModelManager:
    def __init__(self, placement: Placement, budget_bytes: int | None = None, max_vaes: int = 2,
                 text_encoder_dir: Path | None = None, vae_dir: Path | None = None, *,
                 gguf_dequantize_once: bool = False):
        self.placement = placement
        self.gguf_dequantize_once = gguf_dequantize_once  # --gguf-dequantize-once: see _keeps_gguf_decoded
        self.text_encoder_dir = text_encoder_dir  # SD 3's and Flux's separate encoders (models/text_encoder)
        self.vae_dir = vae_dir  # models/VAE: Flux's VAE for a transformer file without one
        if budget_bytes is None:
            budget_bytes = int(psutil.virtual_memory().total * 0.5)
            if placement.device.type == "cuda":
                budget_bytes = min(budget_bytes, int(torch.cuda.get_device_properties(0).total_memory * 0.7))
        self.budget_bytes = budget_bytes
        self.max_vaes = max_vaes
        self._cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._vaes: OrderedDict[tuple, LoadedVae] = OrderedDict()
        self._controls: OrderedDict[tuple, LoadedControl] = OrderedDict()
        self._lock = threading.RLock()

    @staticmethod
    def _key(path: Path) -> tuple:
        st = Path(path).stat()
        return (str(Path(path).resolve()), st.st_size, st.st_mtime)

    def _estimate(self, header, encoders: dict | None = None, chosen_vae: Path | None = None) -> int:
        """Bytes the model will take, from the header alone: each weight as it will be held (a flow
        transformer's GGUF blocks as stored, its fp8 weights in fp8 where the device keeps them,
        the rest at the run dtype); a flow file counts whole (BFL's have no prefix), with the
        separate `encoders` it loads."""
        if header.format == "diffusers":
            return sum(p.stat().st_size for p in Path(header.path).rglob("*.safetensors")) * (
                2 if self.placement.dtype == torch.float32 else 1)
        dtype = self.placement.dtype
        flow = is_flow_checkpoint(header)
        keys = [key for key in header.shapes if flow or key.startswith(MODEL_WEIGHT_PREFIXES)]
        transformer = self._transformer_keys(header) if flow else []
        kept = set(transformer)
        total = (weights_bytes(header, transformer, dtype, self._keeps_fp8())
                 + weights_bytes(header, [key for key in keys if key not in kept], dtype, keep_fp8=False))
        for weights in (encoders or {}).values():
            if weights.header.path != header.path:
                total += weights_bytes(weights.header, [key for key in weights.header.shapes
                                                        if key.startswith(weights.prefix)], dtype, keep_fp8=False)
        vae_file = separate_vae(header, self.vae_dir, chosen_vae)  # Flux's ae.safetensors for a bare transformer
        if vae_file is not None:
            vae_header = read_header(vae_file)
            total += weights_bytes(vae_header, vae_header.shapes, dtype, keep_fp8=False)
        return total

    @staticmethod
    def _transformer_keys(header) -> list[str]:
        """A flow file's transformer weights: the ones that stay quantized / in fp8."""
        return [key for key in header.shapes if not key.startswith(NOT_TRANSFORMER)]

    def _keeps_fp8(self) -> bool:
        """Whether a flow transformer stored in fp8 stays in fp8 here (not on MPS: no fp8 type)."""
        return fp8_storage_supported(self.placement.device)

    def room_bytes(self) -> int:
        """Memory a model can be loaded into: free RAM and what evicting every cached model frees."""
        return int(psutil.virtual_memory().available) + self._total()

    def _check_room(self, header, needed: int) -> None:
        """A model that cannot be loaded into RAM whole is refused before anything is evicted, with
        what would fit (a flow transformer's GGUF / fp8 file) instead of the process being killed."""
        room = self.room_bytes()
        if needed <= room:
            return
        message = (f"{header.path.name} needs about {bytes_text(needed)} of memory to load at "
                   f"{str(self.placement.dtype).removeprefix('torch.')}, and {bytes_text(room)} is free for models")
        if is_flow_checkpoint(header) and header.format != "diffusers":
            held = weights_bytes(header, self._transformer_keys(header), self.placement.dtype, self._keeps_fp8())
            fits = what_would_fit(transformer_weights(header), room - (needed - held), fp8=self._keeps_fp8())
            message += f" (its transformer alone: {bytes_text(held)}); {fits}, with the text encoders and VAE it needs"
        else:
            message += "; a smaller (fp16 or pruned) file of it may fit"
        raise CheckpointError(message)

    def get(self, name: str, path: Path, pick: ModulePick = AUTOMATIC) -> LoadedModel:
        """The loaded model for this file with the user's `pick` of text encoders and VAE (a checked
        `module_pick.ModulePick`), loading it (and evicting others) if needed."""
        pick = self._beyond_automatic(path, pick)
        key = self.cache_key(path, pick)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            header = read_header(path)
            # a format this device cannot run (NF4 off CUDA, ...), a broken or unknown file: fail before any eviction
            check_runnable(header, self.placement.device)
            inspect_checkpoint(header)
            flow = is_flow_checkpoint(header)
            # missing encoders, and a model too big for the memory, fail before any eviction too
            encoders = check_checkpoint_parts(header, self.text_encoder_dir, self.vae_dir, chosen=pick.encoders,
                                              chosen_vae=pick.vae)
            needed = self._estimate(header, encoders, pick.vae)
            self._check_room(header, needed)
            keep_decoded = self._keeps_gguf_decoded(header, needed)
            extra = self._gguf_decoded_bytes(header) if keep_decoded else 0
            self._evict_for(needed + extra)
            components = load_checkpoint_components(path, self.placement.dtype, self.placement.vae_dtype,
                                                    header=header, text_encoder_dir=self.text_encoder_dir,
                                                    vae_dir=self.vae_dir, fp8_storage=self._keeps_fp8(),
                                                    chosen=pick.encoders, chosen_vae=pick.vae,
                                                    unet_channels_last=self.placement.channels_last,
                                                    vae_channels_last=self.placement.vae_channels_last)
            if not flow:  # xformers / sliced processors are the U-Net's; the transformers keep diffusers' joint SDPA
                apply_attention(components.unet, self.placement.attention)
            hooks = memory.place(components, self.placement)
            if keep_decoded:
                use_fast_dequantize(components.unet, keep_dequantized=True)
            model = LoadedModel(name=name, components=components, nbytes=components.nbytes() + extra,
                                offload_hooks=hooks)
            self._cache[key] = model
            return model

    def cache_key(self, path: Path, pick: ModulePick = AUTOMATIC) -> tuple:
        """The cache entry of a file with a pick: the automatic pairing keeps the file's own key."""
        return self._key(path) if pick.cache_key() == AUTOMATIC.cache_key() else (*self._key(path), pick.cache_key())

    def _beyond_automatic(self, path: Path, pick: ModulePick) -> ModulePick:
        if pick.cache_key() == AUTOMATIC.cache_key():
            return pick  # (no header read for the common case)
        return beyond_automatic(pick, read_header(path), self.text_encoder_dir, self.vae_dir)

    def holds(self, path: Path, pick: ModulePick = AUTOMATIC) -> bool:
        """Whether this file with this pick is loaded (a job on it starts at once)."""
        return self.cache_key(path, self._beyond_automatic(path, pick)) in self._cache

    def _total(self) -> int:
        return sum(m.nbytes for m in self._cache.values()) + sum(
            v.nbytes for v in [*self._vaes.values(), *self._controls.values()])

    def _evict_for(self, incoming: int) -> None:
        evicted = False
        for cache in (self._controls, self._cache):  # control models first: each serves a checkpoint
            while cache and self._total() + incoming > self.budget_bytes:
                cache.popitem(last=False)
                evicted = True
        if evicted:
            self._release()

    def _release(self) -> None:
        release_scratch()  # the GGUF decoders' reused buffers (hundreds of MB for Flux)
        memory.release(self.placement.device)

    def _gguf_decoded_bytes(self, header) -> int:
        itemsize = torch.empty((), dtype=self.placement.dtype).element_size()
        return decoded_bytes(header, self._transformer_keys(header), itemsize)

    def _keeps_gguf_decoded(self, header, needed: int) -> bool:
        """--gguf-dequantize-once on a GGUF file where the decoded weights fit beside it; else it
        decodes per step, as without the flag (GGUF is chosen to save memory), and the log says why."""
        if not (self.gguf_dequantize_once and is_gguf(header)):
            return False
        decoded = self._gguf_decoded_bytes(header)
        room = min(self.room_bytes(), self.budget_bytes)
        if needed + decoded <= room:
            return True
        log.warning("%s: --gguf-dequantize-once needs %s more than the %s there is room for; decoding per step",
                    header.path.name, bytes_text(decoded), bytes_text(max(room - needed, 0)))
        return False

    # --- separate VAEs ---------------------------------------------------------------------------
    def get_vae(self, path: Path, scaling_factor: float, sample_size: int = 512) -> torch.nn.Module:
        """A VAE file's module at the run's VAE dtype, for a family with this latent scaling factor."""
        key = (*self._key(path), float(scaling_factor))
        with self._lock:
            if key in self._vaes:
                self._vaes.move_to_end(key)
                return self._vaes[key].module
            module = self._load_vae(path, scaling_factor, sample_size)
            if self.placement.vae_channels_last:
                module.to(memory_format=torch.channels_last)
            hooks = memory.offload([module], self.placement.device, self.placement.offload)
            while len(self._vaes) >= self.max_vaes:
                self._vaes.popitem(last=False)
            self._vaes[key] = LoadedVae(Path(path), module, modules_nbytes([module]), hooks)
            return module

    def _load_vae(self, path: Path, scaling_factor: float, sample_size: int) -> torch.nn.Module:
        """A flow family's 16-channel VAE (SD 3's, Flux's ae.safetensors) with that family's scaling
        and shift, or any other VAE file as the U-Net families read them."""
        family = next((f for f in FAMILIES if f.latent_shift_factor and f.latent_scaling_factor == scaling_factor),
                      None)
        if family is not None and flow_vae_prefix(read_header(path).shapes) is not None:
            return load_flow_vae(path, self.placement.vae_dtype, family)
        return load_vae(path, self.placement.vae_dtype, scaling_factor, sample_size)

    # --- ControlNets and T2I-Adapters -----------------------------------------------------------
    def get_control(self, path: Path, time_ids_width: int | None = None) -> torch.nn.Module:
        """A control model file's module at the U-Net's dtype, where the U-Net runs.
        `time_ids_width`: the SDXL U-Net's `addition_time_embed_dim` (see control_files)."""
        key = (*self._key(path), time_ids_width)
        with self._lock:
            if key in self._controls:
                self._controls.move_to_end(key)
                return self._controls[key].module
            header = read_header(path)
            spec = check_control_file(header, time_ids_width)  # a file that cannot load fails before eviction
            self._evict_for(self._estimate_weights(header, spec.prefix))
            module = load_control_model(path, dtype=self.placement.dtype, time_ids_width=time_ids_width)
            if self.placement.channels_last:
                module.to(memory_format=torch.channels_last)
            if hasattr(module, "set_attn_processor"):  # a ControlNet attends like the U-Net; an adapter does not
                apply_attention(module, self.placement.attention)
            hooks = memory.offload([module], self.placement.device, self.placement.offload)
            self._controls[key] = LoadedControl(Path(path), module, modules_nbytes([module]), hooks)
            return module

    def _estimate_weights(self, header, prefix: str) -> int:
        """Bytes the tensors under `prefix` take at the run dtype (old ControlNet .pth files
        carry a whole SD model beside `control_model.`)."""
        return weights_bytes(header, [key for key in header.shapes if key.startswith(prefix)], self.placement.dtype,
                             keep_fp8=False)

    def after_job(self) -> None:
        """--medvram: move every model back to the CPU; release what the job left behind."""
        with self._lock:
            for entry in [*self._cache.values(), *self._vaes.values(), *self._controls.values()]:
                memory.offload_all(entry.offload_hooks)
        memory.release(self.placement.device, after_job=True)

    # --- control and facts -----------------------------------------------------------------------
    def unload(self, name: str) -> bool:
        """Drop every loaded entry of a checkpoint (with any pick of text encoders)."""
        with self._lock:
            keys = [key for key, model in self._cache.items() if model.name == name]
            for key in keys:
                del self._cache[key]
            if keys:
                self._release()
        return bool(keys)

    def unload_all(self) -> None:
        with self._lock:
            self._cache.clear()
            self._vaes.clear()
            self._controls.clear()
            self._release()

    def loaded_names(self) -> list[str]:
        # No lock: a load holds it for seconds, and the UI asks this while one runs (start-up).
        # list() copies the dict in one C call, so the snapshot is consistent.
        return list(dict.fromkeys(m.name for m in reversed(list(self._cache.values()))))  # one per checkpoint

    def loaded(self, name: str) -> LoadedModel | None:
        with self._lock:
            return next((m for m in self._cache.values() if m.name == name), None)

    def cached_bytes(self) -> int:
        with self._lock:
            return self._total()

    def memory(self) -> dict:
        """What the cache holds and what the process uses, for the UI."""
        with self._lock:
            models = [{"name": m.name, "bytes": m.nbytes, "family": m.components.spec.description}
                      for m in reversed(self._cache.values())]
            vaes = [{"name": v.path.name, "bytes": v.nbytes} for v in reversed(self._vaes.values())]
            controls = [{"name": c.path.name, "bytes": c.nbytes} for c in reversed(self._controls.values())]
            total = self._total()
        info = {
            "device": str(self.placement.device),
            "models": models,
            "vaes": vaes,
            "control_models": controls,
            "cache_bytes": total,
            "budget_bytes": self.budget_bytes,
            "process_rss_bytes": psutil.Process().memory_info().rss,
        }
        if self.placement.device.type == "cuda":
            info["vram_allocated_bytes"] = torch.cuda.memory_allocated()
            info["vram_reserved_bytes"] = torch.cuda.memory_reserved()
            info["vram_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            info["vram_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            info["vram_free_bytes"], info["vram_total_bytes"] = torch.cuda.mem_get_info(self.placement.device)
        return info
