"""What the registry remembers between runs, each as one JSON file in the data dir: file
hashes (`HashCache`), per-checkpoint user choices (`CheckpointOptions`) and the listing facts
that are slow to read (`DetailsCache`).

The A1111 hash facts live here and in `registry.ModelFile`: the sha256 of the whole file (a
diffusers folder: all its files, see `fileio.sha256_file`), its first 10 hex digits as the
"AutoV2" short hash, and the legacy 8-hex "model hash" of old A1111 versions.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pipelines.core.fileio import sha256_file, write_json_atomic

# A1111's legacy "model hash": the sha256 of 64 KiB at 1 MiB into the file, 8 hex digits
LEGACY_HASH_OFFSET = 1 << 20
LEGACY_HASH_BYTES = 64 << 10
LEGACY_HASH_DIGITS = 8


def legacy_model_hash(path: Path) -> str | None:
    """The legacy A1111 "model hash" (old infotexts and API clients name models by it); None
    for a folder, or a file that ends before the hashed range begins (it would hash nothing)."""
    path = Path(path)
    if path.is_dir() or path.stat().st_size <= LEGACY_HASH_OFFSET:
        return None
    return sha256_file(path, start=LEGACY_HASH_OFFSET, size=LEGACY_HASH_BYTES)[:LEGACY_HASH_DIGITS]


class FileVersion(Protocol):
    """A listed file as the hash cache keys it (`registry.ModelFile`)."""

    path: Path
    size: int
    mtime: float


class JsonStore:
    """A dict persisted as one JSON file; a missing or unreadable file starts empty."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._entries: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._entries = {}


class HashCache(JsonStore):
    """sha256 (and the legacy A1111 hash) per file, valid while path, size and mtime match."""

    def _entry(self, file: FileVersion) -> dict | None:
        entry = self._entries.get(str(file.path))
        if entry and entry.get("size") == file.size and entry.get("mtime") == file.mtime:
            return entry
        return None

    def get(self, file: FileVersion) -> str | None:
        entry = self._entry(file)
        return entry.get("sha256") if entry else None

    def legacy(self, file: FileVersion) -> str | None:
        """The legacy 8-hex hash, known once the file was hashed (see `legacy_model_hash`)."""
        entry = self._entry(file)
        return entry.get("legacy_hash") if entry else None

    def compute(self, file: FileVersion, on_progress: Callable[[float], None] | None = None) -> str:
        """The file's sha256, hashing it (and taking its legacy hash) unless it is cached."""
        entry = self._entry(file) or {}
        if entry.get("sha256") and "legacy_hash" in entry:
            return entry["sha256"]
        sha = entry.get("sha256") or sha256_file(file.path, on_progress)
        legacy = legacy_model_hash(file.path)  # 64 KiB more; also fills in entries of older versions
        with self._lock:
            self._entries[str(file.path)] = {"size": file.size, "mtime": file.mtime, "sha256": sha,
                                             "legacy_hash": legacy}
            write_json_atomic(self.path, self._entries, indent=1)
        return sha


class CheckpointOptions(JsonStore):
    """Per-checkpoint user choices (keyed by listing name), persisted as JSON in the data dir."""

    def get(self, name: str) -> dict:
        with self._lock:
            return dict(self._entries.get(name, {}))

    def set(self, name: str, key: str, value) -> None:
        with self._lock:
            entry = self._entries.setdefault(name, {})
            if value is None:
                entry.pop(key, None)
                if not entry:
                    del self._entries[name]
            else:
                entry[key] = value
            write_json_atomic(self.path, self._entries, indent=1, sort_keys=True)


class DetailsCache(JsonStore):
    """A listing's facts about a file (`FolderListing.describe`'s answer) kept across starts, valid
    while kind, path, size and mtime match and the describers' `version` is the same. For the kinds
    whose describing imports a heavy library (upscalers and face restorers build their network on
    the meta device through spandrel: about a second at every start otherwise)."""

    def __init__(self, path: Path, version: int):
        super().__init__(path)
        self.version = version

    def get(self, kind: str, path: Path, size: int, mtime: float) -> dict | None:
        with self._lock:
            entry = self._entries.get(f"{kind}:{path}")
        if entry and (entry.get("size"), entry.get("mtime"), entry.get("version")) == (size, mtime, self.version):
            return dict(entry["details"])
        return None

    def put(self, kind: str, path: Path, size: int, mtime: float, details: dict) -> None:
        with self._lock:
            self._entries[f"{kind}:{path}"] = {"size": size, "mtime": mtime, "version": self.version,
                                               "details": details}
            try:
                write_json_atomic(self.path, self._entries, indent=1, sort_keys=True)
            except OSError:  # a read-only data dir: describe again next start, nothing lost
                pass
