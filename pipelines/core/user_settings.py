"""The server's saved settings: A1111's Settings tab, trimmed to what this server honours.

One table (`SETTINGS`: A1111's option key, label, type, limits, default) drives the web UI's
Settings tab, the checks and `/sdapi/v1/options`, and one `SettingsStore` per data folder
holds the values (`<data_dir>/settings.json`, written atomically: a crash or a bad value
never loses what was saved). The UI and the API reach the same store through
`server_settings(engine)`.

Settings are read when a request is built (`store.save_options()`, the defaults a new page
shows), so changing one never changes a job that is already running or waiting.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.checks import RequestError, check_flag, check_int
from pipelines.core.fileio import write_json_atomic
from pipelines.core.request import LIMITS
from pipelines.core.samplers import SAMPLER_NAMES
from pipelines.core.save_formats import PATTERN_WORDS, SUFFIXES, SaveOptions

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
FORMATS = tuple(SUFFIXES)  # A1111's samples_format values this server writes
FORMAT_ALIASES = {"jpeg": "jpg"}
THEMES = ("light", "dark")
MAX_PATTERN = 200  # characters of a file-name pattern


@dataclass(frozen=True)
class Setting:
    key: str  # A1111's option key: what /sdapi/v1/options reads and writes
    label: str
    default: Any
    kind: str  # "choice" | "int" | "bool" | "text"
    section: str
    choices: tuple[str, ...] = ()  # "choice" without choices: the caller supplies them (VAEs)
    low: int = 0
    high: int = 0
    info: str = ""
    # Why the value does not take effect yet ("" once it does): the tab says so and POST
    # /options reports it under no_effect, so nobody is told a setting works that does not.
    pending: str = ""


_NEW_PAGE = "a new page starts with it"
_LIVE_PREVIEW = "the running job's current_image in /sdapi/v1/progress (the page shows none yet); from the next job"
# A1111's "Live preview display method" values this server makes ("Full" and "Approx NN" it does not:
# a full VAE decode per poll would slow the job, and A1111's approximating network is not shipped)
PREVIEW_CHEAP, PREVIEW_TAESD = "Approx cheap", "TAESD"
PREVIEW_METHODS = (PREVIEW_CHEAP, PREVIEW_TAESD)
_SIZE_LOW, _SIZE_HIGH = (int(v) for v in LIMITS["width"])
_CLIP_LOW, _CLIP_HIGH = (int(v) for v in LIMITS["clip_skip"])

SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("samples_format", "File format for images", "png", "choice", "Saving images", choices=FORMATS,
            info="JPEG and WebP carry the parameters in EXIF, as A1111's do"),
    Setting("jpeg_quality", "Quality for saved JPEG and WebP images", 80, "int", "Saving images",
            low=1, high=100),
    Setting("samples_filename_pattern", "File name pattern", "", "text", "Saving images",
            info="empty: [number]-[seed]; words: " + ", ".join(f"[{w}]" for w in PATTERN_WORDS)),
    Setting("grid_save", "Save grids (X/Y/Z plot)", True, "bool", "Saving images"),
    Setting("show_progress_every_n_steps", "Live preview every N steps (0: never)", 1, "int", "Live previews",
            low=0, high=32, info=_LIVE_PREVIEW),
    Setting("show_progress_type", "Live preview display method", PREVIEW_CHEAP, "choice", "Live previews",
            choices=PREVIEW_METHODS,
            info="TAESD: the tiny autoencoder of models/VAE-approx (taesd_decoder.pth, taesdxl_decoder.pth), "
                 "a full-size picture; without one, the cheap approximation (the job says so)"),
    Setting("default_sampler", "Sampler of a new page", "DPM++ 2M", "choice", "Defaults",
            choices=SAMPLER_NAMES, info="txt2img, img2img and Inpaint start with it"),
    Setting("default_width", "Width of a new page (0: the checkpoint's native size)", 0, "int", "Defaults",
            low=0, high=_SIZE_HIGH, pending="new pages take the checkpoint's native size"),
    Setting("default_height", "Height of a new page (0: the checkpoint's native size)", 0, "int", "Defaults",
            low=0, high=_SIZE_HIGH, pending="new pages take the checkpoint's native size"),
    Setting("CLIP_stop_at_last_layers", "Clip skip", 1, "int", "Stable Diffusion", low=_CLIP_LOW, high=_CLIP_HIGH,
            info=f"{_NEW_PAGE}; so do API requests that do not set it"),
    Setting("sd_vae", "VAE", "Automatic", "choice", "Stable Diffusion",
            info=f"{_NEW_PAGE}; so do API requests that do not set it"),
    Setting("theme", "Theme of the page", "light", "choice", "User interface", choices=THEMES),
)}
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS.values()))


def defaults() -> dict[str, Any]:
    return {key: setting.default for key, setting in SETTINGS.items()}


def check_setting(key: str, value: Any, choices: Sequence[str] | None = None) -> Any:
    """`value` as `key` keeps it; RequestError naming the key when it is not one. `choices`:
    the allowed values of a choice whose list only the engine knows (sd_vae)."""
    setting = SETTINGS.get(key)
    if setting is None:
        raise RequestError(key, "not a setting of this server")
    if setting.kind == "bool":
        return check_flag(key, value)
    if setting.kind == "int":
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        number = check_int(key, value)
        if not setting.low <= number <= setting.high:
            raise RequestError(key, f"must be between {setting.low} and {setting.high}, got {number}")
        return number
    if setting.kind == "text":
        return check_pattern(key, value)
    return _checked_choice(setting, value, choices)


def _checked_choice(setting: Setting, value: Any, choices: Sequence[str] | None) -> str:
    allowed = tuple(choices if choices is not None else setting.choices)
    spelled = {c.casefold(): c for c in allowed}
    if isinstance(value, str):
        word = value.strip().casefold()
        word = FORMAT_ALIASES.get(word, word) if setting.key == "samples_format" else word
        if word in spelled:
            return spelled[word]
    raise RequestError(setting.key, f"unknown value {value!r}; choose one of: {', '.join(allowed)}")


def check_pattern(key: str, value: Any) -> str:
    """A file-name pattern: text of known [words] only, no folders (a name, not a path)."""
    if not isinstance(value, str):
        raise RequestError(key, "must be text")
    if len(value) > MAX_PATTERN:
        raise RequestError(key, f"must be at most {MAX_PATTERN} characters")
    if any(c in value for c in "/\\:\0") or ".." in value:
        raise RequestError(key, "must be a file name without folders (no / \\ : or ..)")
    rest = value
    while "[" in rest:
        start = rest.index("[")
        end = rest.find("]", start)
        if end < 0:
            raise RequestError(key, "has a [ without its ]")
        word = rest[start + 1:end]
        if word not in PATTERN_WORDS:
            raise RequestError(key, f"unknown word [{word}]; use {', '.join(f'[{w}]' for w in PATTERN_WORDS)}")
        rest = rest[end + 1:]
    return value.strip()


def save_options(values: Mapping[str, Any]) -> SaveOptions:
    """How a request built now saves its images, from the settings' values."""
    return SaveOptions(format=values["samples_format"], quality=values["jpeg_quality"],
                       filename_pattern=values["samples_filename_pattern"], save_grids=values["grid_save"])


