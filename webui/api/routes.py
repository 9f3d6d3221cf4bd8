"""The /sdapi/v1 routes over an injected engine.

Generation and extras run in threads of their own pool, sized to the engine queue's
capacity: a job waits in the engine's one fair queue (shared with the web UI) without
blocking the event loop or taking the threads the listings (plain `def` endpoints, FastAPI's
pool) need. A full queue is answered 503 at once, before a thread is taken. /progress,
/interrupt and /skip (async, no blocking calls) answer while a job runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any

import anyio
from fastapi import APIRouter, Body, Request
from PIL import Image

from pipelines.core import samplers
from pipelines.core.infotext import parse_infotext
from pipelines.core.jobs import DEFAULT_MAX_WAITING
from pipelines.core.outputs import read_infotext
from pipelines.core.request import RequestError

from . import images, names
from . import translate as tr
from .errors import API_OWNER, bad_field, is_checkpoint_error, owner_of, route_class
from .models import (
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    GenerationFields,
    GenerationResponse,
    Img2ImgRequest,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from .options import ApiOptions

PREFIX = "/sdapi/v1"


def _is_api_job(job) -> bool:
    # exactly the owners errors.owner_of gives; a Gradio session hash never contains ":"
    owner = str(job.owner) if job is not None and job.owner else ""
    return owner == API_OWNER or owner.startswith(API_OWNER + ":")


def _preview_png(report) -> str | None:
    """The running job's latent preview as base64 PNG; a preview that fails is just absent."""
    if report is None or report.preview is None:
        return None
    try:
        picture = report.preview()
    except Exception:  # the latents may be mid-update; the next poll gets one
        return None
    return images.encode_png(picture) if picture is not None else None


def _wall_clock(monotonic_time: float | None) -> datetime.datetime:
    if monotonic_time is None:
        return datetime.datetime.now()
    return datetime.datetime.now() - datetime.timedelta(seconds=time.monotonic() - monotonic_time)


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


