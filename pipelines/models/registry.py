"""What is on disk: model kinds -> folders + extensions, listings cached by folder mtime.

A listing never hashes a file. Hashes (sha256, A1111's "AutoV2" short hash = first 10 hex
digits) are computed on demand and cached in a JSON file keyed by path, size and mtime.
Only names from a listing resolve to files: no path from a request is opened as given.

Checkpoints are single files or diffusers folders (a folder with `model_index.json`,
listed as one entry and not descended into). `<checkpoint>.vae.safetensors` files beside a
checkpoint belong to it (its "Automatic" VAE) and are not listed as checkpoints.
Per-checkpoint user choices the file cannot carry (the prediction type of an SD 2.x file)
are kept in `checkpoint_options.json` beside the hash cache, in the data dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.core.fileio import write_json_atomic


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


class _JsonFile:
    """A dict persisted as one JSON file; a missing or unreadable file starts empty."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._entries: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._entries = {}


class HashCache(_JsonFile):
    """sha256 per file, persisted as JSON, valid while path, size and mtime match."""

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
        if Path(file.path).is_dir():
            # a diffusers folder: every file, in name order, each preceded by its relative path
            parts = sorted(p for p in Path(file.path).rglob("*") if p.is_file())
        else:
            parts = [Path(file.path)]
        for part in parts:
            if part != Path(file.path):
                digest.update(part.relative_to(file.path).as_posix().encode() + b"\0")
            with open(part, "rb") as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
                    done += len(chunk)
                    if on_progress:
                        on_progress(min(1.0, done / max(file.size, 1)))
        sha = digest.hexdigest()
        with self._lock:
            self._entries[str(file.path)] = {"size": file.size, "mtime": file.mtime, "sha256": sha}
            self._save()
        return sha

    def _save(self) -> None:
        write_json_atomic(self.path, self._entries, indent=1)


class FolderListing:
    """Files of one model kind; re-walked only when some folder's mtime changed.

    `fallback`: a folder listed instead while `root` holds none of these files (the shipped
    demo checkpoint); the user's first file replaces it at the next listing."""

    def __init__(self, root: Path, extensions: tuple[str, ...], describe: Callable[[Path], dict] | None = None,
                 hide_sidecars: bool = False, folder_marker: str | None = None, fallback: Path | None = None):
        self.root = Path(root)
        self.fallback = Path(fallback) if fallback is not None else None
        self.extensions = extensions
        self.describe = describe
        self.hide_sidecars = hide_sidecars  # checkpoints: `<name>.vae.*` files belong to their checkpoint
        self.folder_marker = folder_marker  # checkpoints: a folder holding this file is one model
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
        found = self._walk(self.root, dir_mtimes)
        if not self.root.is_dir():
            dir_mtimes[str(self.root)] = -1.0  # never matches: a folder created later is noticed
        if not found and self.fallback is not None:
            found = self._walk(self.fallback, dir_mtimes)
        found.sort(key=lambda f: f.name.lower())
        self._dir_mtimes, self._files = dir_mtimes, found

    def _walk(self, root: Path, dir_mtimes: dict[str, float]) -> list[ModelFile]:
        found: list[ModelFile] = []
        if not root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            dir_mtimes[dirpath] = os.stat(dirpath).st_mtime
            if self.folder_marker and self.folder_marker in filenames and Path(dirpath) != root:
                dirnames[:] = []  # a diffusers folder is one model
                found.append(self._folder_entry(root, Path(dirpath)))
                continue
            for filename in sorted(filenames):
                if not filename.lower().endswith(self.extensions) or filename.startswith("."):
                    continue
                if self.hide_sidecars and self._is_sidecar(filename):
                    continue
                path = Path(dirpath) / filename
                try:
                    st = path.stat()
                except OSError:
                    continue
                found.append(ModelFile(name=path.relative_to(root).as_posix(), path=path, size=st.st_size,
                                       mtime=st.st_mtime, details=self._describe(path, st)))
        return found

    def _folder_entry(self, root: Path, folder: Path) -> ModelFile:
        size, mtime = 0, 0.0
        for dirpath, _, filenames in os.walk(folder):
            for filename in filenames:
                try:
                    st = os.stat(os.path.join(dirpath, filename))
                except OSError:
                    continue
                size += st.st_size
                mtime = max(mtime, st.st_mtime)
        st = os.stat(folder)
        fake = os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, size,
                               int(mtime), int(mtime), int(mtime)))
        return ModelFile(name=folder.relative_to(root).as_posix(), path=folder, size=size, mtime=mtime,
                         details=self._describe(folder, fake))

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


