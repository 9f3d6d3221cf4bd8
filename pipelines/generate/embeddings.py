"""Textual-inversion embeddings from the embeddings folder (models/embeddings).

Used by writing a file's name (its stem) in a prompt; `prompts` puts the vectors in place
of the name's tokens while encoding, through a hook on the token embedding that is removed
right after, so no tokenizer or model is changed.

Formats read (A1111's):
- ``string_to_param: {"*": [n, dim]}`` (A1111/textual_inversion .pt; the `name` key is ignored:
  the file name is what a prompt writes),
- ``emb_params: [n, dim]`` (safetensors or .pt),
- SDXL ``clip_l: [n, 768]`` and ``clip_g: [n, 1280]``,
- diffusers' ``{"<token>": [dim]}`` and any file holding a single tensor.
`.pt`/`.bin` are read with ``torch.load(weights_only=True)`` only; a file that needs more is
skipped with its reason.

The infotext's ``TI hashes: "name: 0123456789ab"``: first 12 hex digits of the file's sha256.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines.core.fileio import sha256_file_cached

log = logging.getLogger(__name__)


class EmbeddingError(ValueError):
    pass


@dataclass
class EmbeddingFile:
    """What one file holds: named tensors [n, dim] ("default" when the format names none)."""

    name: str
    path: Path
    tensors: dict[str, torch.Tensor]

    @property
    def vectors_count(self) -> int:
        return max(t.shape[0] for t in self.tensors.values())

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.tensors.items()}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The embedding vectors of a file, by encoder name ("clip_l", "clip_g") or "default"."""
    path = Path(path)
    if path.suffix == ".safetensors":
        data = load_file(str(path))
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - never retried without weights_only
            raise EmbeddingError(f"not loadable with weights_only ({type(exc).__name__})") from None
    if isinstance(data, torch.Tensor):
        return {"default": _rows(data)}
    if not isinstance(data, dict):
        raise EmbeddingError("not a dictionary of tensors")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise EmbeddingError("empty string_to_param")
        return {"default": _rows(next(iter(params.values())))}
    if "clip_l" in data or "clip_g" in data:
        return {k: _rows(data[k]) for k in ("clip_l", "clip_g") if isinstance(data.get(k), torch.Tensor)}
    if "emb_params" in data:
        return {"default": _rows(data["emb_params"])}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:  # diffusers' {"<token>": [dim]}
        return {"default": _rows(tensors[0])}
    raise EmbeddingError("unknown embedding format (keys: " + ", ".join(map(str, list(data)[:5])) + ")")


def _rows(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise EmbeddingError("the vectors are not a tensor")
    t = t.detach().float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] == 0:
        raise EmbeddingError(f"unexpected shape {list(t.shape)}")
    return t


def load(path: Path, name: str | None = None) -> EmbeddingFile:
    """An embedding file, cached by path, size and mtime; EmbeddingError if unreadable."""
    path = Path(path)
    st = os.stat(path)
    found = _read_cached(str(path), st.st_size, st.st_mtime_ns, name or path.stem)
    if isinstance(found, EmbeddingError):
        raise found
    return found


@functools.lru_cache(maxsize=256)  # a few KB each; 256 covers a large embeddings folder
def _read_cached(path: str, size: int, mtime_ns: int, name: str) -> EmbeddingFile | EmbeddingError:
    """What `load` returns, or the error it raises (a bad file is not read again until it changes)."""
    try:
        return EmbeddingFile(name, Path(path), read_tensors(Path(path)))
    except EmbeddingError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a corrupt file is skipped, never fatal
        return EmbeddingError(str(exc))


@dataclass(eq=False)
class BoundEmbedding:
    """An embedding made ready for one model: vectors per text encoder (None: not for it)."""

    name: str
    path: Path
    per_encoder: list[torch.Tensor | None]

    def vectors(self, encoder_index: int) -> torch.Tensor | None:
        if encoder_index >= len(self.per_encoder):
            return None
        return self.per_encoder[encoder_index]

    @property
    def short_hash(self) -> str:
        return file_hash(self.path)[:12]


def bind(emb: EmbeddingFile, components) -> BoundEmbedding | None:
    """Match an embedding's tensors to the model's text encoders by name and width;
    None when none fits (e.g. an SD 1.x embedding on SDXL)."""
    specs = components.spec.family.text_encoders
    per_encoder: list[torch.Tensor | None] = []
    for spec, encoder in zip(specs, components.text_encoders):
        width = encoder.config.hidden_size
        wanted = ("clip_g",) if spec.layout == "open_clip" else ("clip_l",)
        chosen = None
        keys = wanted if len(specs) > 1 else (*wanted, "default")  # SDXL takes clip_l/clip_g files only
        for key in keys:
            t = emb.tensors.get(key)
            if t is not None and t.shape[1] == width:
                chosen = t
                break
        if chosen is None and len(specs) == 1:  # a single-encoder family: any tensor of its width
            chosen = next((t for t in emb.tensors.values() if t.shape[1] == width), None)
        per_encoder.append(chosen)
    if len(specs) > 1 and any(t is None for t in per_encoder):
        return None  # SDXL needs both halves
    if all(t is None for t in per_encoder):
        return None
    return BoundEmbedding(emb.name, emb.path, per_encoder)


class EmbeddingSet(list):
    """The embeddings a request may use; `used` collects those its prompts named."""

    def __init__(self, items=(), used=None):
        list.__init__(self, items)
        self.used = used if used is not None else []

    def mark_used(self, emb) -> None:
        if emb not in self.used:
            self.used.append(emb)


def for_request(files, components, texts: list[str]) -> EmbeddingSet:
    """The embeddings (registry files) whose names occur in the texts as whole tokens
    (as A1111 matches them), bound to the model."""
    lowered = " ".join(texts).lower()
    tokenizer = components.tokenizers[0]
    ids = tokenizer(" ".join(texts), add_special_tokens=False, truncation=False).input_ids
    out = EmbeddingSet()
    for f in files:
        name = Path(f.name).stem
        if name.lower() not in lowered:
            continue
        name_ids = tokenizer(name, add_special_tokens=False).input_ids
        if not any(ids[i : i + len(name_ids)] == name_ids for i in range(len(ids) - len(name_ids) + 1)):
            continue
        try:
            bound = bind(load(f.path, name), components)
        except EmbeddingError as exc:
            log.warning("embedding %s skipped: %s", f.name, exc)
            continue
        if bound is not None:
            out.append(bound)
    return out


def listing(files, components=None) -> dict[str, dict]:
    """A1111's /sdapi/v1/embeddings shape: {"loaded": {name: info}, "skipped": {name: info}}.
    Without a model every readable file counts as loaded."""
    loaded, skipped = {}, {}
    for f in files:
        name = Path(f.name).stem
        try:
            emb = load(f.path, name)
        except EmbeddingError:
            skipped[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                             "shape": None, "vectors": 0}
            continue
        first = next(iter(emb.tensors.values()))
        info = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                "shape": int(first.shape[1]), "vectors": int(emb.vectors_count)}
        if components is not None and bind(emb, components) is None:
            skipped[name] = info
        else:
            loaded[name] = info
    return {"loaded": loaded, "skipped": skipped}


def infotext_params(used) -> dict[str, str]:
    if not used:
        return {}
    return {"TI hashes": ", ".join(f"{e.name}: {e.short_hash}" for e in used)}


def file_hash(path: Path) -> str:
    """The file's sha256 (its first 12 digits are the infotext's TI hash)."""
    return sha256_file_cached(path)
