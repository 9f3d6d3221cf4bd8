"""One Ray Serve replica of the workers: its own Engine (registry, model manager, generator) over
the same models folder as the front end, running one job at a time.

A job arrives as a `RemoteJob` through a streaming call: the replica yields ("started", run),
then ("progress", progress, preview) per step, then ("result", result, run). Its images are not
saved here: each carries its save order back (`remote_saves`), the front end writes it. Interrupt
and Skip reach the job through the front end's `JobFlags` actor (a thread here waits on it). The
checkpoint's file is checked against the front end's sha256 before it is used.

Ray's model multiplexing routes a job to a replica that already holds its checkpoint (and VAE):
the job names it (`multiplexed_model_id`), `holds` tells Serve's router which replica has it; a
job for a checkpoint no replica holds goes to the least loaded one.
Imported only with --ray (Ray Serve is an optional extra).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable

import ray
from ray import serve

from pipelines.core.progress import JobControl, Progress
from pipelines.core.request import GenerationResult, RequestError
from pipelines.core.settings import EngineSettings, Paths
from pipelines.engine import Engine
from pipelines.generate.generation import JobContext

MODELS_PER_REPLICA = 2  # checkpoints a replica tells the router it holds (its model manager has its own LRU)
LISTEN_SECONDS = 1.0  # one wait on the flags actor; a finished job's listener ends within this
PREVIEW_SECONDS = 1.0  # live previews sent back at most this often (each is a small image)
DEPLOYMENT_NAME = "Worker"


@dataclass(frozen=True)
class RemoteJob:
    """What crosses to a replica: the kind of job, its request, and the checkpoint the front end
    resolved with the sha256 it hashed (None for Extras, which use no checkpoint)."""

    kind: str  # "generate", "upscale", "sd_upscale"
    request: Any  # GenerationRequest (seeds resolved) or UpscaleRequest
    checkpoint: str | None = None
    sha256: str | None = None
    sd_upscale: Any = None  # SdUpscaleOptions, checked

    @property
    def model_id(self) -> str:
        """What Serve routes by: the checkpoint, and the VAE when one is chosen ("" for none)."""
        if not self.checkpoint:
            return ""
        vae = getattr(self.request, "vae", None)
        return self.checkpoint if vae in (None, "Automatic") else f"{self.checkpoint}|{vae}"


@dataclass(frozen=True)
class WorkerRun:
    """Where and how a job ran: the replica's process, and whether the job loaded its checkpoint."""

    pid: int
    checkpoint: str | None
    loaded: bool  # this job read the checkpoint into the replica's memory
    loads: int  # how often this replica has loaded it so far
    seconds: float = 0.0


class RemoteControl(JobControl):
    """The replica's side of a front-end job's JobControl: a thread waits on the flags actor and
    sets Interrupt and Skip here as they come (the job reads them each step, as any other)."""

    def __init__(self, flags, key: str):
        super().__init__()
        self.done = threading.Event()
        self.listener = threading.Thread(target=self.listen, args=(flags, key), daemon=True,
                                         name="sdui-job-flags")
        self.listener.start()

    def listen(self, flags, key: str) -> None:
        while not self.done.is_set():
            try:
                interrupted, skipped = ray.get(flags.wait.remote(key, LISTEN_SECONDS))
            except ray.exceptions.RayError:  # the front end is gone: the job runs out on its own
                return
            if skipped:
                self.skip()
            if interrupted:
                self.interrupt()
                return

    def close(self) -> None:
        self.done.set()


class ProgressRelay:
    """A job's progress reports sent back as events; a live preview at most every PREVIEW_SECONDS."""

    def __init__(self, emit: Callable[..., None]):
        self.emit = emit
        self.previewed = 0.0

    def __call__(self, progress: Progress) -> None:
        preview = None
        if progress.preview is not None and time.monotonic() - self.previewed >= PREVIEW_SECONDS:
            self.previewed = time.monotonic()
            preview = progress.preview()
        self.emit("progress", replace(progress, preview=None), preview)


class Worker:
    """The deployment's class: one per replica (see `deployment`)."""

    def __init__(self, paths: Paths, settings: EngineSettings):
        self.engine = Engine(paths, settings, hold_saves=True)
        self.pid = os.getpid()
        self.loads: Counter[str] = Counter()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def holds(self, model_id: str) -> str:
        """Marks `model_id` as held here, for the router; the checkpoint itself loads in the job."""
        return model_id

    async def run(self, job: RemoteJob, key: str, flags):
        """Run `job`, streaming its events (see the module's docstring)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.holds(model_id)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(*event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        work = loop.run_in_executor(None, self.execute, job, RemoteControl(flags, key), emit)
        work.add_done_callback(lambda _: events.put_nowait(None))
        while (event := await events.get()) is not None:
            yield event
        result, run = work.result()  # the job's own error, if it failed, goes to the caller
        yield ("result", result, run)

    def execute(self, job: RemoteJob, control: RemoteControl, emit) -> tuple[GenerationResult, WorkerRun]:
        started = time.monotonic()
        held = job.checkpoint is None or job.checkpoint in self.engine.loaded_checkpoints()
        emit("started", WorkerRun(self.pid, job.checkpoint, loaded=False, loads=self.loads[job.checkpoint]))
        try:
            if job.checkpoint is not None:
                self.check_file(job.checkpoint, job.sha256)
            context = JobContext(self.engine.queue.new_job(job.kind, control=control), on_progress=ProgressRelay(emit))
            if job.kind == "generate":
                result = self.engine.run_generation(job.request, context)
            elif job.kind == "upscale":
                result = self.engine.run_upscale(job.request, context)
            else:
                result = self.engine.run_sd_upscale(job.request, job.sd_upscale, context)
        finally:
            control.close()
        loaded = not held and job.checkpoint in self.engine.loaded_checkpoints()
        if loaded:
            self.loads[job.checkpoint] += 1
        return result, WorkerRun(self.pid, job.checkpoint, loaded, self.loads[job.checkpoint],
                                 time.monotonic() - started)

    def check_file(self, name: str, sha256: str | None) -> None:
        """The replica's file of checkpoint `name` must be the front end's (same sha256): every node
        needs the same --models-dir. RequestError naming the file otherwise."""
        file = self.engine.resolve_checkpoint(name)
        if sha256 and self.engine.registry.ensure_hash(file) != sha256:
            raise RequestError("checkpoint", f"{file.name} on this worker ({file.path}, sha256 {file.sha256[:10]}) "
                                             f"differs from the front end's (sha256 {sha256[:10]}); every node "
                                             "needs the same files (--models-dir on a shared volume)")


def deployment(options, paths: Paths, settings: EngineSettings):
    """The Serve application: the Worker deployment under `options` (ray_serve.RayOptions), bound to
    the folders and settings every replica builds its engine from."""
    scaling: dict[str, Any] = {"num_replicas": options.min_replicas}
    if options.max_replicas > options.min_replicas:  # Serve scales on queued jobs, one job per replica
        scaling = {"autoscaling_config": {"min_replicas": options.min_replicas,
                                          "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": 1}}
    worker = serve.deployment(Worker, name=DEPLOYMENT_NAME).options(
        max_ongoing_requests=1, **scaling,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica})
    return worker.bind(paths, settings)
