"""Saving result images the way A1111 lays them out, never half-written.

    <outdir>/<folder>/<YYYY-MM-DD>/<NNNNN>-<seed>.png      (<NNNNN>.png without a seed)

NNNNN is one above the highest number already in that date folder (A1111's numbering, so
mixed folders keep counting). Each save reserves its number by exclusively creating a
hidden temp file named after the number (`.NNNNN.png.tmp`), writes and fsyncs it, then
renames it into place: the number is visible the whole time (first as the temp file, then
atomically as the final name), so concurrent savers - threads here, or another process on
the same folder - never share a number, and a reader never sees a partial PNG.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.core.save_formats import SaveOptions, name_part, write_exif_image

_LOCK = threading.Lock()
_NUMBER_RE = re.compile(r"^\.?(\d+)")  # final names and our hidden temp names
_TEMP_RE = re.compile(r"^\.\d+\.(png|jpg|webp)\.tmp$")
# A temp file untouched this long belongs to a writer that died mid-save (kill -9, power cut):
# a live one writes and renames within seconds. Such leftovers are removed by the next save.
STALE_TEMP_SECONDS = 3600
_FOLDER_RE = re.compile(r"^[\w.\- ]+$")
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


class OutputError(Exception):
    """An image could not be saved; the message says where and why."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


def _numbers_in(folder: Path) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _NUMBER_RE.match(entry.name)
            if match:
                found.setdefault(int(match.group(1)), []).append(entry.name)
    return found


def _temp_name(number: int, suffix: str = ".png") -> str:
    return f".{number:05}{suffix}.tmp"


def _remove_stale_temps(folder: Path) -> None:
    """Delete what writers that died mid-save left behind (never a final name)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _TEMP_RE.match(entry.name):
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass  # gone already, or not ours to remove: it only costs a number


def _reserve(folder: Path, suffix: str = ".png") -> tuple[int, Path, int]:
    """Pick the next number and create its temp file exclusively; returns (number, temp, fd)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    with _LOCK:  # threads of this process queue here; O_EXCL guards against other processes
        _remove_stale_temps(folder)
        for _ in range(1000):
            taken = _numbers_in(folder)
            number = max(taken, default=-1) + 1
            temp = folder / _temp_name(number, suffix)
            try:
                fd = os.open(temp, flags, 0o644)
            except FileExistsError:
                continue  # another process reserved it between our scan and open
            # Another process may have finished this number (its temp already renamed) between
            # our scan and our open: if any other file carries the number, give it back.
            others = [n for n in _numbers_in(folder).get(number, []) if n != temp.name]
            if others:
                os.close(fd)
                os.unlink(temp)
                continue
            return number, temp, fd
    raise OutputError(f"could not find a free file number in {folder}", folder)


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (is the output folder writable?)"
    return error.strerror or str(error)


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; best effort (not possible on every OS/filesystem).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_png(image: Image.Image, handle: IO[bytes], infotext: str | None) -> None:
    """`image` as PNG into `handle`, with `infotext` in its ``parameters`` chunk (A1111's)."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    pnginfo = PngInfo()
    if infotext:
        # tEXt like A1111; Pillow switches to iTXt by itself when the text is not Latin-1.
        pnginfo.add_text("parameters", infotext)
    image.save(handle, format="PNG", pnginfo=pnginfo)


def save_image(image: Image.Image, outdir: Path, folder: str, *, seed: int | None,
               infotext: str | None, now: datetime | None = None, options: SaveOptions | None = None,
               name_values: dict[str, str] | None = None) -> Path:
    """Save `image` as the next numbered PNG under outdir/folder/<date>/ and return its path.

    The PNG carries `infotext` in a `parameters` text chunk (JPEG/WebP: the EXIF UserComment);
    `options` picks the format, quality and file-name pattern (`name_values`: the pattern words'
    values, `save_formats.pattern_values`; the seed alone by default). Raises OutputError (disk
    full, permission, ...) with nothing left under the final name and no temp file.
    """
    if not _FOLDER_RE.match(folder) or folder in (".", ".."):
        raise ValueError(f"folder must be a plain folder name, got {folder!r}")
    options = options or SaveOptions()
    date_dir = Path(outdir) / folder / (now or datetime.now()).strftime("%Y-%m-%d")
    try:
        date_dir.mkdir(parents=True, exist_ok=True)
        number, temp, fd = _reserve(date_dir, options.suffix)
    except OSError as error:
        raise OutputError(f"cannot save image in {date_dir}: {_describe(error)}", date_dir) from error

    words = name_values if name_values is not None else {"seed": "" if seed is None else str(int(seed))}
    part = name_part(options.filename_pattern, words)
    name = f"{number:05}-{part}{options.suffix}" if part else f"{number:05}{options.suffix}"
    final = date_dir / name
    try:
        with os.fdopen(fd, "wb") as handle:
            if options.format == "png":
                write_png(image, handle, infotext)
            else:
                write_exif_image(image, handle, infotext, options)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException as error:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise OutputError(f"cannot save {final}: {_describe(error)}", final) from error
        if isinstance(error, Exception):
            raise OutputError(f"cannot save {final}: {error}", final) from error
        raise  # KeyboardInterrupt and friends, after cleaning up
    _fsync_dir(date_dir)
    return final


def _decode_user_comment(raw: bytes | str) -> str | None:
    """EXIF UserComment: an 8-byte charset prefix, then the text (A1111 writes "UNICODE" +
    UTF-16 for JPEG/WebP; writers disagree on the byte order, so detect it)."""
    if isinstance(raw, str):
        return raw or None
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        if len(body) >= 2 and body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:
            # ASCII text in UTF-16 has its zero bytes first in big-endian, second in little.
            zeros_even = body[0::2].count(0)
            zeros_odd = body[1::2].count(0)
            text = body.decode("utf-16-be" if zeros_even >= zeros_odd else "utf-16-le", errors="replace")
    elif prefix.startswith((b"ASCII", b"\x00\x00\x00\x00\x00\x00\x00\x00")):
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    text = text.rstrip("\x00")
    return text or None


def read_infotext(image_or_path: Image.Image | str | os.PathLike | IO[bytes]) -> str | None:
    """The parameters text of an image (a PIL image, a path or a binary file object): the
    PNG `parameters` chunk, else the EXIF UserComment (A1111's JPEG/WebP). None if the image
    has none; an unreadable file raises the usual OSError / PIL.UnidentifiedImageError."""
    if isinstance(image_or_path, Image.Image):
        return _infotext_of(image_or_path)
    with Image.open(image_or_path) as image:
        return _infotext_of(image)


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get("parameters")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if isinstance(text, str) and text:
        return text
    try:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # malformed EXIF is common in the wild; it just means "no text"
        return None
    return _decode_user_comment(comment) if comment else None