class SettingsStore:
    """The settings of one server, kept in `path` (None: in memory only). Thread-safe; every
    change is checked as a whole first, then saved atomically, then applied."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._values = defaults()
        if self.path is not None:
            self._values.update(self._read(self.path))

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        """The saved values that are still valid; a bad file or value is logged and skipped
        (its default stands), never fatal for starting the server."""
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("settings in %s not read (%s); using defaults", path, exc)
            return {}
        values = {}
        for key, value in (saved.items() if isinstance(saved, dict) else ()):
            # the VAE list is the engine's: any name is taken back, and checked when it is changed
            choices = [value] if key == "sd_vae" and isinstance(value, str) else None
            try:
                values[key] = check_setting(key, value, choices)
            except RequestError:
                log.warning("setting %s=%r in %s ignored: not a valid value", key, value, path)
        return values

    def values(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._values[key]

    def save_options(self) -> SaveOptions:
        return save_options(self.values())

    def update(self, changes: Mapping[str, Any], choices: Mapping[str, Sequence[str]] | None = None) -> dict:
        """Check every change (RequestError naming the first bad key: nothing changes), save
        them all atomically, then apply; returns the checked changes. `choices`: the engine's
        lists for choices the table leaves open (sd_vae)."""
        checked = {key: check_setting(key, value, (choices or {}).get(key)) for key, value in changes.items()}
        with self._lock:
            updated = {**self._values, **checked}
            if self.path is not None and updated != self._values:
                write_json_atomic(self.path, updated, indent=1, sort_keys=True)
            self._values = updated
        return checked


def vae_setting_choices(engine: Any) -> list[str]:
    """The VAE choices `sd_vae` can take: the engine's that are not a separate file ("Automatic",
    "None"; a separate VAE file is not supported as a server default yet)."""
    files = {f.name for f in engine.list_vaes()}
    return [choice for choice in engine.vae_choices() if choice not in files]


@functools.lru_cache(maxsize=16)  # one per data dir in use: a server has one, a test run a few
def _store_at(path: Path) -> SettingsStore:
    return SettingsStore(path)


def settings_in(data_dir: Path | None) -> SettingsStore:
    """The settings saved in a data folder (`<data_dir>/settings.json`), one store per folder;
    without a folder, settings of its own in memory only."""
    if data_dir is None:
        return SettingsStore(None)
    return _store_at(Path(data_dir).resolve() / SETTINGS_FILE)


def server_settings(engine: Any) -> SettingsStore:
    """The engine's settings, shared by the UI, the API and its jobs (`settings_in` its data dir)."""
    return settings_in(getattr(engine.paths, "data_dir", None))
