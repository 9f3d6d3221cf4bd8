"""GET listings in A1111's shapes: checkpoints, VAEs, samplers, schedulers, upscalers, LoRAs,
embeddings, scripts; and the refresh routes that rescan the model folders."""

from __future__ import annotations

from fastapi import APIRouter

from pipelines.core import samplers
from pipelines.core.engine_api import EngineAPI

from .. import names


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

    @router.get("/embeddings")
    def embeddings():
        """Readable embedding files as `loaded` (used by writing their name in a prompt),
        unreadable ones as `skipped`."""
        return engine.embedding_listing()

    @router.get("/scripts")
    def scripts():
        """No selectable or always-on scripts (the webuiapi client asks on connect)."""
        return {"txt2img": [], "img2img": []}

    @router.get("/script-info")
    def script_info():
        return []
