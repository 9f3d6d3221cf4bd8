"""What is on disk: each model kind's folder (`core.settings.MODEL_KINDS`), listed and cached by folder mtime.

A listing never hashes a file. Hashes (sha256, A1111's "AutoV2" short hash = first 10 hex
digits, the legacy 8-hex hash) are computed on demand and cached in a JSON file keyed by
path, size and mtime (`stores.HashCache`). Only names from a listing resolve to files, by
the rules of `names.find_listed`: no path from a request is opened as given.

Checkpoints are single files or diffusers folders (a folder with `model_index.json`,
listed as one entry and not descended into). `<checkpoint>.vae.safetensors` files beside a
checkpoint belong to it (its "Automatic" VAE) and are not listed as checkpoints. A kind may
have extra folders listed after its own (checkpoints: ComfyUI's `models/unet` and
`models/diffusion_models`, where denoiser-only files such as GGUF ones live); a name already
listed from an earlier folder hides the later file.
Per-checkpoint user choices the file cannot carry (the prediction type of an SD 2.x file)
are kept in `checkpoint_options.json` beside the hash cache, in the data dir.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipelines.core.prediction_types import PREDICTION_TYPES
from pipelines.core.settings import MODEL_KINDS
from pipelines.models.control_files import describe_control_file
from pipelines.models.families import BY_NAME, DIFFUSERS_INDEX
from pipelines.models.names import find_listed
from pipelines.models.prediction import normalise_prediction
from pipelines.models.stores import CheckpointOptions, DetailsCache, HashCache

AUTOV2_DIGITS = 10  # A1111's short hash ("AutoV2"): the first 10 hex digits of the sha256
DETAILS_VERSION = 1  # of the remembered describer answers: raise it when a remembered describer's answer changes


@dataclass
class ModelFile:
    name: str  # path relative to the kind's folder, with "/" (A1111 shows subfolders this way)
    path: Path
    size: int
    mtime: float
    details: dict = field(default_factory=dict)  # kind-specific facts read from the header
    sha256: str | None = None
    legacy_hash: str | None = None  # old A1111 versions' 8-hex "model hash" (see stores.legacy_model_hash)

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def short_hash(self) -> str | None:
        """A1111's "AutoV2" hash, what infotexts write as "Model hash"."""
        return self.sha256[:AUTOV2_DIGITS] if self.sha256 else None

    @property
    def model_name(self) -> str:
        """A1111's model_name: the name without its extension, folders joined with "_"."""
        return str(PurePosixPath(self.name.replace("/", "_").replace("\\", "_")).with_suffix(""))

    @property
    def title(self) -> str:
        """A1111's title: "name [short hash]", or the name while the file is not hashed."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    @property
    def family(self) -> str | None:
        return self.details.get("family")


class FolderListing:
    """Files of one model kind; re-walked only when some folder's mtime changed.

    `fallback`: a folder listed instead while `root` holds none of these files (the shipped
    demo checkpoint); the user's first file replaces it at the next listing. `extra_roots`:
    folders listed after `root`, names relative to each."""

    def __init__(self, root: Path, extensions: tuple[str, ...], describe: Callable[[Path], dict] | None = None,
                 hide_sidecars: bool = False, folder_marker: str | None = None, fallback: Path | None = None,
                 extra_roots: tuple[Path, ...] = (), remembered: tuple[DetailsCache, str] | None = None):
        self.root = Path(root)
        self.extra_roots = tuple(Path(r) for r in extra_roots)
        self.fallback = Path(fallback) if fallback is not None else None
        self.extensions = extensions
        self.describe = describe
        self.remembered = remembered  # (cache, kind): the describer's answers kept across starts
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
        found: list[ModelFile] = []
        for root in (self.root, *self.extra_roots):
            taken = {f.name for f in found}
            found += [f for f in self._walk(root, dir_mtimes) if f.name not in taken]
            if not root.is_dir():
                dir_mtimes[str(root)] = -1.0  # never matches: a folder created later is noticed
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
            cache, kind = self.remembered or (None, "")
            known = cache.get(kind, path, st.st_size, st.st_mtime) if cache else None
            try:
                self._details[key] = known if known is not None else self.describe(path)
            except Exception as exc:  # a broken file is listed with its error, never hides the rest
                self._details[key] = {"error": str(exc)}  # not remembered: the next start tries again
            else:
                if cache and known is None:
                    cache.put(kind, path, st.st_size, st.st_mtime, self._details[key])
        return self._details[key]


SIDECAR_VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")
VAE_AUTOMATIC = "Automatic"
VAE_BAKED_IN = "None"


class ModelRegistry:
    """All model kinds of one models folder, plus the shared hash cache and checkpoint options."""

    def __init__(self, folders: dict[str, Path], hash_cache: HashCache,
                 describers: dict[str, Callable[[Path], dict]] | None = None,
                 options: CheckpointOptions | None = None, fallbacks: dict[str, Path | None] | None = None,
                 extra_folders: dict[str, tuple[Path, ...]] | None = None,
                 remembered_kinds: tuple[str, ...] = ()):
        """`remembered_kinds`: the kinds whose describer answers are kept across starts in
        `file_details.json` beside the hash cache (slow describers)."""
        # ControlNet/T2I-Adapter details (family, type, layout) come with every listing; a caller may override
        describers = {"controlnet": describe_control_file, **(describers or {})}
        fallbacks, extra_folders = fallbacks or {}, extra_folders or {}
        details = DetailsCache(Path(hash_cache.path).parent / "file_details.json", DETAILS_VERSION) \
            if remembered_kinds else None
        self.listings = {
            kind: FolderListing(folders[kind], MODEL_KINDS[kind].extensions, describers.get(kind),
                                hide_sidecars=kind == "checkpoints",
                                folder_marker=DIFFUSERS_INDEX if kind == "checkpoints" else None,
                                fallback=fallbacks.get(kind), extra_roots=extra_folders.get(kind, ()),
                                remembered=(details, kind) if kind in remembered_kinds else None)
            for kind in MODEL_KINDS
        }
        self.hashes = hash_cache
        self.options = options or CheckpointOptions(Path(hash_cache.path).parent / "checkpoint_options.json")
        self._hashing: dict[str, float] = {}  # name -> progress of a background hash
        self._hash_lock = threading.Lock()

    def list(self, kind: str, refresh: bool = False) -> list[ModelFile]:
        files = self.listings[kind].files(refresh)
        for f in files:
            f.sha256, f.legacy_hash = self.hashes.get(f), self.hashes.legacy(f)
            if kind == "checkpoints":
                f.details = self._checkpoint_details(f)
        return files

    # --- checkpoint facts for the browser -------------------------------------------------------
    def _checkpoint_details(self, f: ModelFile) -> dict:
        """The listing's facts (the describer's, read once per file version) with what this
        data dir adds: the prediction type a load probed or the user chose, the sidecar VAE."""
        details = dict(f.details)
        if "error" in details:
            return details
        details.setdefault("prediction_source", "file")
        options = self.options.get(f.name)
        probed = options.get("probed")
        if details.get("prediction_source") == "probe" and isinstance(probed, dict) \
                and probed.get("size") == f.size and probed.get("mtime") == f.mtime \
                and probed.get("prediction") in PREDICTION_TYPES:
            _set_prediction(details, probed["prediction"], "probed when loaded")
        override = options.get("prediction")
        if override in PREDICTION_TYPES:
            _set_prediction(details, override, "user override")
        sidecar = self.sidecar_vae(f)
        details["sidecar_vae"] = sidecar.name if sidecar else None
        return details

    def set_prediction_type(self, name: str, prediction: str | None) -> None:
        """The user's prediction type for a checkpoint ('epsilon', 'v_prediction'; None = detect)."""
        if prediction is not None:
            prediction = normalise_prediction(prediction)
            if prediction is None:
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
        """The listed file `name` means, by the rules of `names.find_listed` (for checkpoints
        every name A1111 clients use: title, model_name, short hash, sha256, legacy hash)."""
        if not isinstance(name, str) or not name.strip():
            return None
        for refresh in (False, True):  # then a file added since the last listing
            found = find_listed(self.list(kind, refresh), name, a1111_names=kind == "checkpoints")
            if found is not None:
                return found
        return None

    def ensure_hash(self, file: ModelFile, on_progress: Callable[[float], None] | None = None) -> str:
        file.sha256 = self.hashes.compute(file, on_progress)
        file.legacy_hash = self.hashes.legacy(file)
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


def _set_prediction(details: dict, prediction: str, source: str) -> None:
    """A prediction type other than the file's, and the native size that goes with it (SD 2.x:
    the v models are the 768 ones), by the family's rule, as the loaded model will have it."""
    details["prediction"], details["prediction_source"] = prediction, source
    family = BY_NAME.get(details.get("family_id"))
    if family is not None:
        details["resolution"] = family.resolution_for(prediction, bool(details.get("inpainting")),
                                                      details.get("declared_resolution"))
