"""Files that are either wholly written or not there: write beside, fsync, rename.

Every writer of user-visible or cache files goes through `atomic_path`, so a crash or a
full disk never leaves half a file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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
