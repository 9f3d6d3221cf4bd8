"""One generation job end to end, once the engine has queued it: load the checkpoint, apply the
user's VAE and prediction-type choices, resolve LoRAs and embeddings, plan memory (retrying once
in low-memory mode after running out), run txt2img/img2img/inpaint or hires fix, and record
every image with its infotext (saved when asked).

`Generator` holds the engine's parts a job needs (registry, model cache, placement, outputs
folder); the engine facade owns the queue and calls `Generator.run` in a job's turn. Its
helpers (`prepare`, `record`, `save`) serve the other jobs too (SD upscale, Extras, a script's
grid): one place decides how a job's model is chosen and how its images are kept.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from extensions.hooks import JobHooks
from pipelines.core import hires_info, infotext, outputs, samplers
from pipelines.core.jobs import Job
from pipelines.core.progress import JobControl, Progress, ProgressCallback
from pipelines.core.request import GenerationRequest, GenerationResult, RequestError
from pipelines.generate import embeddings, hires, lora, runner, seamless, upscalers
from pipelines.models import memory
from pipelines.models.device import Placement
from pipelines.models.manager import ModelManager
from pipelines.models.registry import ModelFile, ModelRegistry

log = logging.getLogger(__name__)

VERSION = "sdui-0.1.0"  # the infotext's "Version"
OUTPUT_FOLDERS = {"txt2img": "txt2img-images", "img2img": "img2img-images", "inpaint": "img2img-images"}


def grid_folder(mode: str) -> str:
    """Where a script's grid of a `mode` job is saved (A1111's txt2img-grids / img2img-grids)."""
    return OUTPUT_FOLDERS[mode].replace("images", "grids")


@dataclass(frozen=True)
class JobContext:
    """One running job's handles: its queue entry (progress, interrupt), its extensions' hooks
    (None for jobs that run none) and who hears its progress."""

    job: Job
    hooks: JobHooks | None = None
    on_progress: ProgressCallback | None = None

    @property
    def control(self) -> JobControl:
        return self.job.control

    def track(self, progress: Progress) -> None:
        """A progress report: kept on the job (for /progress and late viewers) and passed on."""
        self.job.progress = progress
        if self.on_progress:
            self.on_progress(progress)


@dataclass
class PreparedModel:
    """A checkpoint ready for one job under the request's choices, and what it adds to the infotext."""

    model: Any  # models.manager.LoadedModel: its lock serialises jobs on the same weights
    components: Any  # the pipeline parts, with the chosen VAE and prediction type
    loras: list
    embeddings: embeddings.EmbeddingSet
    extra: dict  # infotext fields beyond the request's own (schedule type, VAE, LoRA/TI hashes)
    result: GenerationResult = field(default_factory=GenerationResult)


