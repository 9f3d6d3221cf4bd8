"""Control units in the infotext, as sd-webui-controlnet writes and reads them.

One entry per enabled unit with a model, keyed by the unit's index:

    ControlNet 0: "Module: canny, Model: control_canny [0123456789], Weight: 1, Resize Mode: Crop and Resize,
    Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1,
    Pixel Perfect: False, Control Mode: Balanced"

The extension's field order and display names (its `infotext_fields`: each field name with its
words capitalised); the whole value is JSON-quoted by the infotext writer because it holds
commas. The control image is not in the text. A threshold the unit leaves to its
preprocessor is written as the module's default (`control_modules.unit_thresholds`); one the
module does not use as -1, the extension's "unset", which reads back as the default.

Torch-free: the UI and PNG Info read units back through `units_from_params`.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import PurePath
from typing import Any, Iterable, Mapping

from pipelines.core.checks import RequestError
from pipelines.core.control import NO_MODEL, ControlUnit
from pipelines.core.control_modules import unit_thresholds

UNIT_KEY_PREFIX = "ControlNet"
UNSET = -1  # the extension writes and reads -1 for "the preprocessor's default"
MAX_READ_UNITS = 64  # a pasted "ControlNet 99999" is junk, not a request for that many units

# sd-webui-controlnet's infotext fields, in its order
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode")
# older texts (extension 1.1.2xx) used other names for some of them
_LEGACY_NAMES = {"preprocessor": "module", "starting/ending": "guidance", "preprocessor params": "params"}
_UNIT_KEY_RE = re.compile(rf"^{UNIT_KEY_PREFIX}[ -](\d+)$")
# a new "Key: " after a comma; a comma inside a value (a legacy "(0, 1)") is not followed by one
_ITEM_SPLIT_RE = re.compile(r",\s*(?=[A-Za-z][A-Za-z /]*:\s)")
_NUMBERS_RE = re.compile(r"-?\d+(?:\.\d+)?")
_HASH_RE = re.compile(r"\s*\[[0-9a-fA-F]*\]$")


def unit_key(index: int) -> str:
    return f"{UNIT_KEY_PREFIX} {index}"


def display_name(field: str) -> str:
    """The extension's label of a field: "resize_mode" -> "Resize Mode"."""
    return " ".join(word.capitalize() for word in field.split("_"))


def control_model_title(file: Any) -> str:
    """The name the extension lists a control model by: "<file stem> [<short hash>]" once the
    file is hashed, else the stem. `file` is a listing entry (`ModelFileInfo`)."""
    stem = PurePath(file.name).stem
    return f"{stem} [{file.short_hash}]" if getattr(file, "short_hash", None) else stem


def _names(file: Any) -> tuple[str, ...]:
    return file.name, control_model_title(file), getattr(file, "title", file.name), PurePath(file.name).stem


def match_control_model(files: Iterable[Any], name: str) -> Any | None:
    """The listed control model (`ModelFileInfo`) `name` means: its file name, title ("stem [hash]")
    or stem, in any case; a title with another hash (infotexts and clients of the extension carry
    its old 8-digit hashes) by its stem. None when no file matches."""
    wanted = name.strip()
    folded = {wanted.lower(), _HASH_RE.sub("", wanted).lower()}
    files = list(files)
    exact = [file for file in files if wanted in _names(file)]
    loose = [file for file in files if folded & {n.lower() for n in _names(file)}]
    return (exact or loose or [None])[0]


# --- writing ------------------------------------------------------------------------------

def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        value = round(value, 6)  # 1.0 -> "1", as the extension's sliders write it
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _thresholds(unit: ControlUnit) -> tuple[float | None, float | None]:
    """The thresholds the preprocessor used: the unit's, or its module's defaults."""
    try:
        return unit_thresholds(unit)
    except RequestError:  # an unknown module or a bad value: the request never ran with it
        return unit.threshold_a, unit.threshold_b


def serialize_unit(unit: ControlUnit, model_title: str | None = None) -> str:
    """One unit's entry text; `model_title` is the listed title of the unit's model ("name [hash]")."""
    values = {field: getattr(unit, field) for field in INFOTEXT_FIELDS}
    values["model"] = model_title or unit.model
    values["threshold_a"], values["threshold_b"] = (UNSET if value is None else value for value in _thresholds(unit))
    return ", ".join(f"{display_name(field)}: {_text(value)}" for field, value in values.items())


def written(unit: ControlUnit) -> bool:
    """Whether the unit gets an entry: enabled, with a model."""
    return unit.enabled and unit.model != NO_MODEL


def control_params(units: Iterable[ControlUnit], model_titles: Mapping[int, str] | None = None) -> dict[str, str]:
    """{"ControlNet <i>": entry} for each written unit, `i` its index in the request;
    `model_titles`: {unit index: the model's listed title}, as the engine resolved them."""
    titles = model_titles or {}
    return {unit_key(index): serialize_unit(unit, titles.get(index))
            for index, unit in enumerate(units) if written(unit)}


# --- reading ------------------------------------------------------------------------------

def _value(text: str) -> Any:
    """The extension's reading of a value: a bool, an int, a float, else the text."""
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_unit(text: str) -> dict[str, Any]:
    """The fields one entry names (raw values, not yet checked); unknown keys are skipped."""
    values: dict[str, Any] = {}
    for item in _ITEM_SPLIT_RE.split(text.strip().strip('"')):
        key, sep, raw = item.partition(":")
        if not sep:
            continue
        name = key.strip().lower()
        name = _LEGACY_NAMES.get(name, name.replace(" ", "_"))
        if name in INFOTEXT_FIELDS:
            values[name] = _value(raw)
        elif name in ("guidance", "params"):  # legacy "(0, 1)" and "(512, 100, 200)"
            numbers = [float(n) for n in _NUMBERS_RE.findall(raw)]
            targets = (("guidance_start", "guidance_end") if name == "guidance"
                       else ("processor_res", "threshold_a", "threshold_b"))
            values.update(zip(targets, numbers))
    return values


def _checked(values: dict[str, Any]) -> dict[str, Any] | None:
    """The unit's fields after ControlUnit's checks, a bad value dropped (back to its default)."""
    values = {name: value for name, value in values.items()
              if not (name in ("processor_res", "threshold_a", "threshold_b") and value == UNSET)}
    while True:
        try:
            unit = ControlUnit(**values)
        except RequestError as exc:
            if exc.field not in values:
                return None
            values.pop(exc.field)
            continue
        return {field.name: getattr(unit, field.name) for field in fields(ControlUnit)}


def units_from_params(params: Mapping[str, str]) -> list[dict[str, Any]]:
    """ControlUnit field dicts from a parsed infotext (`infotext.parse_infotext`), listed at
    their unit index: a unit the text does not have is {"enabled": False}. Images are None
    (the text has none). Never raises: a bad value is left at its default."""
    found: dict[int, dict[str, Any]] = {}
    for key, text in params.items():
        match = _UNIT_KEY_RE.match(key.strip())
        if match and isinstance(text, str) and int(match.group(1)) < MAX_READ_UNITS:
            unit = _checked({"enabled": True, **parse_unit(text)})
            if unit is not None:
                found[int(match.group(1))] = unit
    if not found:
        return []
    return [found.get(index, {"enabled": False}) for index in range(max(found) + 1)]
