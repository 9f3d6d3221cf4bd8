"""The front end's side of the Ray Serve workers: `RayWorkers` sends each job to the deployment
(`ray_replica.Worker`), streams its progress back into the job, forwards Interrupt and Skip
(`JobFlags`), runs a job again once on another replica when its replica dies, and counts the live
replicas for the queue's slots. Imported only with --ray (Ray Serve is an optional extra).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import uuid
from dataclasses import replace

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.core.jobs import NoWorkers
from pipelines.core.progress import Progress
from pipelines.core.request import GenerationResult
from pipelines.generate.generation import JobContext
from pipelines.hosting.ray_replica import DEPLOYMENT_NAME, RemoteJob, WorkerRun

log = logging.getLogger(__name__)

RERUN_NOTICE = "worker died; ran again on another worker"
FORWARD_SECONDS = 0.01  # how often a running job's Interrupt/Skip is looked at here
STATUS_SECONDS = 0.5  # how often the live replicas are counted
HISTORY = 256  # WorkerRun records kept (tests, the load benchmark)
# what a replica that died (killed, node lost) looks like to the caller
WORKER_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@ray.remote(num_cpus=0)
class JobFlags:
    """Interrupt and Skip of the running remote jobs, by job key: set by the front end, awaited
    by the replica that runs the job (`ray_replica.RemoteControl`)."""

    def __init__(self) -> None:
        self.flags: dict[str, dict] = {}

    def entry(self, key: str) -> dict:
        return self.flags.setdefault(key, {"interrupt": False, "skips": 0, "changed": asyncio.Event()})

    async def interrupt(self, key: str) -> None:
        flags = self.entry(key)
        flags["interrupt"] = True
        flags["changed"].set()

    async def skip(self, key: str) -> None:
        flags = self.entry(key)
        flags["skips"] += 1
        flags["changed"].set()

    async def wait(self, key: str, timeout: float) -> tuple[bool, bool]:
        """(interrupted, skipped) once either is set, or after `timeout` seconds; a skip is taken."""
        flags = self.entry(key)
        if not flags["interrupt"] and not flags["skips"]:
            try:
                await asyncio.wait_for(flags["changed"].wait(), timeout)
            except asyncio.TimeoutError:
                pass
        flags["changed"].clear()
        skipped, flags["skips"] = flags["skips"] > 0, 0
        return flags["interrupt"], skipped

    async def forget(self, key: str) -> None:
        self.flags.pop(key, None)


class RayWorkers:
    """The workers as the Engine sees them (`Engine(remote=...)`)."""

    def __init__(self, handle, options):
        self.handle = handle  # the deployment's handle
        self.options = options  # ray_serve.RayOptions
        self.history: collections.deque[WorkerRun] = collections.deque(maxlen=HISTORY)
        self.running: dict[int, WorkerRun] = {}  # front-end job id -> the replica running it now
        # on this node (the head, for a front end there), so it lives as long as the front end
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.flags = JobFlags.options(scheduling_strategy=here).remote()
        self.live = 0
        self.closed = threading.Event()
        self.count_live()
        self.watcher = threading.Thread(target=self.watch, name="sdui-ray-replicas", daemon=True)
        self.watcher.start()

    # --- how many replicas run jobs ---------------------------------------------------------
    def count_live(self) -> int:
        try:
            app = serve.status().applications.get(self.options.app_name)
            states = app.deployments[DEPLOYMENT_NAME].replica_states if app else {}
            self.live = int(states.get("RUNNING", 0))
        except Exception as exc:  # noqa: BLE001 - the controller is unreachable: no workers until it answers
            log.warning("Ray Serve status failed: %s", exc)
            self.live = 0
        return self.live

    def watch(self) -> None:
        while not self.closed.wait(STATUS_SECONDS):
            self.count_live()

    def live_replicas(self) -> int:
        """Replicas running now (counted every STATUS_SECONDS)."""
        return self.live

    def slots(self) -> int:
        """Jobs the front end's queue runs at once: none without a live replica; one per live
        replica at a fixed size; the most replicas when autoscaling (Serve sees the waiting jobs
        and starts replicas for them)."""
        if self.live == 0:
            return 0
        return self.options.max_replicas if self.options.max_replicas > self.options.min_replicas else self.live

    # --- jobs ----------------------------------------------------------------------------------
    def generate(self, request, context: JobContext, *, checkpoint: str | None = None,
                 sha256: str | None = None) -> GenerationResult:
        """A seed-resolved generation on a worker; images come back with their saves held."""
        return self.run(RemoteJob("generate", request, checkpoint or request.checkpoint, sha256), context)

    def upscale(self, request, context: JobContext) -> GenerationResult:
        return self.run(RemoteJob("upscale", request), context)

    def sd_upscale(self, request, options, context: JobContext, *, checkpoint: str | None = None,
                   sha256: str | None = None) -> GenerationResult:
        return self.run(RemoteJob("sd_upscale", request, checkpoint or request.checkpoint, sha256,
                                  sd_upscale=options), context)

    def run(self, job: RemoteJob, context: JobContext) -> GenerationResult:
        """Run `job` on a replica; once more on another when that one dies (with a notice)."""
        key = uuid.uuid4().hex
        done = threading.Event()
        forwarder = threading.Thread(target=self.forward, args=(context.control, key, done), daemon=True,
                                     name="sdui-job-control")
        forwarder.start()
        try:
            try:
                return self.stream(job, key, context)
            except WORKER_DIED as exc:
                if context.control.interrupted:
                    return GenerationResult(request=job.request, interrupted=True,
                                            warnings=["worker died; the job was interrupted, so it did not run again"])
                if self.live == 0 and self.count_live() == 0:
                    raise NoWorkers() from exc
                log.warning("a worker died running job %s (%s); running it again", context.job.id, exc)
            result = self.stream(job, key, context)
            result.warnings.insert(0, RERUN_NOTICE)
            return result
        finally:
            done.set()
            self.running.pop(context.job.id, None)
            self.flags.forget.remote(key)

    def stream(self, job: RemoteJob, key: str, context: JobContext) -> GenerationResult:
        handle = self.handle.options(stream=True, multiplexed_model_id=job.model_id)
        preview, result = None, None
        try:
            for event in handle.run.remote(job, key, self.flags):  # to its end: the replica is free after
                if event[0] == "started":
                    self.running[context.job.id] = event[1]
                elif event[0] == "progress":
                    progress, image = event[1], event[2]
                    preview = image or preview
                    context.track(progress if preview is None else with_preview(progress, preview))
                elif event[0] == "result":
                    result, run = event[1], event[2]
                    self.history.append(run)
        except ray.exceptions.RayTaskError as exc:  # the job's own error, as the replica raised it
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception) and not isinstance(cause, WORKER_DIED):
                raise cause from None
            raise
        if result is None:
            raise ray.exceptions.ActorUnavailableError("the worker's stream ended without a result", None)
        return result

    def worker_of(self, job) -> WorkerRun | None:
        """The replica (process id) running the front end's `job` now; None when none does."""
        return self.running.get(job.id)

    def forward(self, control, key: str, done: threading.Event) -> None:
        """Interrupt and Skip of the front end's job to the flags actor, as soon as they are set."""
        while not done.wait(FORWARD_SECONDS):
            if control.interrupted:
                self.flags.interrupt.remote(key)
                return
            if control.take_skip():
                self.flags.skip.remote(key)

    def close(self) -> None:
        """Stop counting replicas; the Serve application keeps running in the cluster."""
        self.closed.set()


def with_preview(progress: Progress, image) -> Progress:
    """The replica's progress report with the last live preview it sent (made there, not here)."""
    return replace(progress, preview=lambda: image)


def connect(options, app) -> RayWorkers:
    """Join the cluster (`options.address`) and run the application `app` under options.app_name,
    unless it already runs there (another front end started it): then use it as it is."""
    if not ray.is_initialized():
        address = None if options.address == "local" else options.address
        ray.init(address=address, namespace="sdui")
    serve.start(proxy_location="Disabled")  # no HTTP proxy: the front end calls the deployment by handle
    if options.app_name in serve.status().applications:
        handle = serve.get_app_handle(options.app_name)
    else:
        handle = serve.run(app, name=options.app_name, route_prefix=None)
    return RayWorkers(handle, options)
