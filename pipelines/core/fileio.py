"""Whole files: written atomically (write beside, fsync, rename) and hashed.

Every writer of user-visible or cache files goes through `atomic_path`, so a crash or a
full disk never leaves half a file under the final name. Every sha256 of a file (model
hashes, LoRA and embedding hashes, download checks) goes through `sha256_file`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; done once, at import
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a saved image or model must get what open() would give it.
NEW_FILE_MODE = 0o666 & ~_process_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, keep_mode: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is fsynced and renamed
    onto `path`, on any error it is removed. `keep_mode`: the new file keeps the old one's
    permissions (for files the user may have chmod'ed, like styles.csv); otherwise it gets the
    usual mode of a new file (0644 under the common umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mode = NEW_FILE_MODE
        if keep_mode:
            try:
                mode = path.stat().st_mode & 0o777
            except FileNotFoundError:
                pass
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, keep_mode: bool = False) -> None:
    with atomic_path(path, keep_mode=keep_mode) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, **dumps_kwargs).encode("utf-8"))


HASH_CHUNK = 8 << 20  # large reads: hashing a multi-gigabyte checkpoint is disk-bound


def sha256_file(path: str | os.PathLike, on_progress: Callable[[float], None] | None = None, *,
                start: int = 0, size: int | None = None) -> str:
    """The sha256 (hex) of a file's bytes from `start`, at most `size` of them (all by default).

    A folder (a diffusers model) hashes as all its files in path order, each preceded by its
    path relative to the folder and a NUL, so renaming a part changes the hash; `start` and
    `size` apply to single files only. `on_progress(fraction)` hears how far it got."""
    path = Path(path)
    if path.is_dir():
        parts, start, size = sorted(p for p in path.rglob("*") if p.is_file()), 0, None
    else:
        parts = [path]
    total = sum(max(0, p.stat().st_size - start) for p in parts)
    if size is not None:
        total = min(total, size)
    digest = hashlib.sha256()
    done = 0
    for part in parts:
        if part != path:
            digest.update(part.relative_to(path).as_posix().encode() + b"\0")
        with open(part, "rb") as f:
            f.seek(start)
            while chunk := f.read(HASH_CHUNK if size is None else min(HASH_CHUNK, size - done)):
                digest.update(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(min(1.0, done / max(total, 1)))
    return digest.hexdigest()


def sha256_file_cached(path: str | os.PathLike, *, start: int = 0) -> str:
    """`sha256_file`, remembered while the file keeps its size and mtime (small files hashed
    for every job that uses them: LoRAs, embeddings)."""
    st = os.stat(path)
    return _sha256_of_version(str(path), st.st_size, st.st_mtime_ns, start)


@functools.lru_cache(maxsize=1024)
def _sha256_of_version(path: str, size: int, mtime_ns: int, start: int) -> str:
    return sha256_file(path, start=start)  # size and mtime_ns only key the cache
