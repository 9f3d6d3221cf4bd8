"""The server defaults API requests start from: what GET/POST /sdapi/v1/options read and change.

One small object per API instance. Changing it affects later API requests that do not name
their own checkpoint/VAE/clip skip, and nothing else: not a job that is running or waiting
(its request was built before), not a browser session's own choices.

The server's saved settings (`pipelines.core.user_settings.SETTINGS`: output format, clip
skip, VAE, theme, ...) live in one `SettingsStore`, the one the web UI's Settings tab edits:
once `use_store` binds it (the router does, with the engine's store), a POST here changes
and saves them and the tab shows the change, and the other way round.

Besides those, A1111's commonly used option keys (`KNOWN_OPTIONS`) are checked, kept and
read back; those this server cannot honour (a GPU noise source, ...) are reported by POST as
having no effect, with the reason. Keys this server does not know at all are kept and echoed
too (A1111 clients set and read back their own), and reported as having no effect.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pipelines.core.checks import RequestError
from pipelines.core.engine_api import EngineAPI
from pipelines.core.user_settings import SETTINGS, SettingsStore, check_setting, vae_setting_choices

from . import forge_modules
from .errors import ApiError, bad_field
from .names import resolve_checkpoint_field

SCOPE_NOTE = ("server defaults for later API requests that do not set these themselves; "
              "running and queued jobs and the web UI are not affected")
MAX_EXTRA_KEYS = 1000  # keys this server does not know, kept for clients to read back
UNKNOWN_KEY = "not an option of this server: kept and read back by GET /options, changes nothing"
READ_ONLY = "read-only: the hash of sd_model_checkpoint"


def parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise bad_field(key, f"must be true or false, got {value!r}")
    return value


def int_between(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad_field(key, f"must be a whole number between {low} and {high}, got {value!r}")
        return value
    return parse


def number_between(low: float, high: float) -> Callable[[str, Any], float]:
    def parse(key: str, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise bad_field(key, f"must be a number between {low:g} and {high:g}, got {value!r}")
        return float(value)
    return parse


def one_of(*choices: str, optional: bool = False) -> Callable[[str, Any], str | None]:
    """A choice, any case, as spelled in `choices` (None too when `optional`)."""
    def parse(key: str, value: Any) -> str | None:
        if optional and value in (None, "", "None"):
            return None
        spelled = {c.casefold(): c for c in choices}
        if isinstance(value, str) and value.strip().casefold() in spelled:
            return spelled[value.strip().casefold()]
        listed = ", ".join(choices) + (" or null" if optional else "")
        raise bad_field(key, f"must be one of {listed}; got {value!r}")
    return parse


def unless(effective: Any, reason: str) -> Callable[[Any], str | None]:
    """No effect (for `reason`) unless the value is `effective`, what this server does anyway."""
    return lambda value: None if value == effective else reason


def never(reason: str) -> Callable[[Any], str | None]:
    return lambda value: reason


@dataclass(frozen=True)
class OptionSpec:
    default: Any  # what GET shows before a POST: this server's behaviour, not A1111's default
    parse: Callable[[str, Any], Any]  # the checked value, or ApiError naming the key
    no_effect: Callable[[Any], str | None] = lambda value: None  # why a value changes nothing


# A1111 option keys clients commonly set, beyond the model settings handled by ApiOptions itself.
KNOWN_OPTIONS: dict[str, OptionSpec] = {
    "samples_save": OptionSpec(True, parse_bool),  # false: save_images=true saves nothing (A1111)
    "send_seed": OptionSpec(True, parse_bool, never("a web UI setting in A1111 (what 'send to' buttons carry); "
                                                    "API requests carry their own seed")),
    "eta_noise_seed_delta": OptionSpec(0, int_between(0, 2**32 - 1),
                                       unless(0, "the ancestral samplers' noise seed is not offset on this server "
                                                 "(it behaves as 0)")),
    "randn_source": OptionSpec("CPU", one_of("GPU", "CPU", "NV"),
                               unless("CPU", "initial noise always comes from the CPU generator on this server "
                                             "(A1111's 'CPU' source), so seeds match across machines")),
    "enable_pnginfo": OptionSpec(True, parse_bool, unless(True, "every saved PNG carries its parameters "
                                                                "on this server")),
    # face restoration defaults for API requests that do not set restore_faces / override_settings
    "face_restoration": OptionSpec(False, parse_bool),  # restore_faces when a request leaves it out (A1111)
    "face_restoration_model": OptionSpec(None, one_of("CodeFormer", "GFPGAN", "RestoreFormer", optional=True)),
    "code_former_weight": OptionSpec(0.5, number_between(0.0, 1.0)),
}


class ApiOptions:
    def __init__(self, sd_model_checkpoint: str | None = None, sd_vae: str = "Automatic",
                 clip_stop_at_last_layers: int = 1, store: SettingsStore | None = None):
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {
            "sd_model_checkpoint": sd_model_checkpoint,  # a listed name; None: the engine's default
            forge_modules.KEY: [],  # Forge's VAE / text encoder files (listed names); []: automatic
            **{key: spec.default for key, spec in KNOWN_OPTIONS.items()},
        }
        if store is None:  # settings of its own, in memory, until use_store binds the server's
            store = SettingsStore(None)
            store.update({"sd_vae": sd_vae, "CLIP_stop_at_last_layers": clip_stop_at_last_layers},
                         choices={"sd_vae": [sd_vae]})
        self.store = store

    def use_store(self, store: SettingsStore) -> None:
        """Read and write the server's saved settings (the Settings tab's) from now on."""
        self.store = store

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._values, **self.store.values()}

    def public(self, engine: EngineAPI) -> dict[str, Any]:
        """GET /options: the checkpoint as A1111's title "name [hash]"."""
        values = self.snapshot()
        name = values["sd_model_checkpoint"] or engine.default_checkpoint()
        file = engine.find_checkpoint(name) if name else None
        values["sd_model_checkpoint"] = file.title if file else name
        values["sd_checkpoint_hash"] = file.sha256 if file else None
        return values

    def update(self, engine: EngineAPI, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate every key first (a 422 naming the first bad one, nothing applied), then apply
        them together. The report: `updated` (keys that change what later requests do), `ignored`
        (keys kept and read back by GET that change nothing here) with `no_effect` saying why."""
        if not isinstance(changes, Mapping):
            raise bad_field("body", "expected a JSON object of option names and values")
        accepted: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        no_effect: dict[str, str] = {}
        for key, value in changes.items():
            if key == "sd_model_checkpoint":
                accepted[key] = resolve_checkpoint_field(engine, key, value).name
            elif key == forge_modules.KEY:
                accepted[key] = forge_modules.parse_modules(engine, key, value)
            elif key == "sd_checkpoint_hash":
                no_effect[key] = READ_ONLY
            elif key in SETTINGS:
                settings[key] = checked_setting(engine, key, value)
                reason = SETTINGS[key].pending
                if reason and settings[key] != SETTINGS[key].default:
                    no_effect[key] = reason
            elif key in KNOWN_OPTIONS:
                accepted[key] = KNOWN_OPTIONS[key].parse(key, value)
                reason = KNOWN_OPTIONS[key].no_effect(accepted[key])
                if reason:
                    no_effect[key] = reason
            else:
                accepted[key] = value
                no_effect[key] = UNKNOWN_KEY
        with self._lock:
            extra = {k for k in (*self._values, *accepted) if k not in KNOWN_OPTIONS} - {"sd_model_checkpoint",
                                                                                           forge_modules.KEY}
            if len(extra) > MAX_EXTRA_KEYS:
                raise bad_field("body", f"this server keeps at most {MAX_EXTRA_KEYS} options it does not know")
            try:
                self.store.update(settings, choices={"sd_vae": [settings.get("sd_vae")]})
            except OSError as exc:  # the disk refused: nothing was changed, the saved file is intact
                raise ApiError(500, f"settings not saved: {exc.strerror or exc}") from None
            self._values.update(accepted)
        changed = {**accepted, **settings}
        return {"updated": {k: v for k, v in changed.items() if k not in no_effect},
                "ignored": sorted(no_effect), "no_effect": no_effect, "scope": SCOPE_NOTE}


def checked_setting(engine: EngineAPI, key: str, value: Any) -> Any:
    """A saved setting's value checked (the VAE against the engine's list); 422 naming `key`."""
    if key == "sd_vae":
        return checked_vae(engine, key, value)
    try:
        return check_setting(key, value)
    except RequestError as exc:
        raise bad_field(exc.field, exc.message) from None


def checked_vae(engine: EngineAPI, field_name: str, value: Any) -> str:
    """One of `vae_setting_choices`; a 422 naming `field_name` otherwise."""
    choices = engine.vae_choices()
    if value not in choices:
        raise bad_field(field_name, f"unknown VAE {value!r}; choose one of: {', '.join(choices)}")
    built_in = vae_setting_choices(engine)
    if value not in built_in:
        raise bad_field(field_name, "choosing a separate VAE file is not supported yet; "
                                    f"use one of: {', '.join(built_in)}")
    return value
