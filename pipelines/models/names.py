"""Which listed file a name means: the one home of the names requests, infotexts and A1111
clients use for a model file.

Every kind answers to its listing name ("sub/x.safetensors"), the file name without folders,
the stem, and A1111's title "name [hash]". Checkpoints (`a1111_names=True`) also answer to
the name without its extension, A1111's model_name ("sub_x"), any of those in another case,
and their hashes: the AutoV2 short hash, the full sha256 or a prefix of it of 8+ digits, and
the legacy 8-hex hash (hashes only where already computed). Only listed files are ever
returned: a path in a request never names a file by itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Protocol, TypeVar

from pipelines.models.families import SDXL_REFINER

MIN_HASH_DIGITS = 8  # the legacy hash's length; shorter hex strings are too ambiguous to be a hash
_HEX = re.compile(r"[0-9a-f]+")


class Listed(Protocol):
    """A listed file as name matching sees it (`registry.ModelFile`)."""

    name: str
    sha256: str | None
    legacy_hash: str | None

    @property
    def stem(self) -> str: ...

    @property
    def model_name(self) -> str: ...


F = TypeVar("F", bound=Listed)


def spellings(name: str) -> list[str]:
    """The ways a request may write one name: as given, without A1111's " [hash]" title
    suffix, and each with Windows' backslashes as slashes."""
    wanted = name.strip()
    found = [wanted]
    if wanted.endswith("]") and " [" in wanted:
        found.append(wanted[: wanted.rindex(" [")].strip())
    found += [s.replace("\\", "/") for s in found if "\\" in s]
    return list(dict.fromkeys(found))


def names_of(file: Listed, a1111_names: bool) -> tuple[str, ...]:
    """The names a listed file answers to."""
    path = PurePosixPath(file.name)
    names = (file.name, path.name, file.stem)
    if a1111_names:
        names += (str(path.with_suffix("")) if path.suffix else file.name, file.model_name)
    return names


def find_listed(files: Iterable[F], name: str, *, a1111_names: bool = False) -> F | None:
    """The listed file `name` means (see the module docstring), or None: exact names first,
    then (checkpoints) the same names in any case, then hashes."""
    if not isinstance(name, str) or not name.strip():
        return None
    files = list(files)
    wanted = spellings(name)
    for spelling in wanted:
        for file in files:
            if spelling in names_of(file, a1111_names):
                return file
    if not a1111_names:
        return None
    folded = [s.casefold() for s in wanted]
    for spelling in folded:
        for file in files:
            if spelling in (n.casefold() for n in names_of(file, True)):
                return file
    return _by_hash(files, wanted[0].lower())


def _by_hash(files: list[F], digits: str) -> F | None:
    if len(digits) < MIN_HASH_DIGITS or not _HEX.fullmatch(digits):
        return None
    for file in files:  # a whole hash before a prefix of one
        if digits in (file.sha256, file.legacy_hash):
            return file
    return next((f for f in files if f.sha256 and f.sha256.startswith(digits)), None)


def default_file(files: list[F], wanted: str | None) -> tuple[F | None, bool]:
    """The checkpoint used when a request names none: `wanted` (--ckpt) when listed, else the first
    general model: an inpainting model or a refiner makes a poor txt2img default. Also whether
    `wanted` was asked for and is missing."""
    if wanted:
        found = find_listed(files, wanted, a1111_names=True)
        if found is not None:
            return found, False
    usable = [f for f in files if "error" not in f.details]
    general = [f for f in usable if not f.details.get("inpainting")
               and f.details.get("family_id") != SDXL_REFINER.name]
    return (general or usable or files or [None])[0], bool(wanted)
