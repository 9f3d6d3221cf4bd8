"""GET /progress, POST /interrupt and /skip: the running job, whoever started it.

All three are async and never block, so they answer while a job runs."""

from __future__ import annotations

import datetime
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from pipelines.core.engine_api import EngineAPI
from pipelines.core.jobs import Job
from pipelines.core.progress import Progress

from .. import images
from ..bodies import ProgressResponse
from ..errors import is_api_owner, owner_of

IDLE_STATE = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}


def preview_png(report: Progress | None) -> str | None:
    """The running job's latent preview as base64 PNG; a preview that fails is just absent."""
    if report is None or report.preview is None:
        return None
    try:
        picture = report.preview()
    except Exception:  # the latents may be mid-update; the next poll gets one
        return None
    return images.encode_png(picture) if picture is not None else None


def wall_clock(monotonic_time: float | None) -> datetime.datetime:
    if monotonic_time is None:
        return datetime.datetime.now()
    return datetime.datetime.now() - datetime.timedelta(seconds=time.monotonic() - monotonic_time)


def job_state(job: Job, waiting: int) -> dict[str, Any]:
    """A1111's `state` of the running job."""
    report, control = job.progress, job.control
    label = job.kind
    if report is not None and report.batch_count > 1:
        label = f"Batch {report.batch_index + 1} out of {report.batch_count}"
    return {
        "skipped": bool(control.stop_current and not control.interrupted),
        "interrupted": control.interrupted,
        "stopping_generation": False,
        "job": label,
        "job_count": report.batch_count if report else 1,
        "job_timestamp": wall_clock(job.started_at).strftime("%Y%m%d%H%M%S"),
        "job_no": report.batch_index if report else 0,
        "sampling_step": report.step if report else 0,
        "sampling_steps": report.steps if report else 0,
        "queued": waiting,
    }


def add_progress_routes(router: APIRouter, engine: EngineAPI) -> None:
    def jobs_ahead(request: Request, running: Job | None) -> int | None:
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
            return {"progress": 0.0, "eta_relative": 0.0, "state": {**IDLE_STATE, "queued": waiting},
                    "current_image": None, "textinfo": None, "jobs_ahead": ahead}
        report = job.progress
        # decoding the preview takes a VAE or TAESD pass: off the event loop, so other requests still answer
        preview = None if skip_current_image else await run_in_threadpool(preview_png, report)
        return {
            "progress": round(report.fraction, 4) if report else 0.0,
            "eta_relative": float(report.eta) if report and report.eta is not None else 0.0,
            "state": job_state(job, waiting),
            "current_image": preview,
            "textinfo": report.describe() if report else f"{job.kind}: starting (loading the model)",
            "jobs_ahead": ahead,
        }

    def control_running(action: str) -> dict[str, Any]:
        """Interrupt or skip every running job the API started (several run at once behind Ray)."""
        running = engine.queue.running_jobs()
        if not running:
            return {"done": False, "detail": "nothing is running"}
        mine = [job for job in running if is_api_owner(job.owner)]
        if not mine:
            return {"done": False, "detail": f"the running job came from the web UI; the API only {action}s "
                                             "jobs started through the API"}
        for job in mine:
            getattr(job.control, action)()
        return {"done": True, "job": mine[0].id, "jobs": [job.id for job in mine], "detail": f"{action} requested"}

    @router.post("/interrupt")
    async def interrupt():
        """Stop the running API job (within a step); a web UI job is left alone."""
        return control_running("interrupt")

    @router.post("/skip")
    async def skip():
        """End the current batch of the running API job; later batches still run."""
        return control_running("skip")
