"""GET/POST /options (the API's server defaults, with the server's saved settings: the web UI's
Settings tab edits the same ones) and GET /cmd-flags (how the server runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body

from pipelines.core.engine_api import EngineAPI
from pipelines.core.user_settings import server_settings

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
    options.use_store(server_settings(engine))  # one source of truth with the Settings tab
    @router.get("/options")
    def get_options():
        """The API's server defaults: sd_model_checkpoint (title), sd_checkpoint_hash, the saved
        settings (samples_format, jpeg_quality, samples_filename_pattern, grid_save,
        show_progress_every_n_steps, default_sampler, default_width, default_height,
        CLIP_stop_at_last_layers, sd_vae, theme), A1111's common keys (samples_save, send_seed,
        eta_noise_seed_delta, randn_source, enable_pnginfo, face_restoration,
        face_restoration_model, code_former_weight), Forge's forge_additional_modules (the VAE /
        text encoder files later requests use, as listed names) and every other key a client has set."""
        return options.public(engine)

    @router.post("/options")
    def set_options(body: dict[str, Any] = Body(...)):
        """Change the API's server defaults (all or nothing: a bad value is a 422 naming its key).
        Running and queued jobs and the web UI are not affected. Every key is kept and read back by
        GET, but only some change what this server does: the reply's `updated` lists those,
        `ignored` the others, and `no_effect` says why for each (keys this server does not know,
        settings not applied yet, ...). The saved settings are written to the data folder.
        `samples_save: false` makes `save_images: true` save nothing, as in A1111."""
        return options.update(engine, body)

    @router.get("/sd-modules")
    def sd_modules():
        """Forge's list of what forge_additional_modules takes: the files of models/VAE and of
        models/text_encoder (a client may send back the `filename` or the name)."""
        folder = Path(engine.paths.folder("text_encoders"))
        return ([{"model_name": f.name, "filename": str(f.path)} for f in engine.list_vaes()]
                + [{"model_name": name, "filename": str(folder / name)} for name in engine.text_encoder_names()])

    @router.get("/cmd-flags")
    def get_cmd_flags():
        """The flags the server was started with (A1111's names, passwords masked), then what
        the engine made of them: device, dtypes, attention backend, offload mode."""
        return {**public_flags(cmd_flags), **engine.runtime_flags()}