class Generator:
    """Runs generation jobs on the engine's registry, model cache and placement."""

    def __init__(self, registry: ModelRegistry, manager: ModelManager, placement: Placement, outdir: Path, *,
                 load: Callable[[ModelFile], Any], hires_upscaler: Callable[[str, JobControl | None], Any],
                 faces: Any = None):
        self.registry = registry
        self.manager = manager
        self.placement = placement
        self.outdir = Path(outdir)
        self.load = load  # the engine's load: marks the checkpoint as loading and hashes it meanwhile
        self.hires_upscaler = hires_upscaler  # a latent mode name, or an Upscaler (RequestError when unknown)
        self.faces = faces  # faces.FaceRestoration: restore_faces (None: a RequestError when asked)

    # --- the model a job runs on ---------------------------------------------------------------
    def prepare(self, file: ModelFile, request: GenerationRequest, extra: dict | None = None) -> PreparedModel:
        """Load `file` and apply the request's choices: VAE, prediction type, LoRAs, embeddings.
        Unknown LoRAs are warnings in the result; generation goes on without them."""
        model = self.load(file)
        result = GenerationResult(request=request)
        components, vae_name = self.with_choices(model.components, file, request.vae)
        # "Automatic" is written as the schedule it resolved to, as A1111 does
        extra = {"Schedule type": samplers.resolve_schedule_type(request.sampler, request.schedule_type),
                 **(extra or {})}
        if vae_name:
            extra["VAE"] = vae_name
        loras = self.extra_networks(request, result, extra)
        found = self.embeddings(request, components, extra)
        return PreparedModel(model, components, loras, found, extra, result)

    def with_choices(self, components, file: ModelFile, vae_choice: str | None):
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

    def extra_networks(self, request: GenerationRequest, result: GenerationResult, extra: dict) -> list:
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

    def embeddings(self, request: GenerationRequest, components, extra: dict) -> embeddings.EmbeddingSet:
        """Textual inversions named in the prompts (models/embeddings) and their "TI hashes"."""
        found = embeddings.for_request(self.registry.list("embeddings"), components,
                                       [request.prompt, request.negative_prompt])
        extra.update(embeddings.infotext_params(found))
        return found

    # --- one generation ------------------------------------------------------------------------
    def run(self, file: ModelFile, request: GenerationRequest, context: JobContext) -> GenerationResult:
        """txt2img/img2img/inpaint (with hires fix when asked) of a request whose seeds are resolved."""
        hooks, control = context.hooks, context.control
        prepared = self.prepare(file, request)
        components, result, extra = prepared.components, prepared.result, prepared.extra
        width, height = request.size_for(components.spec.native_resolution)
        hr_upscaler = self.hires_upscaler(request.hr_upscaler, control) if request.enable_hr else None
        restore_faces = self.face_restoration(request, extra)
        if request.enable_hr:
            extra.update(hires_info.infotext_params(request, width, height))
        size = request.hires_size(width, height) if request.enable_hr else (width, height)
        # OutOfMemory (a RequestError) here when not even the low-memory mode fits
        plan = memory.plan_job(components, self.placement, *size, request.batch_size, request.cfg_scale != 1.0)

        def batches(first_batch: int):
            if request.enable_hr:
                return hires.run(components, self.placement.device, request,
                                 lambda image, size: upscalers.upscale_image(image, hr_upscaler, target_size=size),
                                 context.track, control, embeddings=prepared.embeddings, first_batch=first_batch)
            return runner.run(components, self.placement.device, request, context.track, control,
                              embeddings=prepared.embeddings, on_step=hooks.step_hook(request),
                              first_batch=first_batch)

        next_batch = 0
        try:
            while True:
                try:
                    with prepared.model.lock, self.memory_mode(components, plan), \
                            lora.applied(components, prepared.loras, result.warnings), \
                            seamless.applied(components, request.tiling, result.warnings):
                        for batch in batches(next_batch):
                            for image, seed, subseed in zip(batch.images, batch.seeds, batch.subseeds):
                                image = restore_faces(image, result.warnings)
                                image, fields = hooks.after_image(image, request=request, seed=seed,
                                                                  subseed=subseed, index=len(result.images))
                                params = infotext.generation_params(
                                    request, seed=seed, subseed=subseed, width=width, height=height,
                                    model_name=file.stem, model_hash=file.short_hash, version=VERSION,
                                    extra={**extra, **fields})
                                self.record(result, request, image, (seed, subseed), params,
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
        for note in [plan.note(), *control.notes]:
            if note and note not in result.warnings:
                result.warnings.append(note)
        result.interrupted = control.interrupted
        return result

    def face_restoration(self, request: GenerationRequest, extra: dict) -> Callable:
        """`restore(image, warnings) -> image` for this job: the request's face restorer on every
        image (its name in `extra` for the infotext; no face found: a warning), or no change."""
        if not request.restore_faces:
            return lambda image, warnings: image
        if self.faces is None:
            raise RequestError("restore_faces", "face restoration is not available in this engine")
        restorer = self.faces.choose(request.face_restorer)
        extra["Face restoration"] = restorer.name

        def restore(image, warnings: list) -> Any:
            restored, found = self.faces.restore(image, restorer, request.code_former_weight)
            if not found and "restore_faces: no face was found in the image" not in warnings:
                warnings.append("restore_faces: no face was found in the image")
            return restored
        return restore

    def memory_mode(self, components, plan: memory.MemoryPlan):
        """The low-memory mode for a job planned (or retried) in it; else nothing changes."""
        if plan.low_memory or plan.retried:
            return memory.low_memory(components, self.placement)
        return contextlib.nullcontext()

    # --- keeping the images ----------------------------------------------------------------------
    def record(self, result: GenerationResult, request: GenerationRequest, image, seeds: tuple[int, int],
               params: dict, folder: str) -> None:
        """Add one finished image to the result: its infotext in the PNG, the lists, the file.
        `seeds`: (seed, subseed) it was made with."""
        seed, subseed = seeds
        text = infotext.build_infotext(request.prompt, request.negative_prompt, params)
        image.info["parameters"] = text
        result.images.append(image)
        result.seeds.append(seed)
        result.subseeds.append(subseed)
        result.infotexts.append(text)
        result.paths.append(self.save(image, folder, text, request, result, seed=seed))

    def save(self, image, folder: str, text: str, request, result: GenerationResult, *,
             seed: int | None = None) -> str:
        """Save `image` under the outputs folder when the request asks for it; the path, or ""
        (not asked, or failed: then a warning in `result`, and the image still goes back)."""
        if not request.save_images:
            return ""
        try:
            return str(outputs.save_image(image, self.outdir, folder, seed=seed, infotext=text))
        except outputs.OutputError as exc:
            # the image still goes back to the user; the failure is said, not swallowed
            message = f"image not saved: {exc}"
            if message not in result.warnings:
                result.warnings.append(message)
            log.error(message)
            return ""
