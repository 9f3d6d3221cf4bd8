"""The user's choice of separate modules (Forge's "VAE / Text Encoder"): the request field
`text_encoders`, checked here, and the infotext lines Forge writes for it.

A request names files of models/text_encoder (clip_l, clip_g, t5xxl in fp16 or fp8) to use
instead of the ones paired automatically (the first of each kind by name); Forge's module list
may also name a 16-channel VAE there (ae.safetensors). Which names exist and whether they fit
the checkpoint is the engine's to say (`models.module_pick`); here only their form is checked.
Forge writes each chosen module as `Module 1: <stem>`, `Module 2: ...` in the infotext.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping

from pipelines.core.checks import RequestError

FIELD = "text_encoders"
MAX_MODULES = 8  # more than any family reads (SD 3: three encoders and a VAE)
INFOTEXT_KEY = "Module {}"  # Forge's key: "Module 1", "Module 2", ...


def check_text_encoders(value: Any) -> tuple[str, ...]:
    """`value` as the request keeps it: a tuple of distinct names, in the given order; None or
    an empty list means automatic pairing. RequestError naming the field otherwise."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value] if value.strip() else []
    if not isinstance(value, (list, tuple)):
        raise RequestError(FIELD, f"must be a list of text encoder file names, got {type(value).__name__}")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise RequestError(FIELD, f"must be a list of text encoder file names, got {item!r}")
        if item.strip() and item.strip() not in names:
            names.append(item.strip())
    if len(names) > MAX_MODULES:
        raise RequestError(FIELD, f"at most {MAX_MODULES} files, got {len(names)}")
    return tuple(names)


def file_name(path_or_name: str) -> str:
    """The file name of a module as Forge's clients send it (a full path on the Forge machine:
    only its name is looked up in this server's listings, never opened)."""
    return PureWindowsPath(PurePosixPath(path_or_name).name).name


def stem(name: str) -> str:
    """A module's name as Forge's infotext writes it: the file name without its extension."""
    base = file_name(name)
    return base.rsplit(".", 1)[0] if "." in base else base


def infotext_params(names: Iterable[str]) -> dict[str, str]:
    """{"Module 1": stem, "Module 2": ...} for the chosen modules, in order (Forge's lines)."""
    return {INFOTEXT_KEY.format(i): stem(name) for i, name in enumerate(names, start=1)}


def from_infotext(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The modules an infotext's `Module N` lines name, in their order (stems: the listings
    find a file by its stem)."""
    found = []
    index = 1
    while INFOTEXT_KEY.format(index) in params:
        value = str(params[INFOTEXT_KEY.format(index)]).strip()
        if value:
            found.append(value)
        index += 1
    return tuple(found)


def listed_names(modules: Iterable[str], listed: Iterable[str]) -> list[str]:
    """The listed file names that infotext module names (stems) or paths mean, in their order: what
    a pasted `Module N` selects in the header's multi-select; names not listed are left out."""
    by_stem = {}
    for name in listed:
        by_stem.setdefault(name, name)
        by_stem.setdefault(stem(name), name)
    found = [by_stem.get(file_name(module)) or by_stem.get(stem(module)) for module in modules]
    return list(dict.fromkeys(name for name in found if name))
