"""GET/POST /options (the API's server defaults) and GET /cmd-flags (how the server runs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body

from pipelines.core.engine_api import EngineAPI

from ..options import ApiOptions

SECRET_FLAGS = ("api_auth", "gradio_auth")


def public_flags(flags: dict[str, Any] | None) -> dict[str, Any]:
    """Command-line flags as JSON values, passwords masked."""
    out = {}
    for key, value in (flags or {}).items():
        if key in SECRET_FLAGS and value:
            value = "***"
        elif isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[key] = value
    return out


def add_option_routes(router: APIRouter, engine: EngineAPI, options: ApiOptions,
                      cmd_flags: dict[str, Any] | None) -> None:
    @router.get("/options")
    def get_options():
        """sd_model_checkpoint (title), sd_checkpoint_hash, sd_vae, CLIP_stop_at_last_layers."""
        return options.public(engine)

    @router.post("/options")
    def set_options(body: dict[str, Any] = Body(...)):
        """Change the API's server defaults. Running jobs and the web UI are not affected;
        keys other than sd_model_checkpoint, sd_vae and CLIP_stop_at_last_layers are ignored."""
        return options.update(engine, body)

    @router.get("/cmd-flags")
    def get_cmd_flags():
        """The flags the server was started with (A1111's names, passwords masked), then what
        the engine made of them: device, dtypes, attention backend, offload mode."""
        return {**public_flags(cmd_flags), **engine.runtime_flags()}