def create_api(engine: Any, *, auth: list[tuple[str, str]] | None = None,
               options: ApiOptions | None = None, cmd_flags: dict[str, Any] | None = None) -> APIRouter:
    """An APIRouter with every /sdapi/v1 route over `engine`.

    auth: basic-auth (user, password) pairs; when given, every route answers 401 without one.
    options: the server defaults POST /options changes (a fresh ApiOptions by default); it is
    also reachable as `router.api_options`.
    cmd_flags: the launcher's parsed flags (`vars(args)`) for GET /cmd-flags.
    """
    options = options or ApiOptions()
    router = APIRouter(prefix=PREFIX, route_class=route_class(auth, tr.max_body_bytes(engine)), tags=["sdapi"])
    router.api_options = options  # type: ignore[attr-defined]

    # --- generation ---------------------------------------------------------------------------

    threads = anyio.CapacityLimiter(engine.queue.capacity() or DEFAULT_MAX_WAITING + 1)

    async def queued(call, *args):
        """Run a job's handler in the job threads; a full queue answers 503 without waiting."""
        engine.queue.check_room()
        return await anyio.to_thread.run_sync(call, *args, limiter=threads)

    def generate(body: GenerationFields, request: Request) -> dict[str, Any]:
        prepared = tr.prepare_generation(engine, body, options)
        try:
            result = engine.generate(prepared.request, owner=owner_of(request))
        except RequestError as exc:
            raise bad_field(prepared.api_field(exc.field), exc.message) from None
        except Exception as exc:
            if is_checkpoint_error(exc):
                raise bad_field(prepared.api_field("checkpoint"), str(exc)) from None
            raise
        return {
            "images": [images.encode_png(image) for image in result.images] if body.send_images else [],
            "parameters": tr.generation_parameters(body),
            "info": tr.dumps(tr.generation_info(prepared, result)),
        }

    @router.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request):
        """Text to image. Unknown fields are ignored; unsupported features are listed in info.warnings.
        503 with a `detail` saying so when the queue is full (`--max-queue-size`)."""
        return await queued(generate, body, request)

    @router.post("/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request):
        """Image to image; with `mask`, inpainting (white = repaint). Images over the upload
        limits (`--max-upload-mb`, `--max-upload-megapixels`) are refused before decoding."""
        return await queued(generate, body, request)

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(body: ExtrasSingleImageRequest, request: Request):
        """Upscale one image with upscaler_1 (and blend in upscaler_2 by its visibility)."""
        return await queued(upscale_single, body, request)

    def upscale_single(body: ExtrasSingleImageRequest, request: Request) -> dict[str, Any]:
        image = images.decode_image("image", body.image, tr.upload_limits(engine))
        upscale = tr.upscale_request(body, image)
        if upscale is None:
            return {"html_info": "", "image": images.encode_png(image)}
        try:
            result = engine.upscale(upscale, owner=owner_of(request))
        except RequestError as exc:
            raise tr.upscale_error(exc) from None
        output, text = result.images[0], result.infotexts[0] if result.infotexts else ""
        if body.upscaler_2 not in ("", "None") and body.extras_upscaler_2_visibility > 0:
            visibility = min(float(body.extras_upscaler_2_visibility), 1.0)
            try:
                second = engine.upscale(dataclasses.replace(upscale, upscaler=body.upscaler_2),
                                        owner=owner_of(request)).images[0]
            except RequestError as exc:
                raise tr.upscale_error(exc, second=True) from None
            if second.size != output.size:
                second = second.resize(output.size, Image.Resampling.LANCZOS)
            output = Image.blend(output.convert("RGB"), second.convert("RGB"), visibility)
            text = f"{text}, Postprocess upscaler 2: {body.upscaler_2}, Postprocess upscaler 2 visibility: {visibility:g}"
            output.info["parameters"] = text
        return {"html_info": images.html_info(text), "image": images.encode_png(output)}

    @router.post("/png-info", response_model=PNGInfoResponse)
    def png_info(body: PNGInfoRequest):
        """The parameters text of an image (PNG chunk or EXIF comment), parsed."""
        image = images.decode_image("image", body.image, tr.upload_limits(engine))
        text = read_infotext(image) or ""
        return {"info": text, "items": images.png_items(image), "parameters": parse_infotext(text)}

    # --- the running job ----------------------------------------------------------------------

    def jobs_ahead(request: Request, running) -> int | None:
        """How many jobs are ahead of the caller's earliest one: 0 when the caller's job runs,
        None when the caller has none. The caller is its --api-auth user; without auth every
        API client is the same caller."""
        owner = owner_of(request)
        if running is not None and running.owner == owner:
            return 0
        mine = engine.queue.first_waiting(owner)
        return None if mine is None else max(engine.queue.ahead(mine), 0)

    @router.get("/progress", response_model=ProgressResponse)
    async def progress(request: Request, skip_current_image: bool = False):
        """Progress of the job running now (from the API or the web UI), with a cheap preview of
        the current latents as current_image unless skip_current_image is set. `jobs_ahead`
        (not in A1111): how many jobs run or wait before the caller's own, null when it has none."""
        job = engine.current_job()
        waiting = engine.queue.waiting()
        ahead = jobs_ahead(request, job)
        if job is None:
            state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                     "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                     "sampling_steps": 0, "queued": waiting}
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                    "jobs_ahead": ahead}
        report, control = job.progress, job.control
        label = job.kind
        if report is not None and report.batch_count > 1:
            label = f"Batch {report.batch_index + 1} out of {report.batch_count}"
        state = {
            "skipped": bool(control.stop_current and not control.interrupted),
            "interrupted": control.interrupted,
            "stopping_generation": False,
            "job": label,
            "job_count": report.batch_count if report else 1,
            "job_timestamp": _wall_clock(job.started_at).strftime("%Y%m%d%H%M%S"),
            "job_no": report.batch_index if report else 0,
            "sampling_step": report.step if report else 0,
            "sampling_steps": report.steps if report else 0,
            "queued": waiting,
        }
        return {
            "progress": round(report.fraction, 4) if report else 0.0,
            "eta_relative": float(report.eta) if report and report.eta is not None else 0.0,
            "state": state,
            "current_image": None if skip_current_image else _preview_png(report),
            "textinfo": report.describe() if report else f"{job.kind}: starting (loading the model)",
            "jobs_ahead": ahead,
        }

    def control_running(action: str) -> dict[str, Any]:
        job = engine.current_job()
        if job is None:
            return {"done": False, "detail": "nothing is running"}
        if not _is_api_job(job):
            return {"done": False, "detail": f"the running job came from the web UI; the API only {action}s "
                                             "jobs started through the API"}
        getattr(job.control, action)()
        return {"done": True, "job": job.id, "detail": f"{action} requested"}

    @router.post("/interrupt")
    async def interrupt():
        """Stop the running API job (within a step); a web UI job is left alone."""
        return control_running("interrupt")

    @router.post("/skip")
    async def skip():
        """End the current batch of the running API job; later batches still run."""
        return control_running("skip")

    # --- options ------------------------------------------------------------------------------

    @router.get("/options")
    def get_options():
        """sd_model_checkpoint (title), sd_checkpoint_hash, sd_vae, CLIP_stop_at_last_layers."""
        return options.public(engine)

    @router.post("/options")
    def set_options(body: dict[str, Any] = Body(...)):
        """Change the API's server defaults. Running jobs and the web UI are not affected;
        keys other than sd_model_checkpoint, sd_vae and CLIP_stop_at_last_layers are ignored."""
        return options.update(engine, body)

    # --- listings -----------------------------------------------------------------------------

    @router.get("/sd-models")
    def sd_models():
        return [{"title": names.checkpoint_title(f), "model_name": names.checkpoint_model_name(f),
                 "hash": f.short_hash, "sha256": f.sha256, "filename": str(f.path), "config": None}
                for f in engine.list_checkpoints()]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        return {"checkpoints": len(engine.list_checkpoints(refresh=True))}

    @router.get("/sd-vae")
    def sd_vae():
        return [{"model_name": f.name, "filename": str(f.path)} for f in engine.registry.list("vae")]

    @router.get("/samplers")
    def get_samplers():
        result = []
        for name in engine.sampler_names():
            spec = samplers.SAMPLERS.get(name)
            extra = {"default_scheduler": samplers.resolve_schedule_type(name, "Automatic"),
                     "schedulers": list(engine.schedule_types(name))}
            if spec is not None:
                extra["stochastic"] = spec.stochastic
            result.append({"name": name, "aliases": names.sampler_aliases(name), "options": extra})
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

    @router.get("/cmd-flags")
    def get_cmd_flags():
        """The flags the server was started with (A1111's names, passwords masked), then what
        the engine made of them: device, dtypes, attention backend, offload mode."""
        return {**public_flags(cmd_flags), **engine.runtime_flags()}

    @router.get("/scripts")
    def scripts():
        """No selectable or always-on scripts (the webuiapi client asks on connect)."""
        return {"txt2img": [], "img2img": []}

    @router.get("/script-info")
    def script_info():
        return []

    return router
