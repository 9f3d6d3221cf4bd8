"""The saved outputs, for the Image browser: listed by folder and date, newest first, paged,
searched by prompt, seed and model, and deleted into a trash folder that can be emptied.

Laid out as `core.outputs` saves them: `<outdir>/<folder>/<YYYY-MM-DD>/<file>`. Listing
never opens an image: it walks the date folders (each folder's listing is remembered until
its mtime changes), so 10,000 images page instantly. Only a search reads the images'
parameters (`core.metadata_read`), remembered per file by size and mtime, and kept on disk
when a cache file is given, so the next start does not read them again.

Every name a caller passes is resolved inside `outdir`; nothing outside it is ever read,
moved or deleted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.checks import RequestError
from pipelines.core.fileio import write_json_atomic
from pipelines.core.metadata_read import read_image_metadata

log = logging.getLogger(__name__)

FOLDERS = ("txt2img-images", "img2img-images", "extras-images", "txt2img-grids", "img2img-grids")
ALL_FOLDERS = "All"
TRASH = "trash"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PER_PAGE = 36
SEARCHED_KEYS = ("Prompt", "Seed", "Model")
MAX_CACHED = 100_000  # files whose parameters are remembered


@dataclass(frozen=True)
class OutputFile:
    name: str  # relative to outdir, with "/": what the UI and delete name it by
    folder: str
    date: str
    mtime_ns: int
    size: int


@dataclass(frozen=True)
class OutputPage:
    files: list[OutputFile]
    page: int  # 1-based, clamped into 1..pages
    pages: int
    total: int


class OutputIndex:
    """The images under `outdir`; `cache_file`: where searched parameters are kept (None: memory)."""

    def __init__(self, outdir: Path, cache_file: Path | None = None):
        self.outdir = Path(outdir)
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._lock = threading.Lock()
        self._listings: dict[str, tuple[int, list[OutputFile]]] = {}  # date folder -> (mtime_ns, files)
        self._params: dict[str, tuple[int, int, dict[str, str]]] = {}  # name -> (size, mtime_ns, fields)
        self._params_dirty = False
        if self.cache_file is not None:
            self._params.update(_read_cache(self.cache_file))

    # --- listing -----------------------------------------------------------------------------
    def folders(self) -> list[str]:
        top = self.outdir
        return [folder for folder in FOLDERS if (top / folder).is_dir() and not (top / folder).is_symlink()]

    def dates(self, folder: str | None = None) -> list[str]:
        """The date folders of `folder` (all folders: None or "All"), newest first."""
        found = {entry.name for top in self._tops(folder) for entry in _subfolders(self.outdir / top)}
        return sorted(found, reverse=True)

    def files(self, folder: str | None = None, date: str | None = None) -> list[OutputFile]:
        """Every image of `folder` and `date` (None / "All" / "": any), newest first."""
        found: list[OutputFile] = []
        for top in self._tops(folder):
            for entry in _subfolders(self.outdir / top):
                if not date or date == ALL_FOLDERS or entry.name == date:
                    found.extend(self._listing(top, entry))
        found.sort(key=lambda f: (f.mtime_ns, f.name), reverse=True)
        return found

    def _tops(self, folder: str | None) -> list[str]:
        if not folder or folder == ALL_FOLDERS:
            return self.folders()
        if folder not in FOLDERS:
            raise RequestError("folder", f"unknown folder {folder!r}; choose one of: {', '.join(FOLDERS)}")
        return [folder] if folder in self.folders() else []

    def _listing(self, top: str, date_dir: os.DirEntry) -> list[OutputFile]:
        key = f"{top}/{date_dir.name}"
        stamp = date_dir.stat().st_mtime_ns  # a file added, removed or renamed changes it
        with self._lock:
            cached = self._listings.get(key)
        if cached and cached[0] == stamp:
            return cached[1]
        files = []
        with os.scandir(date_dir.path) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_SUFFIXES):
                    continue  # hidden names are outputs' temp files, still being written
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_file(follow_symlinks=False):
                    files.append(OutputFile(f"{key}/{entry.name}", top, date_dir.name, st.st_mtime_ns, st.st_size))
        with self._lock:
            self._listings[key] = (stamp, files)
        return files

    def page(self, files: list[OutputFile], page: int, per_page: int = PER_PAGE) -> OutputPage:
        pages = max(1, math.ceil(len(files) / per_page))
        page = min(max(1, int(page)), pages)
        start = (page - 1) * per_page
        return OutputPage(files[start:start + per_page], page, pages, len(files))

    # --- search ------------------------------------------------------------------------------
    def search(self, query: str, folder: str | None = None, date: str | None = None) -> list[OutputFile]:
        """The images whose prompt or model contains every word of `query` or whose seed is
        one of them (any case), newest first; an empty query: all of them."""
        words = (query or "").casefold().split()
        files = self.files(folder, date)
        if not words:
            return files
        found = [f for f in files if _matches(self.parameters(f), words)]
        self.save_cache()
        return found

    def parameters(self, file: OutputFile) -> dict[str, str]:
        """The prompt, seed and model an image says it was made with ({} when it says nothing)."""
        key = (file.size, file.mtime_ns)
        with self._lock:
            cached = self._params.get(file.name)
        if cached and cached[:2] == key:
            return cached[2]
        try:
            fields = read_image_metadata(self.path_of(file.name)).fields
        except (OSError, ValueError) as exc:  # a broken file is simply not found by a search
            log.info("cannot read %s: %s", file.name, exc)
            fields = {}
        found = {k: str(fields[k]) for k in SEARCHED_KEYS if k in fields}
        with self._lock:
            if len(self._params) < MAX_CACHED:
                self._params[file.name] = (*key, found)
                self._params_dirty = True
        return found

    def save_cache(self) -> None:
        with self._lock:
            if self.cache_file is None or not self._params_dirty:
                return
            data = {name: list(entry) for name, entry in self._params.items()}
            self._params_dirty = False
        try:
            write_json_atomic(self.cache_file, data)
        except OSError as exc:  # only a cache: the next search reads the images again
            log.warning("output index cache not saved: %s", exc)

    # --- one image ---------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The file `name` means, inside outdir and not in the trash; RequestError otherwise."""
        parts = Path(str(name or "")).parts
        if len(parts) != 3 or parts[0] not in FOLDERS or any(p in (".", "..") for p in parts):
            raise RequestError("image", f"not a saved output: {name!r}")
        path = self.outdir.joinpath(*parts)
        root = self.outdir.resolve()
        if path.is_symlink() or not path.resolve().is_relative_to(root) or not path.is_file():
            raise RequestError("image", f"not a saved output: {name!r}")
        return path

    def delete(self, name: str) -> Path:
        """Move an image into <outdir>/trash/<folder>/<date>/ (a number added when the name is
        taken there); returns where it went."""
        path = self.path_of(name)
        target_dir = self.outdir / TRASH / Path(name).parent
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / path.name
        count = 1
        while target.exists():
            target = target_dir / f"{path.stem} ({count}){path.suffix}"
            count += 1
        os.replace(path, target)  # same filesystem: outdir holds both
        return target

    def trash_count(self) -> int:
        trash = self.outdir / TRASH
        return sum(1 for p in trash.rglob("*") if p.is_file()) if trash.is_dir() else 0

    def empty_trash(self) -> int:
        """Delete everything in the trash for good; returns how many files went."""
        trash = self.outdir / TRASH
        if trash.is_symlink() or not trash.is_dir():
            return 0
        count = self.trash_count()
        shutil.rmtree(trash)
        return count


def _subfolders(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _matches(params: dict[str, str], words: list[str]) -> bool:
    text = f"{params.get('Prompt', '')}\n{params.get('Model', '')}".casefold()
    seed = params.get("Seed", "").strip()
    return all(word == seed or word in text for word in words)


def _read_cache(path: Path) -> dict[str, tuple[int, int, dict[str, str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: (int(size), int(mtime), dict(fields)) for name, (size, mtime, fields) in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("output index cache %s not read (%s); images are read again", path, exc)
        return {}
