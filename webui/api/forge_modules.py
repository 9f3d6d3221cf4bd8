"""Forge's `forge_additional_modules`: the VAE and text encoder files a Forge client picks, per
request in `override_settings` or as the server default through POST /sdapi/v1/options.

Forge keeps the full paths of the files chosen in its "VAE / Text Encoder" multi-select (its
models/VAE and models/text_encoder, mixed). Only a path's file name is looked up here, in this
server's own listings (a path from a request is never opened); a models/VAE file becomes the
request's `vae`, the others its `text_encoders`. Whether they fit the checkpoint is the engine's
to say (a 422 naming this field).
"""

from __future__ import annotations

from typing import Any, Mapping

from pipelines.core.engine_api import EngineAPI
from pipelines.core.module_choice import MAX_MODULES, file_name

from .errors import bad_field

KEY = "forge_additional_modules"
OVERRIDE = f"override_settings.{KEY}"


def parse_modules(engine: EngineAPI, field_name: str, value: Any) -> list[str]:
    """Listed file names for Forge's list of paths (or names); a 422 naming `field_name` for a value
    that is not a list of names, or a file in neither models/VAE nor models/text_encoder."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise bad_field(field_name, "must be a list of VAE / text encoder file names or paths")
    listed = {f.name for f in engine.list_vaes()} | set(engine.text_encoder_names())
    names = list(dict.fromkeys(name for name in map(file_name, value) if name))
    for name in names:
        if name not in listed:
            raise bad_field(field_name, f"{name!r} is in neither models/VAE nor models/text_encoder; available: "
                                        f"{', '.join(sorted(listed)) or 'none'}")
    if len(names) > MAX_MODULES:
        raise bad_field(field_name, f"at most {MAX_MODULES} files, got {len(names)}")
    return names


def module_fields(engine: EngineAPI, overrides: Mapping[str, Any], defaults: Mapping[str, Any],
                  names: dict[str, str]) -> dict[str, Any]:
    """The request's `text_encoders` (and `vae`, when a models/VAE file is among the modules) from
    override_settings, else from the server's options; {} when neither names any. `names` learns
    the field they came from, so the engine's errors about them name it."""
    if overrides.get(KEY) not in (None, ""):
        field_name, modules = OVERRIDE, parse_modules(engine, OVERRIDE, overrides[KEY])
    else:
        field_name, modules = KEY, list(defaults.get(KEY) or [])
    if not modules:
        return {}
    vae_files = {f.name for f in engine.list_vaes()}
    vaes = [name for name in modules if name in vae_files]
    if len(vaes) > 1:
        raise bad_field(field_name, f"{' and '.join(vaes)} are both VAEs; choose one")
    names["text_encoders"] = field_name
    fields: dict[str, Any] = {"text_encoders": tuple(name for name in modules if name not in vae_files)}
    if vaes:
        names["vae"] = field_name
        fields["vae"] = vaes[0]
    return fields
