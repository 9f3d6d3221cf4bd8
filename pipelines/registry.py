"""What is on disk: model kinds -> folders + extensions, listings cached by folder mtime.

A listing never hashes a file. Hashes (sha256, A1111's "AutoV2" short hash = first 10 hex
digits) are computed on demand and cached in a JSON file keyed by path, size and mtime.
Only names from a listing resolve to files: no path from a request is opened as given.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class ModelKind:
    folder: str  # under --models-dir, A1111's names
    extensions: tuple[str, ...]


MODEL_KINDS: dict[str, ModelKind] = {
    "checkpoints": ModelKind("Stable-diffusion", (".safetensors", ".ckpt")),
    "vae": ModelKind("VAE", (".safetensors", ".pt", ".ckpt")),
    "lora": ModelKind("Lora", (".safetensors", ".pt")),
    "esrgan": ModelKind("ESRGAN", (".pth", ".pt", ".safetensors")),
    "embeddings": ModelKind("embeddings", (".safetensors", ".pt", ".bin")),
}


@dataclass
class ModelFile:
    name: str  # path relative to the kind's folder, with "/" (A1111 shows subfolders this way)
    path: Path
    size: int
    mtime: float
    details: dict = field(default_factory=dict)  # kind-specific facts read from the header
    sha256: str | None = None

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def family(self) -> str | None:
        return self.details.get("family")


class HashCache:
    """sha256 per file, persisted as JSON, valid while path, size and mtime match."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._entries: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._entries = {}

    def get(self, file: ModelFile) -> str | None:
        entry = self._entries.get(str(file.path))
        if entry and entry.get("size") == file.size and entry.get("mtime") == file.mtime:
            return entry.get("sha256")
        return None

    def compute(self, file: ModelFile, on_progress: Callable[[float], None] | None = None) -> str:
        cached = self.get(file)
        if cached:
            return cached
        digest = hashlib.sha256()
        done = 0
        with open(file.path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(done / max(file.size, 1))
        sha = digest.hexdigest()
        with self._lock:
            self._entries[str(file.path)] = {"size": file.size, "mtime": file.mtime, "sha256": sha}
            self._save()
        return sha

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._entries, indent=1))
        os.replace(tmp, self.path)


class FolderListing:
    """Files of one model kind; re-walked only when some folder's mtime changed."""

    def __init__(self, root: Path, extensions: tuple[str, ...], describe: Callable[[Path], dict] | None = None):
        self.root = Path(root)
        self.extensions = extensions
        self.describe = describe
        self._dir_mtimes: dict[str, float] | None = None
        self._files: list[ModelFile] = []
        self._details: dict[tuple[str, int, float], dict] = {}
        self._lock = threading.Lock()

    def _unchanged(self) -> bool:
        if self._dir_mtimes is None:
            return False
        try:
            return all(os.stat(d).st_mtime == m for d, m in self._dir_mtimes.items())
        except OSError:
            return False

    def files(self, refresh: bool = False) -> list[ModelFile]:
        with self._lock:
            if refresh or not self._unchanged():
                self._rescan()
            return list(self._files)

    def _rescan(self) -> None:
        dir_mtimes: dict[str, float] = {}
        found: list[ModelFile] = []
        if self.root.is_dir():
            for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                dir_mtimes[dirpath] = os.stat(dirpath).st_mtime
                for filename in sorted(filenames):
                    if not filename.lower().endswith(self.extensions) or filename.startswith("."):
                        continue
                    if self._is_sidecar(filename):
                        continue
                    path = Path(dirpath) / filename
                    try:
                        st = path.stat()
                    except OSError:
                        continue
                    name = path.relative_to(self.root).as_posix()
                    found.append(ModelFile(name=name, path=path, size=st.st_size, mtime=st.st_mtime,
                                           details=self._describe(path, st)))
        found.sort(key=lambda f: f.name.lower())
        self._dir_mtimes, self._files = dir_mtimes, found

    @staticmethod
    def _is_sidecar(filename: str) -> bool:
        # "<checkpoint>.vae.safetensors" belongs to its checkpoint, not to the list
        return ".vae." in filename.lower()

    def _describe(self, path: Path, st: os.stat_result) -> dict:
        if self.describe is None:
            return {}
        key = (str(path), st.st_size, st.st_mtime)
        if key not in self._details:
            try:
                self._details[key] = self.describe(path)
            except Exception as exc:  # a broken file is listed with its error, never hides the rest
                self._details[key] = {"error": str(exc)}
        return self._details[key]


class ModelRegistry:
    """All model kinds of one models folder, plus the shared hash cache."""

    def __init__(self, folders: dict[str, Path], hash_cache: HashCache,
                 describers: dict[str, Callable[[Path], dict]] | None = None):
        describers = describers or {}
        self.listings = {
            kind: FolderListing(folders[kind], MODEL_KINDS[kind].extensions, describers.get(kind))
            for kind in MODEL_KINDS
        }
        self.hashes = hash_cache

    def list(self, kind: str, refresh: bool = False) -> list[ModelFile]:
        files = self.listings[kind].files(refresh)
        for f in files:
            f.sha256 = self.hashes.get(f)
        return files

    def find(self, kind: str, name: str) -> ModelFile | None:
        """Resolve a name from the listing (also accepting A1111's 'name [hash]' titles and bare stems)."""
        files = self.list(kind)
        wanted = name.strip()
        if wanted.endswith("]") and " [" in wanted:
            wanted = wanted[: wanted.rindex(" [")]
        for f in files:
            if wanted in (f.name, f.stem, Path(f.name).name):
                return f
        files = self.list(kind, refresh=True)  # a file added since the last listing
        for f in files:
            if wanted in (f.name, f.stem, Path(f.name).name):
                return f
        return None

    def ensure_hash(self, file: ModelFile, on_progress: Callable[[float], None] | None = None) -> str:
        file.sha256 = self.hashes.compute(file, on_progress)
        return file.sha256
