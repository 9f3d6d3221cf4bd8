"""GET listings in A1111's shapes: checkpoints, VAEs, samplers, schedulers, upscalers, LoRAs,
embeddings, styles, face restorers, Real-ESRGAN models, hypernetworks, latent upscale modes,
scripts; and the refresh routes that rescan the model folders."""

from __future__ import annotations

from fastapi import APIRouter

from pipelines.core import samplers
from pipelines.core.engine_api import EngineAPI
from pipelines.core.request import LATENT_UPSCALE_MODES
from pipelines.core.styles import style_database

from .. import names
from .. import scripts as selectable

REALESRGAN_COMPACT = "RealESRGAN Compact"  # spandrel's name for SRVGGNetCompact


def is_realesrgan(upscaler) -> bool:
    """A model upscaler of the Real-ESRGAN project: the Compact architecture is only used
    there; its RRDBNet files share spandrel's "ESRGAN" with the original ESRGAN, so for
    those the file name decides (Real-ESRGAN's releases all start with "RealESRGAN"/"realesr")."""
    architecture = getattr(upscaler, "architecture", None)
    if architecture == REALESRGAN_COMPACT:
        return True
    file_name = str(upscaler.name).rsplit("/", 1)[-1]
    return architecture == "ESRGAN" and "realesr" in file_name.casefold()


def add_listing_routes(router: APIRouter, engine: EngineAPI) -> None:
    @router.get("/sd-models")
    def sd_models():
        return [{"title": f.title, "model_name": f.model_name,
                 "hash": f.short_hash, "sha256": f.sha256, "filename": str(f.path), "config": None}
                for f in engine.list_checkpoints()]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        return {"checkpoints": len(engine.list_checkpoints(refresh=True))}

    @router.get("/sd-vae")
    def sd_vae():
        return [{"model_name": f.name, "filename": str(f.path)} for f in engine.list_vaes()]

    @router.post("/refresh-vae")
    def refresh_vae():
        """Rescan the VAE folder (models/VAE, --vae-dir); GET /sd-vae lists what it found."""
        engine.list_vaes(refresh=True)
        return None

    @router.get("/samplers")
    def get_samplers():
        result = []
        for name in engine.sampler_names():
            spec = samplers.SAMPLERS.get(name)
            extra = {"default_scheduler": samplers.resolve_schedule_type(name, "Automatic"),
                     "schedulers": list(engine.schedule_types(name))}
            if spec is not None:
                extra["stochastic"] = spec.stochastic
            result.append({"name": name, "aliases": samplers.sampler_aliases(name), "options": extra})
        return result

    @router.get("/schedulers")
    def get_schedulers():
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
                 "default_rho": s.default_rho, "need_inner_model": s.need_inner_model}
                for s in names.schedulers()]

    @router.get("/upscalers")
    def upscalers():
        """A1111's shape; model upscalers carry their architecture, file and native scale."""
        none = {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": None}
        return [none, *({"name": u.name, "model_name": getattr(u, "architecture", None),
                         "model_path": str(u.path) if getattr(u, "path", None) else None, "model_url": None,
                         "scale": u.scale} for u in engine.upscalers())]

    @router.get("/loras")
    def loras():
        """A1111's shape (name, alias, path, metadata: the file's safetensors metadata)."""
        return [{k: entry[k] for k in ("name", "alias", "path", "metadata")} for entry in engine.lora_listing()]

    @router.post("/refresh-loras")
    def refresh_loras():
        engine.lora_listing(refresh=True)
        return None

    @router.get("/prompt-styles")
    def prompt_styles():
        """The styles of styles.csv (in --data-dir), in file order; apply them by name with
        `styles` in txt2img/img2img. A1111 has no route to change them: edit the file or use the
        web UI's style buttons."""
        database = style_database(engine)
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in (database.styles() if database is not None else [])]

    @router.get("/face-restorers")
    def face_restorers():
        """Face restorers installed (name, cmd_dir): the GFPGAN / RestoreFormer models of
        models/GFPGAN (--gfpgan-models-path) and the CodeFormer models of models/Codeformer
        (--codeformer-models-path), named by architecture. `restore_faces` uses the one named by
        `face_restoration_model` (override_settings or /options), else the first."""
        return engine.face_restorers()

    @router.get("/realesrgan-models")
    def realesrgan_models():
        """The models of the upscaler folder (models/ESRGAN, --esrgan-models-path) that are
        Real-ESRGAN: the RealESRGAN Compact architecture (realesr-general-x4v3, ...), or an
        RRDBNet file whose name says Real-ESRGAN (RealESRGAN_x4plus, ...). `name` is what
        upscaler_1 / hr_upscaler take, `scale` the model's native factor."""
        return [{"name": u.name, "path": str(u.path), "scale": u.scale}
                for u in engine.upscalers() if is_realesrgan(u)]

    @router.get("/hypernetworks")
    def hypernetworks():
        """Always empty: hypernetworks are not supported on this server (use LoRA instead)."""
        return []

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes():
        """The hires fix's latent upscalers (`hr_upscaler` takes these names too)."""
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @router.get("/embeddings")
    def embeddings():
        """Readable embedding files as `loaded` (used by writing their name in a prompt),
        unreadable ones as `skipped`."""
        return engine.embedding_listing()

    @router.get("/scripts")
    def scripts():
        """A1111's selectable scripts this server runs, per mode (lowercase names, for `script_name`)."""
        return selectable.listing(engine)

    @router.get("/script-info")
    def script_info():
        """Each selectable script's positional `script_args` in A1111's order (label, default, range, choices)."""
        return selectable.info(engine)
