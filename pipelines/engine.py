"""The engine facade: the one object the UI, the API and the CLI talk to (`EngineAPI`).

It owns the registry (what is on disk), the model manager (what is loaded) and the one job
queue, and wires them to the work: `generate.generation` runs a generation, `generate.upscaling`
the Extras and SD upscale jobs (made on a job's first use: `engine_work`). Every job passes
`_admit` (a hosted demo's limits) before it is queued, and so does every cell of a script before
it runs. On ZeroGPU each job's device work is lent the GPU as a request-only function. It never
imports gradio. It holds no per-user state: everything a job needs travels in its request.

With `remote` (Ray workers: `hosting.ray_serve.connect`) this is the front end: page, API, queue,
hashing and saving stay here; jobs and models run on the workers, whose saves it writes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from extensions.manager import ExtensionManager
from pipelines.core import samplers
from pipelines.core.control import ControlUnit, check_units
from pipelines.core.hosted_limits import SpaceLimits, check_job, limits_for, queue_bound
from pipelines.core.jobs import Job, JobQueue, WaitCallback
from pipelines.core.merge_request import MergeRequest, MergeResult
from pipelines.core.progress import JobControl, ProgressCallback
from pipelines.core.request import GenerationRequest, GenerationResult, RequestError, UpscaleRequest
from pipelines.core.settings import MODEL_KINDS, EngineSettings, Paths
from pipelines.engine_loading import CheckpointLoading, LoadDone, model_manager
from pipelines.engine_work import OnFirstUse, build_work, grid_folder, job_context, save_held, sd_upscale_options
from pipelines.generate import control_preprocess, embeddings, faces, ip_adapter, lora_files, upscalers
from pipelines.generate.upscaler_choices import UpscalerChoices
from pipelines.hosting import zerogpu
from pipelines.models import few_step
from pipelines.models.device import choose_placement
from pipelines.models.inspection import describe_checkpoint
from pipelines.models.merge import plan as plan_merge
from pipelines.models.merge import run as run_merge
from pipelines.models.module_pick import pick_modules
from pipelines.models.names import default_file
from pipelines.models.registry import ModelFile, ModelRegistry
from pipelines.models.stores import HashCache

if TYPE_CHECKING:  # names for types only: importing them imports diffusers & co. (see engine_work)
    from pipelines.generate.generation import JobContext
    from pipelines.generate.upscaling import SdUpscaleOptions

log = logging.getLogger(__name__)



class Engine:
    """What the UI, the API and extensions call (`pipelines.core.engine_api.EngineAPI`)."""

    def __init__(self, paths: Paths | None = None, settings: EngineSettings | None = None,
                 hosted_limits: SpaceLimits | None = None, remote=None, *, hold_saves: bool = False):
        """`hosted_limits`: a hosted demo's limits (default with `settings.hosted`: the device's).
        `remote`: workers that run the jobs (RayWorkers); `hold_saves`: a worker's engine (`remote_saves`)."""
        self.remote = remote
        self.paths = paths or Paths()
        self.settings = settings or EngineSettings()
        # first: on ZeroGPU this imports `spaces`, which must patch torch before CUDA is looked at
        self.gpu = zerogpu.GpuLease()
        self.placement = choose_placement(self.settings)
        if hosted_limits is None and self.settings.hosted:
            hosted_limits = limits_for(self.placement.device)
        self._hosted_limits = hosted_limits
        folders = {kind: self.paths.folder(kind) for kind in MODEL_KINDS}
        self.registry = ModelRegistry(folders, HashCache(Path(self.paths.data_dir) / "hashes.json"),
                                      describers={"checkpoints": describe_checkpoint,
                                                  "esrgan": upscalers.describe_model_file,
                                                  **{kind: faces.describe_face_file for kind in faces.FACE_KINDS}},
                                      fallbacks={kind: self.paths.fallback(kind) for kind in MODEL_KINDS},
                                      extra_folders={kind: self.paths.extra_folders(kind) for kind in MODEL_KINDS},
                                      remembered_kinds=("esrgan", *faces.FACE_KINDS))  # described via spandrel
        self.manager = model_manager(self.paths, self.settings, self.placement)
        max_waiting = self.settings.max_queue_size
        if hosted_limits is not None:  # the demo's own bound on waiting jobs; --max-queue-size can only lower it
            max_waiting = queue_bound(hosted_limits, max_waiting)
        # one fair queue for the UI, the API and scripts; with workers, as many jobs run as they take
        self.queue = JobQueue(max_waiting, slots=remote.slots if remote is not None else 1)
        self.upscaler_models = upscalers.UpscalerModels(self.placement.device)  # loaded ESRGAN & co.
        self.faces = faces.FaceRestoration(self.registry, folders, self.placement.device)  # GFPGAN & co.
        # extensions' hooks; none until the launcher calls extensions.discover(...)
        self.extensions = ExtensionManager(Path(self.paths.data_dir) / "extensions.json")
        self._work = OnFirstUse(lambda: build_work(self, hold_saves))  # generator & upscaling: engine_work
        self.loading = CheckpointLoading(self.registry, self.manager, prepare=self._work.get)
        self.upscaler_choices = UpscalerChoices(self.registry, self.upscaler_models)  # the page's lists
        # each job's device work as a request-only function: on ZeroGPU it runs in a worker holding the GPU
        self._lent_generation = self.gpu.lend(self._generate_request, self._generation_seconds)
        self._lent_upscale = self.gpu.lend(self._upscale_request, zerogpu.upscale_seconds)
        self._lent_sd_upscale = self.gpu.lend(self._sd_upscale_request, self._sd_upscale_seconds)

    generator = property(lambda self: self._work.get().generator)  # generation.Generator: runs jobs, saves
    upscaling = property(lambda self: self._work.get().upscaling)  # upscaling.Upscaling: Extras, SD upscale

    @property
    def hosted_limits(self) -> SpaceLimits | None:
        """The hosted demo's limits every job is held to; None when not hosted."""
        return self._hosted_limits

    @property
    def on_zero_gpu(self) -> bool:
        """Jobs borrow a ZeroGPU device per call (no step progress reaches the page)."""
        return self.gpu.active

    # --- what is on disk ---------------------------------------------------------------
    def list_checkpoints(self, refresh: bool = False) -> list[ModelFile]:
        return self.registry.list("checkpoints", refresh)

    def find_checkpoint(self, name: str) -> ModelFile | None:
        """A listed checkpoint by any name A1111 clients use (the registry's rules); None if unknown."""
        return self.registry.find("checkpoints", name)

    def default_checkpoint(self) -> str | None:
        wanted = Path(self.settings.default_checkpoint).name if self.settings.default_checkpoint else None
        file, missing = default_file(self.list_checkpoints(), wanted)
        if missing:
            log.warning("--ckpt %s is not in %s; using the first checkpoint instead",
                        self.settings.default_checkpoint, self.paths.folder("checkpoints"))
        return file.name if file else None

    def resolve_checkpoint(self, name: str | None) -> ModelFile:
        wanted = name or self.default_checkpoint()
        if wanted is None:
            folder = self.paths.folder("checkpoints")
            raise RequestError("checkpoint", f"no checkpoint found: put a .safetensors file in {folder}")
        file = self.find_checkpoint(wanted)
        if file is None:
            names = ", ".join(f.name for f in self.list_checkpoints()) or "none"
            raise RequestError("checkpoint", f"unknown checkpoint {wanted!r}; available: {names}")
        return file

    def native_resolution(self, checkpoint: str | None) -> int:
        try:
            return int(self.resolve_checkpoint(checkpoint).details.get("resolution", 512))
        except RequestError:
            return 512

    def list_vaes(self, refresh: bool = False) -> list[ModelFile]:
        """The files of the VAE folder (models/VAE, --vae-dir); `refresh` rescans it."""
        return self.registry.list("vae", refresh)

    def vae_choices(self) -> list[str]:
        """Values GenerationRequest.vae takes: "Automatic", "None" (baked in), then models/VAE names."""
        return self.registry.vae_choices()

    def text_encoder_names(self, refresh: bool = False) -> list[str]:
        """Values GenerationRequest.text_encoders takes: the files of models/text_encoder (--text-encoder-dir)."""
        return [f.name for f in self.registry.list("text_encoders", refresh)]

    def sampler_names(self) -> tuple[str, ...]:
        return samplers.SAMPLER_NAMES

    def schedule_types(self, sampler: str | None = None) -> tuple[str, ...]:
        """All schedule types, or those the given sampler supports."""
        return samplers.allowed_schedule_types(sampler) if sampler else samplers.SCHEDULE_TYPES

    def upscalers(self, refresh: bool = False) -> list:
        """Every upscaler: Lanczos & co., then the upscaler folder's models (`UpscalerChoices`)."""
        return self.upscaler_choices.available(refresh)

    def upscaler_names(self) -> list[str]:
        return self.upscaler_choices.names()

    def hires_upscaler_names(self) -> list[str]:
        """What hires fix offers: A1111's latent modes, then every upscaler."""
        return self.upscaler_choices.hires_names()

    def hires_upscaler(self, name: str, control: JobControl | None = None):
        """The latent mode name itself, or the Upscaler object (RequestError naming hr_upscaler)."""
        return self.upscaling.hires_upscaler(name, control)

    def lora_listing(self, refresh: bool = False) -> list[dict]:
        """The Lora folder for browsers and /sdapi/v1/loras (`lora_files.listing`)."""
        return lora_files.listing(self.registry.list("lora", refresh))

    def recommended_settings(self, checkpoint: str | None, prompt: str) -> dict | None:
        return few_step.recommend_for_job(self.registry, checkpoint, prompt)

    def face_restorers(self, refresh: bool = False) -> list[dict]:
        """Face restorers of models/GFPGAN and models/Codeformer: [{name, cmd_dir}] (A1111's listing)."""
        return self.faces.listing(refresh)

    def embedding_listing(self, refresh: bool = False) -> dict:
        """/sdapi/v1/embeddings: readable files of the embeddings folder as "loaded" (with
        their width and vector count), unreadable ones as "skipped"."""
        return embeddings.listing(self.registry.list("embeddings", refresh))

    # --- control models (ControlNet / T2I-Adapter) --------------------------------------
    @property
    def max_control_units(self) -> int:
        return self.settings.controlnet_max_units

    def control_models(self, refresh: bool = False) -> list[ModelFile]:
        return ip_adapter.control_model_list(self.registry, refresh)  # IP-Adapters too (image prompt units)

    def control_preprocessors(self) -> list[dict]:
        return control_preprocess.preprocessor_status(self.paths)

    def preprocess_control(self, unit: ControlUnit, width: int, height: int, init_image=None):
        return control_preprocess.prepare_control_image(unit, width, height, init_image, paths=self.paths,
                                                        device=str(self.placement.device))

    # --- what is loaded ------------------------------------------------------------------
    def load_checkpoint(self, name: str) -> ModelFile:
        file = self.resolve_checkpoint(name)
        if self.remote is None:  # (the workers load what their jobs need)
            self.loading.load(file)
        return file

    def preload(self, name: str | None = None, on_done: LoadDone | None = None,
                start: threading.Event | None = None) -> threading.Thread | None:
        """Load a checkpoint (default: the default one) in a background thread (listed as loading at
        once, read once `start` is set: `CheckpointLoading.in_background`); a job for it meanwhile
        waits for this load. `on_done(name, seconds, error)` is called at the end; a failure is not
        raised. Returns the thread, or None when there is no checkpoint to load (or workers load them)."""
        try:
            file = self.resolve_checkpoint(name)
        except RequestError:
            return None
        return self.loading.in_background(file, on_done, start) if self.remote is None else None

    def preload_when_idle(self, name: str) -> threading.Thread | None:
        """A checkpoint picked in the UI starts loading at once, as in A1111, but only while the
        server is idle (`CheckpointLoading.when_idle`). Otherwise the pick's first job loads it."""
        try:
            file = self.resolve_checkpoint(name)
        except RequestError:
            return None
        return self.loading.when_idle(file, self.queue) if self.remote is None else None

    def loading_checkpoints(self) -> list[str]:
        """Checkpoints being loaded right now (start-up preload or a job's first use)."""
        return list(dict.fromkeys(self.loading.loading))  # (a start-up load is listed twice while it reads)

    def unload_checkpoint(self, name: str) -> bool:
        return self.manager.unload(name)

    def loaded_checkpoints(self) -> list[str]:
        return self.manager.loaded_names()

    def describe(self) -> dict:
        return self.placement.describe()

    def runtime_flags(self) -> dict:
        """What the device/precision/attention/offload flags resolved to (A1111's names), for /sdapi/v1/cmd-flags."""
        p, d = self.placement, self.placement.describe()
        return {"device": d["device"], "precision": self.settings.precision, "dtype": d["dtype"],
                "vae_dtype": d["vae dtype"], "no_half": d["dtype"] == "float32",
                "no_half_vae": d["vae dtype"] == "float32", "attention": p.attention,
                "xformers": p.attention == "xformers", "opt_sdp_attention": p.attention == "sdpa",
                "medvram": p.offload == "medvram", "lowvram": p.offload == "lowvram", "compile": p.compile,
                "channels_last": p.channels_last, "vae_channels_last": p.vae_channels_last}

    def set_prediction_type(self, name: str, prediction: str | None) -> None:
        """The user's prediction-type override for a checkpoint (None: what the file says).
        KeyError for an unknown checkpoint, ValueError for an unknown prediction type."""
        self.registry.set_prediction_type(name, prediction)

    def hash_checkpoint(self, name: str) -> threading.Thread | None:
        """Start hashing a checkpoint in the background (None: hashed or being hashed); KeyError if unknown."""
        return self.registry.hash_in_background("checkpoints", name)

    def hash_progress(self, name: str) -> float | None:
        """0..1 while a checkpoint is being hashed, None otherwise."""
        return self.registry.hash_progress("checkpoints", name)

    def cache_memory(self) -> dict:
        """What the model cache holds (models, VAEs, bytes, budget, process RSS, VRAM on CUDA)."""
        return self.manager.memory()

    def current_job(self) -> Job | None:
        """The job running now (for progress reports), None when idle."""
        return self.queue.running()

    # --- work: each job is admitted, waits its turn in the queue, then runs ------------------
    def _admit(self, request: GenerationRequest | UpscaleRequest, sd_upscale_scale: float | None = None) -> None:
        """Where every job (and script cell) enters before it runs: RequestError naming the field over a limit."""
        if isinstance(request, GenerationRequest):
            check_units(request.control_units, self.max_control_units)
        if self._hosted_limits is None:
            return
        native = self._native_side(request) if isinstance(request, GenerationRequest) else 512
        check_job(request, self._hosted_limits, native, sd_upscale_scale)

    def _native_side(self, request: GenerationRequest) -> int:
        """The width/height a request that leaves one open gets: its checkpoint's native resolution."""
        if request.width is None or request.height is None:
            return self.native_resolution(request.checkpoint)
        return 512  # (unused: both are given)

    def _checked_file(self, request: GenerationRequest, warnings: list[str]) -> ModelFile:
        """A generation admitted (limits) and its names checked; its checkpoint file. What the job
        will not use of its pick of modules is said in `warnings`."""
        self._admit(request)
        file = self.resolve_checkpoint(request.checkpoint)  # bad names fail before queueing
        # a VAE or text encoder that is not listed or does not fit the family fails before queueing too
        pick = pick_modules(self.registry, file, request.text_encoders, request.vae)
        warnings.extend(w for w in pick.warnings if w not in warnings)
        if request.enable_hr:
            self.hires_upscaler(request.hr_upscaler)  # an unknown upscaler fails before queueing
        if request.restore_faces:
            self.faces.choose(request.face_restorer)  # no restorer / an unknown one fails before queueing
        return file

    def generate(self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None,
                 control: JobControl | None = None, owner: str | None = None,
                 on_wait: WaitCallback | None = None) -> GenerationResult:
        """Run a txt2img/img2img/inpaint request in its turn; images are saved when asked.
        `on_wait` hears how many jobs are ahead while it waits (see JobQueue.run); a full
        queue raises QueueFull, an interrupt while it waits JobCancelled, before anything runs.

        Extensions' hooks apply (a failing one is reported in result.warnings and disabled);
        an extension's script (e.g. an X/Y/Z plot) runs its generations inside this one job,
        each admitted like a job of its own."""
        hooks = self.extensions.job(request)
        request = hooks.before_request(request)
        file = self._checked_file(request, hooks.warnings)
        job = self.queue.new_job(request.mode, owner, control)
        with self.queue.run(job, on_wait):
            request = request.with_resolved_seeds()
            context = job_context(job, hooks, on_progress)

            def generate_cell(cell: GenerationRequest, on_progress=on_progress) -> GenerationResult:
                cell_file = self._checked_file(cell, hooks.warnings)
                return self._generate(cell_file, cell.with_resolved_seeds(), job_context(job, hooks, on_progress))

            def save_grid(image, text: str) -> str:
                return self.generator.save(image, grid_folder(request.mode), text, request,
                                           GenerationResult(warnings=hooks.warnings))

            result = hooks.run_script(request, control=job.control, on_progress=on_progress,
                                      generate=generate_cell, save=save_grid)
            if result is None:
                result = self._generate(file, request, context)
        result.warnings.extend(w for w in hooks.warnings if w not in result.warnings)
        return result

    def _generate(self, file: ModelFile, request: GenerationRequest, context: JobContext) -> GenerationResult:
        if self.remote is not None:  # a worker runs it (checking its file against this hash); saved here
            result = self.remote.generate(request, context, checkpoint=file.name,
                                          sha256=self.registry.ensure_hash(file))
            return save_held(self.generator, request, result)
        if self.gpu.active:  # ZeroGPU: only the request crosses to the worker holding the GPU
            if context.control.interrupted:  # stopped while waiting: spend no GPU quota on it
                return GenerationResult(request=request, interrupted=True)
            return self._lent_generation(request)
        return self._run_generation(file, request, context)

    def _run_generation(self, file: ModelFile, request: GenerationRequest, context: JobContext) -> GenerationResult:
        """The generation itself, in this process or in a ZeroGPU worker (one seam for both)."""
        return self.generator.run(file, request, context)

    def run_generation(self, request: GenerationRequest, context: JobContext | None = None) -> GenerationResult:
        """A checked, seed-resolved request run outside the queue (the caller holds the slot): what a
        worker runs. `context`: the job's handle and progress (Ray); None: a handle of its own (ZeroGPU)."""
        hooks = self.extensions.job(request)
        job = context.job if context is not None else self.queue.new_job(request.mode)
        context = job_context(job, hooks, context.on_progress if context is not None else None)
        result = self._run_generation(self.resolve_checkpoint(request.checkpoint), request, context)
        result.warnings.extend(w for w in hooks.warnings if w not in result.warnings)
        return result

    def _generate_request(self, request: GenerationRequest) -> GenerationResult:
        """What a ZeroGPU worker runs: no progress callback or interrupt reaches it."""
        return self.run_generation(request)

    def _generation_seconds(self, request: GenerationRequest) -> float:
        return zerogpu.generation_seconds(request, self._native_side(request))

    def upscale(self, request: UpscaleRequest, *, on_progress: ProgressCallback | None = None,
                control: JobControl | None = None, owner: str | None = None,
                on_wait: WaitCallback | None = None) -> GenerationResult:
        """Upscale every image of the request (Extras): the first upscaler, the second one
        blended in by its visibility, by a factor or to an exact size; saved with parameters."""
        self._admit(request)
        chosen = self.upscaling.chosen(request)  # bad names fail before queueing
        job = self.queue.new_job("extras", owner, control)
        with self.queue.run(job, on_wait):
            on_device = any(isinstance(u, upscalers.ModelUpscaler) for u in chosen)
            context = job_context(job, on_progress=on_progress)
            if self.remote is not None:  # a worker upscales; saved here
                return save_held(self.generator, request, self.remote.upscale(request, context))
            if self.gpu.active and on_device:  # Lanczos & co. need no GPU time
                return self._lent_upscale(request)
            return self.upscaling.extras(request, chosen, context)

    def run_upscale(self, request: UpscaleRequest, context: JobContext | None = None) -> GenerationResult:
        """An upscale from the request alone, outside the queue: what a worker runs (see run_generation)."""
        return self.upscaling.extras(request, self.upscaling.chosen(request),
                                     context or job_context(self.queue.new_job("extras")))

    def _upscale_request(self, request: UpscaleRequest) -> GenerationResult:
        return self.run_upscale(request)  # what a ZeroGPU worker runs

    def sd_upscale(self, request: GenerationRequest, *, upscaler: str = "Lanczos", scale: float = 2.0,
                   overlap: int = 64, on_progress: ProgressCallback | None = None,
                   control: JobControl | None = None, owner: str | None = None,
                   on_wait: WaitCallback | None = None) -> GenerationResult:
        """SD upscale: upscale the img2img request's image by `scale`, then img2img it tile by
        tile (tiles of request.width x height, `overlap` pixels shared, seams feathered)."""
        if request.mode != "img2img":
            raise RequestError("mode", "SD upscale works on an img2img request (an input image)")
        options = sd_upscale_options(upscaler, scale, overlap).checked()  # RequestError naming scale/overlap
        self._admit(request, sd_upscale_scale=options.scale)
        file = self.resolve_checkpoint(request.checkpoint)
        options = replace(options, upscaler=self.upscaling.sd_upscaler(upscaler).name)  # an unknown one fails here
        job = self.queue.new_job("img2img", owner, control)
        with self.queue.run(job, on_wait):
            request = request.with_resolved_seeds()
            context = job_context(job, on_progress=on_progress)
            if self.remote is not None:  # a worker runs it (checking its file against this hash); saved here
                result = self.remote.sd_upscale(request, options, context, checkpoint=file.name,
                                                sha256=self.registry.ensure_hash(file))
                return save_held(self.generator, request, result)
            if self.gpu.active:  # ZeroGPU: only the request crosses to the worker holding the GPU
                return self._lent_sd_upscale(request, options.upscaler, options.scale, options.overlap)
            return self.upscaling.sd_upscale(file, request, options, context)

    def run_sd_upscale(self, request: GenerationRequest, options: SdUpscaleOptions, context=None) -> GenerationResult:
        """SD upscale from the request and its checked options alone: what a worker runs (see run_generation)."""
        return self.upscaling.sd_upscale(self.resolve_checkpoint(request.checkpoint), request, options,
                                         context or job_context(self.queue.new_job("img2img")))

    def _sd_upscale_request(self, request: GenerationRequest, upscaler: str, scale: float, overlap: int):
        return self.run_sd_upscale(request, sd_upscale_options(upscaler, scale, overlap))  # what a ZeroGPU worker runs

    def _sd_upscale_seconds(self, request: GenerationRequest, upscaler: str, scale: float, overlap: int) -> float:
        return zerogpu.sd_upscale_seconds(request, scale, overlap, self._native_side(request))

    def merge_checkpoints(self, request: MergeRequest, *, on_progress: ProgressCallback | None = None,
                          control: JobControl | None = None, owner: str | None = None,
                          on_wait: WaitCallback | None = None) -> MergeResult:
        """A1111's Checkpoint Merger as a job: names, families, shapes and the output name are
        checked before queueing (RequestError naming the field); the new file is listed after."""
        if self._hosted_limits is not None:  # visitors of a public demo must not write model files
            raise RequestError("primary_model_name", "this hosted demo does not merge checkpoints")
        merge_plan = plan_merge(self.registry, request, self.paths.folder("checkpoints"))
        job = self.queue.new_job("merge", owner, control)
        with self.queue.run(job, on_wait):
            result = run_merge(merge_plan, self.registry, job.control, on_progress)
        if result.name:
            self.manager.unload(result.name)  # an overwritten file's old weights leave the cache
        return result
