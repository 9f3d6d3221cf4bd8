"""Extensions in the REST API: `alwayson_scripts` -> `GenerationRequest.extension_args`, and
each extension's own routes under `/ext/<id>/` (behind the API's authentication).

A1111 clients send `alwayson_scripts: {"<script title>": {"args": [...]}}`; here the key is
an extension's id, name or script title (case-insensitive) and `args` (or the object itself
when it has no "args") becomes `extension_args[<id>]`. Unknown or disabled ones are ignored
with a warning, as before.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from fastapi import APIRouter, Depends, HTTPException

from extensions.api import APIContext
from extensions.manager import ExtensionManager
from pipelines.core.engine_api import EngineAPI

from .errors import route_class

log = logging.getLogger(__name__)

EXT_PREFIX = "/ext"


def extension_args(engine: EngineAPI, scripts: Mapping[str, Any] | None, warnings: list[str]) -> dict[str, Any]:
    """{extension id: args} for the `alwayson_scripts` this server has; warnings for the rest."""
    found: dict[str, Any] = {}
    for name, value in (scripts or {}).items():
        ext = engine.extensions.find(name)
        if ext is None:
            warnings.append(f"alwayson_scripts: no script named {name!r} on this server; ignored")
            continue
        if not ext.active:
            warnings.append(f"alwayson_scripts: extension {ext.id!r} is {ext.status}; ignored")
            continue
        found[ext.id] = value.get("args", value) if isinstance(value, Mapping) else value
    return found


def extension_router(engine: EngineAPI, auth: list[tuple[str, str]] | None = None) -> APIRouter:
    """/ext/<id>/... for every extension that registered routes when the API was mounted. A
    disabled (or failed) extension's routes answer 404 until it is enabled again."""
    router = APIRouter(prefix=EXT_PREFIX, route_class=route_class(auth))
    manager = engine.extensions
    for ext, add in manager.api_routes():
        sub = APIRouter(prefix=f"/{ext.id}", tags=[f"extension: {ext.id}"],
                        dependencies=[Depends(_enabled_check(manager, ext.id))],
                        route_class=route_class(auth))
        try:
            add(sub, APIContext(engine=engine, extension_id=ext.id))
        except Exception as exc:  # noqa: BLE001 - a broken extension must not stop the API
            manager.fail(ext, "api_routes", exc)
            continue
        router.include_router(sub)
    return router


def _enabled_check(manager: ExtensionManager, ext_id: str):
    def enabled() -> None:
        current = manager.get(ext_id)
        if current is None or not current.active:
            raise HTTPException(status_code=404, detail=f"extension {ext_id!r} is not enabled")

    return enabled
