"""The /sdapi/v1 routes over an injected engine, assembled from one module per group:
generation (txt2img, img2img), extras (extra-single-image, png-info), progress (progress,
interrupt, skip), options (options, cmd-flags), listings (models, samplers, upscalers, styles, ...), system
(memory, extensions) and merge (merge-checkpoints). `create_controlnet_api` gives
sd-webui-controlnet's routes, under /controlnet as the extension serves them.

Generation and extras run in threads of their own pool (`JobThreads`), sized to the engine
queue's capacity: a job waits in the engine's one fair queue (shared with the web UI) without
blocking the event loop or taking the threads the listings (plain `def` endpoints, FastAPI's
pool) need. A full queue is answered 503 at once, before a thread is taken. /progress,
/interrupt and /skip (async, no blocking calls) answer while a job runs.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from pipelines.core.engine_api import EngineAPI

from ..errors import route_class
from ..options import ApiOptions
from ..translate import max_body_bytes
from .controlnet import PREFIX as CONTROLNET_PREFIX
from .controlnet import add_controlnet_routes
from .extras import add_extras_routes
from .generation import add_generation_routes
from .job_threads import JobThreads
from .listings import add_listing_routes
from .merge import add_merge_routes
from .options import add_option_routes
from .progress import add_progress_routes
from .system import add_system_routes

PREFIX = "/sdapi/v1"


def create_api(engine: EngineAPI, *, auth: list[tuple[str, str]] | None = None,
               options: ApiOptions | None = None, cmd_flags: dict[str, Any] | None = None) -> APIRouter:
    """An APIRouter with every /sdapi/v1 route over `engine`.

    auth: basic-auth (user, password) pairs; when given, every route answers 401 without one.
    options: the server defaults POST /options changes (a fresh ApiOptions by default); it is
    also reachable as `router.api_options`.
    cmd_flags: the launcher's parsed flags (`vars(args)`) for GET /cmd-flags.
    """
    options = options or ApiOptions()
    router = APIRouter(prefix=PREFIX, route_class=route_class(auth, max_body_bytes(engine)), tags=["sdapi"])
    router.api_options = options  # type: ignore[attr-defined]
    threads = JobThreads(engine)
    add_generation_routes(router, engine, options, threads)
    add_extras_routes(router, engine, threads)
    add_progress_routes(router, engine)
    add_option_routes(router, engine, options, cmd_flags)
    add_listing_routes(router, engine)
    add_system_routes(router, engine)
    add_merge_routes(router, engine, threads)
    return router


def create_controlnet_api(engine: EngineAPI, *, auth: list[tuple[str, str]] | None = None) -> APIRouter:
    """An APIRouter with sd-webui-controlnet's /controlnet routes over `engine`, behind `auth`."""
    router = APIRouter(prefix=CONTROLNET_PREFIX, route_class=route_class(auth, max_body_bytes(engine)),
                       tags=["controlnet"])
    add_controlnet_routes(router, engine)
    return router
