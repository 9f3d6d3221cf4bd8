"""The loaded-model cache: the only owner of model objects.

LRU within a memory budget; a model is identified by its file's path, size and mtime,
so a changed file is reloaded and an unchanged one never is. Loading happens under a
lock so two requests for the same checkpoint load it once.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from .device import Placement, apply_attention
from .loading import Components, load_components, read_header


@dataclass
class LoadedModel:
    name: str
    components: Components
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per model


class ModelManager:
    def __init__(self, placement: Placement, budget_bytes: int | None = None):
        self.placement = placement
        if budget_bytes is None:
            budget_bytes = int(psutil.virtual_memory().total * 0.5)
            if placement.device.type == "cuda":
                budget_bytes = min(budget_bytes, int(torch.cuda.get_device_properties(0).total_memory * 0.7))
        self.budget_bytes = budget_bytes
        self._cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: Path) -> tuple:
        st = Path(path).stat()
        return (str(Path(path).resolve()), st.st_size, st.st_mtime)

    def get(self, name: str, path: Path) -> LoadedModel:
        """The loaded model for this file, loading it (and evicting others) if needed."""
        key = self._key(path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            header = read_header(path)
            components = load_components(path, self.placement.dtype, self.placement.vae_dtype, header=header)
            for module in components.modules():
                module.to(self.placement.device)
            apply_attention(components.unet, self.placement.attention)
            model = LoadedModel(name=name, components=components, nbytes=components.nbytes())
            self._evict_for(model.nbytes)
            self._cache[key] = model
            return model

    def _evict_for(self, incoming: int) -> None:
        while self._cache and sum(m.nbytes for m in self._cache.values()) + incoming > self.budget_bytes:
            self._cache.popitem(last=False)
        gc.collect()
        if self.placement.device.type == "cuda":
            torch.cuda.empty_cache()

    def unload(self, name: str) -> bool:
        with self._lock:
            for key, model in list(self._cache.items()):
                if model.name == name:
                    del self._cache[key]
                    gc.collect()
                    return True
        return False

    def loaded_names(self) -> list[str]:
        with self._lock:
            return [m.name for m in reversed(self._cache.values())]

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for m in self._cache.values())
