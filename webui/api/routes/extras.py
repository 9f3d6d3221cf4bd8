"""POST /extra-single-image (upscale one image) and /png-info (read an image's parameters)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pipelines.core.engine_api import EngineAPI
from pipelines.core.infotext import parse_infotext
from pipelines.core.outputs import read_infotext
from pipelines.core.request import RequestError

from .. import images
from .. import translate as tr
from ..bodies import ExtrasSingleImageRequest, ExtrasSingleImageResponse, PNGInfoRequest, PNGInfoResponse
from ..errors import owner_of
from .job_threads import JobThreads


def add_extras_routes(router: APIRouter, engine: EngineAPI, threads: JobThreads) -> None:
    def upscale_single(body: ExtrasSingleImageRequest, request: Request) -> dict[str, Any]:
        image = images.decode_image("image", body.image, tr.upload_limits(engine))
        upscale = tr.upscale_request(body, image)
        if upscale is None:
            return {"html_info": "", "image": images.encode_png(image)}
        try:  # one job: the engine blends the second upscaler in itself
            result = engine.upscale(upscale, owner=owner_of(request))
        except RequestError as exc:
            raise tr.upscale_error(exc) from None
        text = result.infotexts[0] if result.infotexts else ""
        return {"html_info": images.html_info(text), "image": images.encode_png(result.images[0])}

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(body: ExtrasSingleImageRequest, request: Request):
        """Upscale one image with upscaler_1 (and blend in upscaler_2 by its visibility), then restore
        its faces: models/GFPGAN's restorer blended in by gfpgan_visibility, models/Codeformer's by
        codeformer_visibility (with codeformer_weight), as A1111's Extras. A visibility above 0 with
        no model in its folder is a 422 naming it."""
        return await threads.run(upscale_single, body, request)

    @router.post("/png-info", response_model=PNGInfoResponse)
    def png_info(body: PNGInfoRequest):
        """The parameters text of an image (PNG chunk or EXIF comment), parsed."""
        image = images.decode_image("image", body.image, tr.upload_limits(engine))
        text = read_infotext(image) or ""
        return {"info": text, "items": images.png_items(image), "parameters": parse_infotext(text)}
