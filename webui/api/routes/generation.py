"""POST /txt2img and /img2img: an A1111 body -> one engine job -> A1111's answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pipelines.core.engine_api import EngineAPI
from pipelines.core.request import RequestError

from .. import images
from .. import translate as tr
from ..bodies import GenerationFields, GenerationResponse, Img2ImgRequest, Txt2ImgRequest
from ..errors import bad_field, is_checkpoint_error, owner_of
from ..options import ApiOptions
from .job_threads import JobThreads


def add_generation_routes(router: APIRouter, engine: EngineAPI, options: ApiOptions, threads: JobThreads) -> None:
    def generate(body: GenerationFields, request: Request) -> dict[str, Any]:
        prepared = tr.prepare_generation(engine, body, options)
        try:
            if prepared.sd_upscale is not None:  # script_name "sd upscale"
                result = engine.sd_upscale(prepared.request, **prepared.sd_upscale, owner=owner_of(request))
            else:
                result = engine.generate(prepared.request, owner=owner_of(request))
        except RequestError as exc:
            raise bad_field(prepared.api_field(exc.field), exc.message) from None
        except Exception as exc:
            if is_checkpoint_error(exc):
                raise bad_field(prepared.api_field("checkpoint"), str(exc)) from None
            raise
        return {
            "images": [images.encode_png(image) for image in result.images] if body.send_images else [],
            "parameters": tr.generation_parameters(body, prepared.request),
            "info": tr.dumps(tr.generation_info(prepared, result)),
        }

    @router.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request):
        """Text to image. Unknown fields are ignored; unsupported features are listed in info.warnings.
        503 with a `detail` saying so when the queue is full (`--max-queue-size`)."""
        return await threads.run(generate, body, request)

    @router.post("/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request):
        """Image to image; with `mask`, inpainting (white = repaint). Images over the upload
        limits (`--max-upload-mb`, `--max-upload-megapixels`) are refused before decoding."""
        return await threads.run(generate, body, request)