class CheckpointOptions(_JsonFile):
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


PREDICTION_TYPES = ("epsilon", "v_prediction")
SIDECAR_VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")
VAE_AUTOMATIC = "Automatic"
VAE_BAKED_IN = "None"


class ModelRegistry:
    """All model kinds of one models folder, plus the shared hash cache and checkpoint options."""

    def __init__(self, folders: dict[str, Path], hash_cache: HashCache,
                 describers: dict[str, Callable[[Path], dict]] | None = None,
                 options: CheckpointOptions | None = None, fallbacks: dict[str, Path | None] | None = None):
        describers = describers or {}
        fallbacks = fallbacks or {}
        self.listings = {
            kind: FolderListing(folders[kind], MODEL_KINDS[kind].extensions, describers.get(kind),
                                hide_sidecars=kind == "checkpoints",
                                folder_marker="model_index.json" if kind == "checkpoints" else None,
                                fallback=fallbacks.get(kind))
            for kind in MODEL_KINDS
        }
        self.hashes = hash_cache
        self.options = options or CheckpointOptions(Path(hash_cache.path).parent / "checkpoint_options.json")
        self._hashing: dict[str, float] = {}  # name -> progress of a background hash
        self._full_details: dict[tuple, dict] = {}
        self._hash_lock = threading.Lock()

    def list(self, kind: str, refresh: bool = False) -> list[ModelFile]:
        files = self.listings[kind].files(refresh)
        for f in files:
            f.sha256 = self.hashes.get(f)
            if kind == "checkpoints":
                f.details = self._checkpoint_details(f)
        return files

    # --- checkpoint facts for the browser -------------------------------------------------------
    def _checkpoint_details(self, f: ModelFile) -> dict:
        details = dict(f.details)
        if "error" in details:
            return details
        if "family_id" not in details and (f.path.is_dir() or f.path.suffix.lower() == ".safetensors"):
            # the full facts (prediction source, EMA, inpainting, diffusers folders) from the
            # loader, once per file version: a header read, never the weights
            key = (str(f.path), f.size, f.mtime)
            if key not in self._full_details:
                self._full_details[key] = _describe_lazily(f.path)
            details.update(self._full_details[key])
            if "error" in details:
                return details
        metadata = details.get("metadata") or {}
        for key, value in metadata_card(metadata).items():
            details.setdefault(key, value)
        details.setdefault("prediction_source", "file")
        options = self.options.get(f.name)
        probed = options.get("probed")
        if details.get("prediction_source") == "probe" and isinstance(probed, dict) \
                and probed.get("size") == f.size and probed.get("mtime") == f.mtime \
                and probed.get("prediction") in PREDICTION_TYPES:
            details["prediction"] = probed["prediction"]
            details["prediction_source"] = "probed when loaded"
            if str(details.get("family", "")) == "SD 2.x":
                details["resolution"] = 768 if probed["prediction"] == "v_prediction" else 512
        override = options.get("prediction")
        if override in PREDICTION_TYPES:
            details["prediction"] = override
            details["prediction_source"] = "user override"
            if str(details.get("family", "")) == "SD 2.x":  # the v models are the 768 ones
                details["resolution"] = 768 if override == "v_prediction" else 512
        sidecar = self.sidecar_vae(f)
        details["sidecar_vae"] = sidecar.name if sidecar else None
        return details

    def set_prediction_type(self, name: str, prediction: str | None) -> None:
        """The user's prediction type for a checkpoint ('epsilon', 'v_prediction'; None = detect)."""
        if prediction is not None:
            prediction = {"v": "v_prediction", "eps": "epsilon"}.get(prediction, prediction)
            if prediction not in PREDICTION_TYPES:
                raise ValueError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)} or None")
        file = self.find("checkpoints", name)
        if file is None:
            raise KeyError(f"unknown checkpoint {name!r}")
        self.options.set(file.name, "prediction", prediction)

    def record_probed_prediction(self, file: ModelFile, prediction: str) -> None:
        """Remember what loading found by running an SD 2.x U-Net once (valid while the file is
        unchanged), so the listing shows it without loading the file again."""
        entry = {"prediction": prediction, "size": file.size, "mtime": file.mtime}
        if prediction in PREDICTION_TYPES and self.options.get(file.name).get("probed") != entry:
            self.options.set(file.name, "probed", entry)

    def prediction_override(self, name: str) -> str | None:
        value = self.options.get(name).get("prediction")
        return value if value in PREDICTION_TYPES else None

    # --- VAEs ---------------------------------------------------------------------------------
    def sidecar_vae(self, checkpoint: ModelFile) -> Path | None:
        """`<checkpoint>.vae.safetensors` (or .vae.pt/.vae.ckpt) beside a single-file checkpoint."""
        if checkpoint.path.is_dir():
            return None
        stem = checkpoint.path.with_suffix("")
        for suffix in SIDECAR_VAE_SUFFIXES:
            candidate = stem.with_name(stem.name + suffix)
            if candidate.is_file():
                return candidate
        return None

    def vae_choices(self) -> list[str]:
        """What a UI offers: Automatic, None (baked in), then the files of models/VAE."""
        return [VAE_AUTOMATIC, VAE_BAKED_IN] + [f.name for f in self.list("vae")]

    def resolve_vae(self, checkpoint: ModelFile, choice: str | None) -> Path | None:
        """The VAE file to use with a checkpoint, or None for the one baked into it.

        None/""/"Automatic": the sidecar if there is one, else baked in; "None": baked in;
        anything else: a name (or stem, or A1111's "name [hash]") from the models/VAE listing.
        Raises LookupError for a name that is not in the listing.
        """
        choice = (choice or "").strip()
        if choice in ("", VAE_AUTOMATIC, "auto"):
            return self.sidecar_vae(checkpoint)
        if choice in (VAE_BAKED_IN, "none", "None (baked in)"):
            return None
        file = self.find("vae", choice)
        if file is None:
            names = ", ".join(self.vae_choices())
            raise LookupError(f"unknown VAE {choice!r}; available: {names}")
        return file.path

    # --- names and hashes -----------------------------------------------------------------------

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

    def hash_in_background(self, kind: str, name: str,
                           on_progress: Callable[[float], None] | None = None) -> threading.Thread | None:
        """Start hashing a file in a thread (once; a second call while it runs does nothing).
        `hash_progress` tells how far it got; the listing shows the hash once done."""
        file = self.find(kind, name)
        if file is None:
            raise KeyError(f"unknown {kind} {name!r}")
        if self.hashes.get(file):
            return None
        key = f"{kind}:{file.name}"
        with self._hash_lock:
            if key in self._hashing:
                return None
            self._hashing[key] = 0.0

        def progress(fraction: float) -> None:
            self._hashing[key] = fraction
            if on_progress:
                on_progress(fraction)

        def work() -> None:
            try:
                self.ensure_hash(file, progress)
            finally:
                with self._hash_lock:
                    self._hashing.pop(key, None)

        thread = threading.Thread(target=work, name=f"sha256 {file.name}", daemon=True)
        thread.start()
        return thread

    def hash_progress(self, kind: str, name: str) -> float | None:
        """0..1 while a background hash of this file runs, else None."""
        file = self.find(kind, name)
        return None if file is None else self._hashing.get(f"{kind}:{file.name}")


CARD_FIELDS = {
    "title": ("modelspec.title", "title", "name"),
    "author": ("modelspec.author", "author"),
    "description": ("modelspec.description", "description"),
    "license": ("modelspec.license", "license"),
    "trigger_words": ("modelspec.trigger_phrase", "trigger_words", "activation text", "ss_trigger_words"),
    "date": ("modelspec.date",),
}


def metadata_card(metadata: dict) -> dict[str, str]:
    """The human-facing fields of safetensors metadata (modelspec keys and common variants)."""
    card = {}
    for name, keys in CARD_FIELDS.items():
        for key in keys:
            value = metadata.get(key)
            if value and str(value).strip():
                card[name] = str(value).strip()
                break
    return card


def _describe_lazily(path: Path) -> dict:
    try:
        from pipelines.models.loading import describe, read_header

        return describe(read_header(path))
    except Exception as exc:  # a broken folder is listed with its error
        return {"error": str(exc)}
