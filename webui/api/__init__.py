"""The AUTOMATIC1111-compatible REST API (/sdapi/v1/...), over an injected engine.

Three ways to serve it, all taking the same engine the web UI uses (one fair job queue):

- `create_api(engine, auth=None, options=None) -> APIRouter`: just the /sdapi/v1 routes
  (`create_controlnet_api(engine, auth=None)`: sd-webui-controlnet's /controlnet routes).
- `mount_api(app, engine, auth=None, options=None, docs=True) -> APIRouter`: adds them to an
  existing FastAPI app, with the /controlnet routes (for `--api`: Gradio's app, e.g. `blocks.app` after
  `blocks.launch(prevent_thread_lock=True)`, or a parent app Gradio is mounted into), plus
  `/docs` and `/openapi.json` for the API behind the same auth. An unprotected
  `/openapi.json` the app already had is replaced by the protected one.
- `create_app(engine, auth=None, options=None) -> FastAPI`: a standalone app with the API and
  its docs (for `--nowebui`); serve it with uvicorn.

`auth` is a list of (user, password) pairs (`webui.cli.parse_auth("u:p,...")`); when given,
every route (the docs included) answers 401 with `WWW-Authenticate: Basic` unless the request
carries one of them. Nothing happens at import time and nothing imports torch.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from pipelines.core.engine_api import EngineAPI

from .errors import route_class
from .extensions import extension_router
from .options import ApiOptions
from .routes import PREFIX, create_api, create_controlnet_api

__all__ = ["ApiOptions", "create_api", "create_app", "create_controlnet_api", "mount_api", "PREFIX"]

log = logging.getLogger(__name__)

TITLE = "Stable Diffusion web UI API"
VERSION = "1.10-compatible"


def docs_router(api: APIRouter, auth: list[tuple[str, str]] | None, *, docs_path: str = "/docs",
                openapi_path: str = "/openapi.json", more: tuple[APIRouter, ...] = ()) -> APIRouter:
    """/docs (Swagger UI) and /openapi.json describing the API's routes (and `more` routers'), behind `auth`."""
    router = APIRouter(route_class=route_class(auth))
    schema: dict[str, Any] = {}

    @router.get(openapi_path, include_in_schema=False)
    def openapi():
        if not schema:
            routes = [route for router in (api, *more) for route in router.routes]
            schema.update(get_openapi(title=TITLE, version=VERSION, routes=routes,
                                      description="AUTOMATIC1111-compatible: same fields, defaults and answers."))
        return JSONResponse(schema)

    @router.get(docs_path, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_path, title=TITLE)

    return router


def mount_api(app: FastAPI, engine: EngineAPI, *, auth: list[tuple[str, str]] | None = None,
              options: ApiOptions | None = None, docs: bool = True, cmd_flags: dict[str, Any] | None = None
              ) -> APIRouter:
    """Add the API (and, with `docs`, its protected /docs and /openapi.json) to `app`."""
    api = create_api(engine, auth=auth, options=options, cmd_flags=cmd_flags)
    controlnet = create_controlnet_api(engine, auth=auth)
    before = list(app.router.routes)
    replaced: list = []
    app.include_router(api)
    app.include_router(controlnet)
    app.include_router(extension_router(engine, auth))  # /ext/<id>/...: extensions' own routes
    if docs:
        extra = docs_router(api, auth, more=(controlnet,))
        taken = {route.path for route in extra.routes}
        replaced = [r for r in before if getattr(r, "path", None) in taken]
        if replaced:
            log.info("replacing the app's own %s with the API's (behind the API's auth)", ", ".join(sorted(taken)))
            before = [r for r in before if r not in replaced]
        app.include_router(extra)
    # ours first: a catch-all the app already has (Gradio mounted at "/") must not shadow them
    added = [r for r in app.router.routes if r not in before and r not in replaced]
    app.router.routes[:] = added + before
    return api


def create_app(engine: EngineAPI, *, auth: list[tuple[str, str]] | None = None,
               options: ApiOptions | None = None, cmd_flags: dict[str, Any] | None = None) -> FastAPI:
    """A FastAPI app serving only the API and its docs (`--nowebui`)."""
    app = FastAPI(title=TITLE, version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)
    mount_api(app, engine, auth=auth, options=options, docs=True, cmd_flags=cmd_flags)
    return app
