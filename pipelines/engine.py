"""The engine facade: the one object the UI, the API and the CLI talk to.

It owns the registry (what is on disk) and the model manager (what is loaded), and turns
requests into saved images. It never imports gradio; the UI gets it injected. It holds
no per-user state: everything a job needs travels in its request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from extensions.manager import ExtensionManager
from pipelines.core import infotext, outputs, samplers
from pipelines.core.jobs import Job, JobQueue, WaitCallback
from pipelines.core.progress import JobControl, Progress, ProgressCallback
from pipelines.core.request import GenerationRequest, GenerationResult, RequestError, UpscaleRequest
from pipelines.core.settings import EngineSettings, Paths
from pipelines.generate import embeddings, hires, lora, runner, tiling, upscalers
from pipelines.hosting import zerogpu
from pipelines.models import memory
from pipelines.models.device import choose_placement
from pipelines.models.families import SDXL_REFINER
from pipelines.models.loading import CheckpointError, inspect_checkpoint, read_header, sniff_format
from pipelines.models.manager import ModelManager
from pipelines.models.registry import MODEL_KINDS, HashCache, ModelFile, ModelRegistry

log = logging.getLogger(__name__)

VERSION = "sdui-0.1.0"
OUTPUT_FOLDERS = {"txt2img": "txt2img-images", "img2img": "img2img-images", "inpaint": "img2img-images"}
GB = 1 << 30


def describe_checkpoint(path: Path) -> dict:
    """Cheap facts for the listing: safetensors headers only (a .ckpt is inspected when loaded)."""
    if sniff_format(path) != "safetensors":
        return {}
    header = read_header(path)
    spec = inspect_checkpoint(header)
    return {
        "family": spec.description,
        "resolution": spec.native_resolution,
        "prediction": spec.prediction_type,
        "demo": header.metadata.get("sdui.demo") == "true",  # the shipped demo model: the UI says so
        "metadata": {k: v for k, v in header.metadata.items() if len(v) < 2000},
    }


class Engine:
    def __init__(self, paths: Paths | None = None, settings: EngineSettings | None = None):
        self.paths = paths or Paths()
        self.settings = settings or EngineSettings()
        # first: on ZeroGPU this imports `spaces`, which must patch torch before CUDA is looked at
        self.gpu = zerogpu.GpuLease()
        self.placement = choose_placement(self.settings)
        folders = {kind: self.paths.folder(kind) for kind in MODEL_KINDS}
        self.registry = ModelRegistry(folders, HashCache(Path(self.paths.data_dir) / "hashes.json"),
                                      describers={"checkpoints": describe_checkpoint,
                                                  "esrgan": upscalers.describe_model_file},
                                      fallbacks={kind: self.paths.fallback(kind) for kind in MODEL_KINDS})
        budget = int(self.settings.ram_budget_gb * GB) if self.settings.ram_budget_gb else None
        self.manager = ModelManager(self.placement, budget)
        self.queue = JobQueue(self.settings.max_queue_size)  # one fair queue for the UI, the API and scripts
        self.upscaler_models = upscalers.UpscalerModels(self.placement.device)  # loaded ESRGAN & co.
        # extensions' hooks; none until the launcher calls extensions.discover(...)
        self.extensions = ExtensionManager(Path(self.paths.data_dir) / "extensions.json")
        # each job's device work as a request-only function: on ZeroGPU it borrows the GPU for
        # the estimated time and runs in a worker process (see pipelines/hosting/zerogpu.py)
        self._lent_generation = self.gpu.lend(self._generate_request, self._generation_seconds)
        self._lent_upscale = self.gpu.lend(self._upscale_request, zerogpu.upscale_seconds)
        self._lent_sd_upscale = self.gpu.lend(self._sd_upscale_request, self._sd_upscale_seconds)
        self._loading: list[str] = []  # checkpoints being read into memory now, for the UI

    # --- what is on disk ---------------------------------------------------------------
    def list_checkpoints(self, refresh: bool = False) -> list[ModelFile]:
        return self.registry.list("checkpoints", refresh)

    def default_checkpoint(self) -> str | None:
        files = self.list_checkpoints()
        if self.settings.default_checkpoint:
            wanted = self.registry.find("checkpoints", Path(self.settings.default_checkpoint).name)
            if wanted is not None:
                return wanted.name
            log.warning("--ckpt %s is not in %s; using the first checkpoint instead",
                        self.settings.default_checkpoint, self.paths.folder("checkpoints"))
        usable = [f for f in files if "error" not in f.details]
        # a general model first: an inpainting model or a refiner makes a poor txt2img default
        general = [f for f in usable if not f.details.get("inpainting")
                   and f.details.get("family_id") != SDXL_REFINER.name]
        first = (general or usable or files or [None])[0]
        return first.name if first else None

    def resolve_checkpoint(self, name: str | None) -> ModelFile:
        wanted = name or self.default_checkpoint()
        if wanted is None:
            folder = self.paths.folder("checkpoints")
            raise RequestError("checkpoint", f"no checkpoint found: put a .safetensors file in {folder}")
        file = self.registry.find("checkpoints", wanted)
        if file is None:
            names = ", ".join(f.name for f in self.list_checkpoints()) or "none"
            raise RequestError("checkpoint", f"unknown checkpoint {wanted!r}; available: {names}")
        return file

    def native_resolution(self, checkpoint: str | None) -> int:
        try:
            return int(self.resolve_checkpoint(checkpoint).details.get("resolution", 512))
        except RequestError:
            return 512

    # --- what is loaded ------------------------------------------------------------------
    def load_checkpoint(self, name: str) -> ModelFile:
        file = self.resolve_checkpoint(name)
        self._load(file)
        return file

    def _load(self, file: ModelFile):
        loading = file.name not in self.manager.loaded_names()
        hashing = None
        if loading:
            self._loading.append(file.name)
            # the infotext's "Model hash" (cached after the first time): hashed while the weights
            # load, as both mostly wait outside the GIL (first load of a 2 GB file: 1.5 s sooner)
            hashing = self.registry.hash_in_background("checkpoints", file.name)
        try:
            model = self.manager.get(file.name, file.path)
        except CheckpointError:
            raise
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file.name}: could not be loaded ({exc})") from exc
        finally:
            if loading:
                self._loading.remove(file.name)
        if hashing is not None:  # (a failed load does not wait for it: the error comes at once)
            hashing.join()
        self.registry.ensure_hash(file)  # sets file.sha256 (at once where the thread hashed it)
        return model

    def preload(self, name: str | None = None, on_done=None) -> threading.Thread | None:
        """Load a checkpoint (default: the default one) in a background thread, so the server
        answers while it loads. A job for it meanwhile waits for this load rather than loading
        it again (the manager loads a file once, under its lock). `on_done(name, seconds, error)`
        is called at the end; a failure is not raised here: the first job reports it too.
        Returns the thread, or None when there is no checkpoint to load."""
        try:
            file = self.resolve_checkpoint(name)
        except RequestError:
            return None

        def load() -> None:
            started, error = time.monotonic(), None
            try:
                self._load(file)
            except Exception as exc:  # noqa: BLE001 - said through on_done and the log
                log.error("preloading %s failed: %s", file.name, exc)
                error = exc
            if on_done is not None:
                on_done(file.name, time.monotonic() - started, error)

        thread = threading.Thread(target=load, name="sdui-preload", daemon=True)
        thread.start()
        return thread

    def preload_when_idle(self, name: str) -> threading.Thread | None:
        """A checkpoint picked in the UI starts loading at once, as in A1111, but only while
        no job runs or waits and nothing else loads: beside a job a load would slow it down
        and hold two models in RAM at once. Otherwise the pick's first job loads it."""
        if self.queue.running() is not None or self.queue.waiting() or self._loading:
            return None
        try:
            file = self.resolve_checkpoint(name)
        except RequestError:
            return None
        if file.name in self.manager.loaded_names():
            return None
        return self.preload(file.name)

    def loading_checkpoints(self) -> list[str]:
        """Checkpoints being loaded right now (start-up preload or a job's first use)."""
        return list(self._loading)

    def unload_checkpoint(self, name: str) -> bool:
        return self.manager.unload(name)

    def loaded_checkpoints(self) -> list[str]:
        return self.manager.loaded_names()

    def describe(self) -> dict:
        return self.placement.describe()

    def runtime_flags(self) -> dict:
        """What the device/precision/attention/offload flags resolved to (A1111's flag names
        where it has one), for /sdapi/v1/cmd-flags."""
        p, d = self.placement, self.placement.describe()
        return {"device": d["device"], "precision": self.settings.precision, "dtype": d["dtype"],
                "vae_dtype": d["vae dtype"], "no_half": d["dtype"] == "float32",
                "no_half_vae": d["vae dtype"] == "float32", "attention": p.attention,
                "xformers": p.attention == "xformers", "opt_sdp_attention": p.attention == "sdpa",
                "medvram": p.offload == "medvram", "lowvram": p.offload == "lowvram", "compile": p.compile,
                "channels_last": p.channels_last, "vae_channels_last": p.vae_channels_last}

    # --- work ------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 control: JobControl | None = None, owner: str | None = None,
                 on_wait: WaitCallback | None = None) -> GenerationResult:
        """Run a txt2img/img2img/inpaint request in its turn; images are saved when asked.
        `on_wait` hears how many jobs are ahead while it waits (see JobQueue.run); a full
        queue raises QueueFull, an interrupt while it waits JobCancelled, before anything runs.

        Extensions' hooks apply (a failing one is reported in result.warnings and disabled);
        an extension's script (e.g. an X/Y/Z plot) runs its generations inside this one job."""
        hooks = self.extensions.job(request)
        request = hooks.before_request(request)
        file = self._checked_file(request)
        job = self.queue.new_job(request.mode, owner, control)
        with self.queue.run(job, on_wait):
            request = request.with_resolved_seeds()
            result = hooks.run_script(
                request, control=job.control, on_progress=on_progress,
                generate=lambda cell, on_progress=on_progress: self._generate(
                    self._checked_file(cell), cell.with_resolved_seeds(), job, on_progress, hooks),
                save=lambda image, text: self._save(image, OUTPUT_FOLDERS[request.mode].replace("images", "grids"),
                                                    None, text, request, GenerationResult(warnings=hooks.warnings)))
            if result is None:
                result = self._generate(file, request, job, on_progress, hooks)
        result.warnings.extend(w for w in hooks.warnings if w not in result.warnings)
        return result

    def _checked_file(self, request: GenerationRequest) -> ModelFile:
        file = self.resolve_checkpoint(request.checkpoint)  # bad names fail before queueing
        try:
            self.registry.resolve_vae(file, request.vae)  # a bad VAE name fails before queueing too
        except LookupError as exc:
            raise RequestError("vae", str(exc)) from exc
        if request.enable_hr:
            self.hires_upscaler(request.hr_upscaler)  # an unknown upscaler fails before queueing
        return file

    def _generate(self, file: ModelFile, request: GenerationRequest, job: Job,
                  on_progress: ProgressCallback | None, hooks=None) -> GenerationResult:
        if self.gpu.active:  # ZeroGPU: only the request crosses to the worker holding the GPU
            if job.control.interrupted:  # stopped while waiting: spend no GPU quota on it
                return GenerationResult(request=request, interrupted=True)
            return self._lent_generation(request)
        return self._run_generation(file, request, job, on_progress, hooks)

    def _generate_request(self, request: GenerationRequest) -> GenerationResult:
        """One generation from the request alone (seeds resolved, checked): what a ZeroGPU worker
        runs. No progress callback or interrupt reaches it across the process boundary."""
        hooks = self.extensions.job(request)
        job = self.queue.new_job(request.mode)  # its own handle; the caller holds the queue slot
        result = self._run_generation(self.resolve_checkpoint(request.checkpoint), request, job, None, hooks)
        result.warnings.extend(w for w in hooks.warnings if w not in result.warnings)
        return result

    def _generation_seconds(self, request: GenerationRequest) -> float:
        native = 512
        if request.width is None or request.height is None:
            native = self.native_resolution(request.checkpoint)
        return zerogpu.generation_seconds(request, native)

    def _run_generation(self, file: ModelFile, request: GenerationRequest, job: Job,
                        on_progress: ProgressCallback | None, hooks=None) -> GenerationResult:
        hooks = hooks or self.extensions.job(request)
        model = self._load(file)
        result = GenerationResult(request=request)
        components, vae_name = self._with_choices(model.components, file, request.vae)
        width = request.width or components.spec.native_resolution
        height = request.height or components.spec.native_resolution

        def track(progress: Progress) -> None:
            job.progress = progress
            if on_progress:
                on_progress(progress)

        # "Automatic" is written as the schedule it resolved to, as A1111 does
        extra = {"Schedule type": samplers.resolve_schedule_type(request.sampler, request.schedule_type)}
        if vae_name:
            extra["VAE"] = vae_name
        loras = self._extra_networks(request, result, extra)
        tis = self._embeddings(request, components, extra)
        hr_upscaler = self.hires_upscaler(request.hr_upscaler, job.control) if request.enable_hr else None
        if request.enable_hr:
            extra.update(hires.infotext_params(request, width, height))
        size = request.hires_size(width, height) if request.enable_hr else (width, height)
        # OutOfMemory (a RequestError) here when not even the low-memory mode fits
        plan = memory.plan_job(components, self.placement, *size, request.batch_size, request.cfg_scale != 1.0)

        def batches(first_batch: int):
            if request.enable_hr:
                return hires.run(components, self.placement.device, request,
                                 lambda image, size: upscalers.upscale_image(image, hr_upscaler, target_size=size),
                                 track, job.control, embeddings=tis, first_batch=first_batch)
            return runner.run(components, self.placement.device, request, track, job.control, embeddings=tis,
                              on_step=hooks.step_hook(request), first_batch=first_batch)

        next_batch = 0
        try:
            while True:
                try:
                    with model.lock, self._memory_mode(components, plan), lora.applied(components, loras,
                                                                                       result.warnings):
                        for batch in batches(next_batch):
                            for image, seed, subseed in zip(batch.images, batch.seeds, batch.subseeds):
                                image, fields = hooks.after_image(image, request=request, seed=seed,
                                                                  subseed=subseed, index=len(result.images))
                                params = infotext.generation_params(
                                    request, seed=seed, subseed=subseed, width=width, height=height,
                                    model_name=file.stem, model_hash=file.short_hash, version=VERSION,
                                    extra={**extra, **fields})
                                self._record(result, request, image, seed, subseed, params,
                                             OUTPUT_FOLDERS[request.mode])
                            next_batch = batch.index + 1
                    break
                except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                    if not memory.is_out_of_memory(exc):
                        raise
                    log.warning("out of memory at %dx%d batch %d: %s", *size, request.batch_size, exc)
                    memory.release(self.placement.device)
                    if plan.low_memory or plan.retried:  # nothing lower to fall back to
                        raise memory.OutOfMemory(*size, request.batch_size) from None
                    plan = replace(plan, retried=True)  # once more from the failed batch, in low-memory mode
        finally:
            self.manager.after_job()
        result.memory = plan.describe()
        for note in [plan.note(), *job.control.notes]:
            if note and note not in result.warnings:
                result.warnings.append(note)
        result.interrupted = job.control.interrupted
        return result

    def _memory_mode(self, components, plan: memory.MemoryPlan):
        if plan.low_memory or plan.retried:
            return memory.low_memory(components, self.placement)
        return contextlib.nullcontext()

    def _extra_networks(self, request: GenerationRequest, result: GenerationResult, extra: dict) -> list:
        """The request's <lora:...> tags resolved to files (unknown names: a warning in the
        result, generation goes on) and their "Lora hashes" infotext field."""
        loras, warnings = lora.resolve(request.prompt, self.registry)
        if loras and self.placement.offload == "lowvram":
            # peft cannot add adapters to layers whose weights accelerate keeps off the module
            warnings.append("LoRA is not available with --lowvram (weights are offloaded layer by layer); "
                            "ignored. Use --medvram to combine offloading with LoRA.")
            loras = []
        result.warnings.extend(w for w in warnings if w not in result.warnings)
        extra.update(lora.infotext_params(loras))
        return loras

    def embedding_listing(self, refresh: bool = False) -> dict:
        """/sdapi/v1/embeddings: readable files of the embeddings folder as "loaded" (with
        their width and vector count), unreadable ones as "skipped"."""
        return embeddings.listing(self.registry.list("embeddings", refresh))

    def lora_listing(self, refresh: bool = False) -> list[dict]:
        """The Lora folder for browsers and /sdapi/v1/loras: name, alias, path, metadata and
        trigger words (kohya's ss_tag_frequency), what to write in a prompt."""
        out = []
        for f in self.registry.list("lora", refresh):
            meta = lora.read_metadata(Path(f.path))
            name = Path(f.name).stem
            out.append({"name": name, "alias": meta.get("ss_output_name", name), "path": str(f.path),
                        "metadata": {k: v for k, v in meta.items() if len(v) < 20000},
                        "trigger_words": lora.trigger_words(meta), "prompt": f"<lora:{name}:1>"})
        return out

    def _embeddings(self, request: GenerationRequest, components, extra: dict) -> embeddings.EmbeddingSet:
        """Textual inversions named in the prompts (models/embeddings) and their "TI hashes"."""
        found = embeddings.for_request(self.registry.list("embeddings"), components,
                                       [request.prompt, request.negative_prompt])
        extra.update(embeddings.infotext_params(found))
        return found

    def _with_choices(self, components, file: ModelFile, vae_choice: str | None):
        """The loaded components under the user's choices for this checkpoint: its prediction
        type override (no reload) and the VAE ("Automatic": a `<checkpoint>.vae.*` sidecar,
        else baked in; "None": baked in; or a models/VAE file). Returns (components, VAE name)."""
        if components.spec.prediction_source == "probe":  # let the listing show what loading found
            self.registry.record_probed_prediction(file, components.spec.prediction_type)
        override = self.registry.prediction_override(file.name)
        if override and override != components.spec.prediction_type:
            components = components.with_prediction(override, "user override")
        vae_path = self.registry.resolve_vae(file, vae_choice)
        if vae_path is None:
            return components, None
        scaling = components.spec.family.latent_scaling_factor
        vae = self.manager.get_vae(vae_path, scaling, components.spec.native_resolution)
        return components.with_vae(vae), vae_path.name

    def vae_choices(self) -> list[str]:
        """Values GenerationRequest.vae takes: "Automatic", "None" (baked in), then models/VAE names."""
        return self.registry.vae_choices()

    def cache_memory(self) -> dict:
        """What the model cache holds (models, VAEs, bytes, budget, process RSS, VRAM on CUDA)."""
        return self.manager.memory()

    def current_job(self) -> Job | None:
        """The job running now (for progress reports), None when idle."""
        return self.queue.running()

    def _record(self, result: GenerationResult, request: GenerationRequest, image, seed: int, subseed: int,
                params: dict, folder: str) -> None:
        """Add one finished image to the result: its infotext in the PNG, the lists, the file."""
        text = infotext.build_infotext(request.prompt, request.negative_prompt, params)
        image.info["parameters"] = text
        result.images.append(image)
        result.seeds.append(seed)
        result.subseeds.append(subseed)
        result.infotexts.append(text)
        result.paths.append(self._save(image, folder, seed, text, request, result))

    def _save(self, image, folder: str, seed: int | None, text: str, request, result: GenerationResult) -> str:
        if not request.save_images:
            return ""
        try:
            return str(outputs.save_image(image, Path(self.paths.outdir), folder, seed=seed, infotext=text))
        except outputs.OutputError as exc:
            # the image still goes back to the user; the failure is said, not swallowed
            message = f"image not saved: {exc}"
            if message not in result.warnings:
                result.warnings.append(message)
            log.error(message)
            return ""

    # --- upscaling ---------------------------------------------------------------------------
    def upscalers(self, refresh: bool = False) -> list:
        """Every upscaler: Lanczos/Nearest/Bicubic, then the models of the upscaler folder
        (`--esrgan-models-path`, default models/ESRGAN) with their native scale."""
        files = self.registry.list("esrgan", refresh)
        return [*upscalers.BUILTIN, *upscalers.model_upscalers(files, self.upscaler_models)]

    def upscaler_names(self) -> list[str]:
        return upscalers.upscaler_names(self.upscalers())

    def hires_upscaler_names(self) -> list[str]:
        """What hires fix offers: A1111's latent modes, then every upscaler."""
        return [*upscalers.LATENT_MODES, *self.upscaler_names()]

    def hires_upscaler(self, name: str, control: JobControl | None = None):
        """The latent mode name itself, or the Upscaler object (RequestError naming hr_upscaler)."""
        if name in upscalers.LATENT_MODES:
            return name
        if name in ("None", ""):
            name = "Lanczos"
        try:
            found = upscalers.get_upscaler(name, self.upscalers())
        except RequestError as exc:
            choices = ", ".join(self.hires_upscaler_names())
            raise RequestError("hr_upscaler", f"unknown value {name!r}; choose one of: {choices}") from exc
        return self._tiled(found, upscalers.DEFAULT_TILE, upscalers.DEFAULT_OVERLAP, control)

    def _tiled(self, upscaler, tile: int, overlap: int, control: JobControl | None, on_tile=None):
        if not isinstance(upscaler, upscalers.ModelUpscaler):
            return upscaler
        cancelled = (lambda: control.stop_current) if control is not None else None
        return upscaler.with_options(upscalers.TileOptions(tile=tile, overlap=overlap, on_tile=on_tile,
                                                           cancelled=cancelled))

    def upscale(self, request: UpscaleRequest, owner: str | None = None,
                on_progress: ProgressCallback | None = None, control: JobControl | None = None,
                on_wait: WaitCallback | None = None) -> GenerationResult:
        """Upscale every image of the request (Extras): the first upscaler, the second one
        blended in by its visibility, by a factor or to an exact size; saved with parameters."""
        first, second = self._chosen_upscalers(request)  # bad names fail before queueing
        job = self.queue.new_job("extras", owner, control)
        with self.queue.run(job, on_wait):
            on_device = any(isinstance(u, upscalers.ModelUpscaler) for u in (first, second))
            if self.gpu.active and on_device:  # Lanczos & co. need no GPU time
                return self._lent_upscale(request)
            return self._upscale(request, first, second, job, on_progress)

    def _chosen_upscalers(self, request: UpscaleRequest) -> tuple:
        """(first, second or None) of the request, as Upscaler objects."""
        available = self.upscalers()
        first = upscalers.get_upscaler(request.upscaler, available)
        second = None
        if request.upscaler_2 and request.upscaler_2_visibility > 0:
            try:
                second = upscalers.get_upscaler(request.upscaler_2, available)
            except RequestError as exc:
                raise RequestError("upscaler_2", exc.message) from None
        return first, second

    def _upscale_request(self, request: UpscaleRequest) -> GenerationResult:
        """An upscale from the request alone: what a ZeroGPU worker runs."""
        first, second = self._chosen_upscalers(request)
        return self._upscale(request, first, second, self.queue.new_job("extras"), None)

    def _upscale(self, request: UpscaleRequest, first, second, job: Job,
                 on_progress: ProgressCallback | None) -> GenerationResult:
        target = (request.target_width, request.target_height) if request.target_width else None
        images = request.all_images
        result = GenerationResult()
        started = time.monotonic()
        passes = 2 if second is not None else 1

        for index, source in enumerate(images):
            if job.control.interrupted:
                break

            def on_tile(report: tiling.TileReport, index: int = index) -> None:
                progress = Progress(step=report.done, steps=report.total, batch_index=index,
                                    batch_count=len(images), elapsed=time.monotonic() - started, eta=None)
                job.progress = progress
                if on_progress:
                    on_progress(progress)

            image = source if source.mode in ("RGB", "RGBA", "L") else source.convert("RGBA")
            try:
                outputs_ = [upscalers.upscale_image(
                    image, self._tiled(u, request.tile_size, request.tile_overlap, job.control, on_tile),
                    scale=None if target else request.scale, target_size=target)
                    for u in ([first, second] if second is not None else [first])]
            except tiling.Cancelled:
                job.control.take_skip()
                continue
            output = outputs_[0]
            if passes == 2:
                output = upscalers.blend(output, outputs_[1], request.upscaler_2_visibility)
            params: dict = {}
            if target:
                params["Postprocess upscale to"] = f"{target[0]}x{target[1]}"
            else:
                params["Postprocess upscale by"] = f"{request.scale:g}"
            params["Postprocess upscaler"] = first.name
            if second is not None:
                params["Postprocess upscaler 2"] = second.name
                params["Postprocess upscaler 2 visibility"] = f"{request.upscaler_2_visibility:g}"
            text = infotext.build_infotext("", "", params).strip()
            original = source.info.get("parameters")
            if isinstance(original, str) and original.strip():  # A1111 keeps the generation parameters
                text = f"{original.strip()}, {text}"
            output.info["parameters"] = text
            result.images.append(output)
            result.infotexts.append(text)
            result.paths.append(self._save(output, "extras-images", None, text, request, result))
            if on_progress:
                on_progress(Progress(step=1, steps=1, batch_index=index, batch_count=len(images),
                                     elapsed=time.monotonic() - started, eta=None))
        result.interrupted = job.control.interrupted
        return result

    def sd_upscale(self, request: GenerationRequest, upscaler: str = "Lanczos", scale: float = 2.0,
                   overlap: int = 64, on_progress: ProgressCallback | None = None,
                   control: JobControl | None = None, owner: str | None = None,
                   on_wait: WaitCallback | None = None) -> GenerationResult:
        """SD upscale: upscale the img2img request's image by `scale`, then img2img it tile by
        tile (tiles of request.width x height, `overlap` pixels shared, seams feathered)."""
        if request.mode != "img2img":
            raise RequestError("mode", "SD upscale works on an img2img request (an input image)")
        if not 1.0 <= float(scale) <= 8.0:
            raise RequestError("scale", f"must be between 1 and 8, got {scale}")
        if not 0 <= int(overlap) <= 256:
            raise RequestError("overlap", f"must be between 0 and 256, got {overlap}")
        file = self.resolve_checkpoint(request.checkpoint)
        try:
            chosen = upscalers.get_upscaler(upscaler, self.upscalers())
        except RequestError as exc:
            raise RequestError("upscaler", exc.message) from None
        job = self.queue.new_job("img2img", owner, control)
        with self.queue.run(job, on_wait):
            request = request.with_resolved_seeds()
            if self.gpu.active:  # ZeroGPU: only the request crosses to the worker holding the GPU
                return self._lent_sd_upscale(request, chosen.name, float(scale), int(overlap))
            return self._sd_upscale(file, request, chosen, scale, overlap, job, on_progress)

    def _sd_upscale_request(self, request: GenerationRequest, upscaler: str, scale: float,
                            overlap: int) -> GenerationResult:
        """SD upscale from the request and its options alone: what a ZeroGPU worker runs."""
        chosen = upscalers.get_upscaler(upscaler, self.upscalers())
        return self._sd_upscale(self.resolve_checkpoint(request.checkpoint), request, chosen, scale, overlap,
                                self.queue.new_job("img2img"), None)

    def _sd_upscale_seconds(self, request: GenerationRequest, upscaler: str, scale: float, overlap: int) -> float:
        return zerogpu.sd_upscale_seconds(request, scale, overlap, self.native_resolution(request.checkpoint))

    def _sd_upscale(self, file: ModelFile, request: GenerationRequest, chosen, scale: float, overlap: int,
                    job: Job, on_progress: ProgressCallback | None) -> GenerationResult:
        model = self._load(file)
        components, vae_name = self._with_choices(model.components, file, request.vae)
        result = GenerationResult(request=request)
        try:
            upscaled = upscalers.upscale_image(request.init_image.convert("RGB"),
                                               self._tiled(chosen, upscalers.DEFAULT_TILE,
                                                           upscalers.DEFAULT_OVERLAP, job.control), scale=scale)
        except tiling.Cancelled:
            result.interrupted = True
            return result
        extra = {"Schedule type": samplers.resolve_schedule_type(request.sampler, request.schedule_type),
                 "SD upscale overlap": int(overlap), "SD upscale upscaler": chosen.name}
        if vae_name:
            extra["VAE"] = vae_name
        loras = self._extra_networks(request, result, extra)
        tis = self._embeddings(request, components, extra)

        def track(progress: Progress) -> None:
            job.progress = progress
            if on_progress:
                on_progress(progress)

        with model.lock, lora.applied(components, loras, result.warnings):
            for image, seed, subseed in hires.sd_upscale(components, self.placement.device, request, upscaled,
                                                         int(overlap), track, job.control, embeddings=tis):
                params = infotext.generation_params(
                    request, seed=seed, subseed=subseed, width=request.width or image.width,
                    height=request.height or image.height, model_name=file.stem,
                    model_hash=file.short_hash, version=VERSION, extra=extra)
                self._record(result, request, image, seed, subseed, params, "img2img-images")
        result.interrupted = job.control.interrupted
        return result

    def sampler_names(self) -> tuple[str, ...]:
        return samplers.SAMPLER_NAMES

    def schedule_types(self, sampler: str | None = None) -> tuple[str, ...]:
        """All schedule types, or those the given sampler supports."""
        return samplers.allowed_schedule_types(sampler) if sampler else samplers.SCHEDULE_TYPES

