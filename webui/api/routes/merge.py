"""POST /merge-checkpoints: A1111's Checkpoint Merger over the API (a route of our own: A1111
has the tab but no route). Body fields are named like A1111's merger; the job waits in the
engine's one queue like a generation; a bad name, a family or shape mismatch or a taken
output name is a 422 naming the field."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from pipelines.core.engine_api import EngineAPI
from pipelines.core.merge_request import INTERP_METHODS, WEIGHTED_SUM, MergeRequest

from ..bodies import ApiModel
from ..errors import owner_of
from .job_threads import JobThreads


class MergeCheckpointsRequest(ApiModel):
    primary_model_name: str = Field(..., description="Model A: a checkpoint name from /sdapi/v1/sd-models "
                                                     "(file name, title, model name or hash)")
    secondary_model_name: str = Field("", description="Model B (Weighted sum, Add difference)")
    tertiary_model_name: str = Field("", description="Model C (Add difference)")
    interp_method: str = Field(WEIGHTED_SUM, description="One of: " + ", ".join(
        f'"{m}"' for m in INTERP_METHODS) + ". Weighted sum: A*(1-M) + B*M; Add difference: A + (B-C)*M; "
        "No interpolation: A as it is (bake in a VAE, convert to fp16)")
    multiplier: float = Field(0.3, description="M, from 0 to 1")
    save_as_half: bool = Field(True, description="Write float16 tensors (false: float32)")
    custom_name: str = Field("", description="Output file name in the checkpoints folder (no path; "
                                             ".safetensors is added); empty: named after the inputs")
    bake_in_vae: str | None = Field("None", description='A VAE from /sdapi/v1/sd-vae to replace the '
                                                          'checkpoint\'s, or "None"')
    overwrite: bool = Field(False, description="Replace an existing file of that name")


class MergeCheckpointsResponse(ApiModel):
    info: str = Field(..., description="What was done, for people")
    name: str = Field(..., description="The new checkpoint's name in /sdapi/v1/sd-models ('' if interrupted)")
    filename: str = ""
    interrupted: bool = False
    warnings: list[str] = Field(default_factory=list)


def add_merge_routes(router: APIRouter, engine: EngineAPI, threads: JobThreads) -> None:
    def merge(body: MergeCheckpointsRequest, request: Request) -> dict[str, Any]:
        merge_request = MergeRequest(**body.model_dump())  # RequestError -> 422 naming the field
        result = engine.merge_checkpoints(merge_request, owner=owner_of(request))
        return {"info": result.message, "name": result.name, "filename": result.path,
                "interrupted": result.interrupted, "warnings": list(result.warnings)}

    @router.post("/merge-checkpoints", response_model=MergeCheckpointsResponse)
    async def merge_checkpoints(body: MergeCheckpointsRequest, request: Request):
        """Merge two or three checkpoints (A1111's Checkpoint Merger) into a new `.safetensors`
        file in the checkpoints folder, with A1111's `sd_merge_recipe` / `sd_merge_models`
        metadata; it is listed by /sdapi/v1/sd-models at once. Models of different families,
        or with tensors of different shapes, are refused (422 naming the field), as is an
        existing output name without `overwrite`. Waits its turn in the job queue; /progress
        reports it and /interrupt stops it (nothing is saved then)."""
        return await threads.run(merge, body, request)
