"""The server defaults API requests start from: what GET/POST /sdapi/v1/options read and change.

One small object per API instance. Changing it affects later API requests that do not name
their own checkpoint/VAE/clip skip, and nothing else: not a job that is running or waiting
(its request was built before), not the web UI (each browser session has its own choices).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from pipelines.core.engine_api import EngineAPI

from .errors import bad_field
from .names import parse_clip_skip, resolve_checkpoint_field

SCOPE_NOTE = ("server defaults for later API requests that do not set these themselves; "
              "running and queued jobs and the web UI are not affected")


class ApiOptions:
    def __init__(self, sd_model_checkpoint: str | None = None, sd_vae: str = "Automatic",
                 clip_stop_at_last_layers: int = 1):
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {
            "sd_model_checkpoint": sd_model_checkpoint,  # a listed name; None: the engine's default
            "sd_vae": sd_vae,
            "CLIP_stop_at_last_layers": clip_stop_at_last_layers,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def public(self, engine: EngineAPI) -> dict[str, Any]:
        """GET /options: the checkpoint as A1111's title "name [hash]"."""
        values = self.snapshot()
        name = values["sd_model_checkpoint"] or engine.default_checkpoint()
        file = engine.find_checkpoint(name) if name else None
        values["sd_model_checkpoint"] = file.title if file else name
        values["sd_checkpoint_hash"] = file.sha256 if file else None
        return values

    def update(self, engine: EngineAPI, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate every recognised key first, then apply them together; returns the report."""
        if not isinstance(changes, Mapping):
            raise bad_field("body", "expected a JSON object of option names and values")
        accepted: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "sd_model_checkpoint":
                accepted[key] = resolve_checkpoint_field(engine, key, value).name
            elif key == "sd_vae":
                accepted[key] = checked_vae(engine, key, value)
            elif key == "CLIP_stop_at_last_layers":
                accepted[key] = parse_clip_skip(key, value)
        with self._lock:
            self._values.update(accepted)
        ignored = sorted(k for k in changes if k not in accepted)
        return {"updated": {k: v for k, v in accepted.items()}, "ignored": ignored, "scope": SCOPE_NOTE}


def checked_vae(engine: EngineAPI, field_name: str, value: Any) -> str:
    """One of the engine's VAE choices that is not a separate file ("Automatic", "None")."""
    choices = engine.vae_choices()
    if value not in choices:
        raise bad_field(field_name, f"unknown VAE {value!r}; choose one of: {', '.join(choices)}")
    files = {f.name for f in engine.list_vaes()}
    built_in = [choice for choice in choices if choice not in files]
    if value not in built_in:
        raise bad_field(field_name, "choosing a separate VAE file is not supported yet; "
                                    f"use one of: {', '.join(built_in)}")
    return value
