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
from pipelines.core import hires_info, infotext, module_choice, outputs, samplers, save_formats, user_settings
from pipelines.core.jobs import Job
from pipelines.core.progress import JobControl, Progress, ProgressCallback
from pipelines.core.request import GenerationRequest, GenerationResult, RequestError
from pipelines.core.settings import Paths
from pipelines.generate import (
    control_units,
    deep_cache,
    embeddings,
    flow_runner,
    flux_kontext,
    hires,
    ip_adapter,
    lora,
    outpaint,
    previews,
    regions,
    runner,
    seamless,
    tiny_decode,
    token_merging,
    upscalers,
)
from pipelines.models import memory, taesd
from pipelines.models.device import Placement
from pipelines.models.families import BY_NAME
from pipelines.models.manager import ModelManager
from pipelines.models.registry import ModelFile, ModelRegistry

log = logging.getLogger(__name__)

VERSION = "sdui-0.1.0"  # the infotext's "Version"
OUTPUT_FOLDERS = {"txt2img": "txt2img-images", "img2img": "img2img-images", "inpaint": "img2img-images"}


def grid_folder(mode: str) -> str:
    """Where a script's grid of a `mode` job is saved (A1111's txt2img-grids / img2img-grids)."""
    return OUTPUT_FOLDERS[mode].replace("images", "grids")


GRID_FOLDERS = frozenset(grid_folder(mode) for mode in OUTPUT_FOLDERS)  # skipped when grids are not saved


@dataclass(frozen=True)
class JobContext:
    """One running job's handles: its queue entry (progress, interrupt), its extensions' hooks
    (None for jobs that run none) and who hears its progress."""

    job: Job
    hooks: JobHooks | None = None
    on_progress: ProgressCallback | None = None
    previews: Callable[[Progress], Progress] | None = None  # the job's live previews (previews.JobPreviews)

    @property
    def control(self) -> JobControl:
        return self.job.control

    def track(self, progress: Progress) -> None:
        """A progress report: kept on the job (for /progress and late viewers) and passed on."""
        if self.previews is not None:
            progress = self.previews(progress)
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


@dataclass
class OtherModel:
    """A second checkpoint of a job (the refiner, hires fix's checkpoint), loaded under the request's
    choices (VAE, prediction type), with the textual inversions the prompts name bound to it."""

    file: ModelFile
    model: Any  # models.manager.LoadedModel
    components: Any
    embeddings: embeddings.EmbeddingSet

    @property
    def title(self) -> str:
        """How A1111's infotext names it ("Refiner", "Hires checkpoint"): "name [short hash]"."""
        return f"{self.file.stem} [{self.file.short_hash}]"

    def second(self, switch_at: float = 1.0) -> runner.SecondModel:
        return runner.SecondModel(self.components, self.embeddings, switch_at)


class Generator:
    """Runs generation jobs on the engine's registry, model cache and placement."""

    def __init__(self, registry: ModelRegistry, manager: ModelManager, placement: Placement, outdir: Path, *,
                 load: Callable[[ModelFile], Any], hires_upscaler: Callable[[str, JobControl | None], Any],
                 faces: Any = None, paths: Paths | None = None):
        self.registry = registry
        self.manager = manager
        self.placement = placement
        self.outdir = Path(outdir)
        self.load = load  # the engine's load: marks the checkpoint as loading and hashes it meanwhile
        self.hires_upscaler = hires_upscaler  # a latent mode name, or an Upscaler (RequestError when unknown)
        self.faces = faces  # faces.FaceRestoration: restore_faces (None: a RequestError when asked)
        self.paths = paths or Paths()  # the preprocessors' annotator folders
        # previews and fast decodes, in the U-Net's dtype: TAESD is the fast, approximate decode (a bf16 one on the
        # CPU: 0.16 s at 512x512 against 0.75 s in fp32), while the full VAE may stay fp32 for its fidelity
        self.tiny_vaes = taesd.TinyAutoencoders(placement.device, placement.dtype, placement.channels_last)
        self.previews = previews.LivePreviews(lambda: registry.list("vae_approx"),
                                              lambda: user_settings.settings_in(self.paths.data_dir).values(),
                                              self.tiny_vaes)

    # --- the model a job runs on ---------------------------------------------------------------
    def prepare(self, file: ModelFile, request: GenerationRequest, extra: dict | None = None) -> PreparedModel:
        """Load `file` and apply the request's choices: VAE, prediction type, LoRAs, embeddings.
        Unknown LoRAs are warnings in the result; generation goes on without them."""
        model = self.load(file, request.text_encoders, request.vae)  # the pick of modules: another cache entry
        result = GenerationResult(request=request)
        components, vae_name = self.with_choices(model.components, file, request.vae)
        # "Automatic" is written as the schedule it resolved to, as A1111 does
        extra = {"Schedule type": samplers.resolve_schedule_type(request.sampler, request.schedule_type),
                 **(extra or {})}
        if vae_name:
            extra["VAE"] = vae_name
        extra.update(module_choice.infotext_params(request.text_encoders))  # Forge's "Module 1: t5xxl_fp8_e4m3fn"
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

    def tiny_decoder(self, request: GenerationRequest, components):
        """The TAESD that decodes a job's images instead of the VAE (`request.tiny_vae_decode`), or None;
        RequestError naming the field when no file of models/VAE-approx fits the checkpoint's family."""
        family = components.spec.family
        return tiny_decode.prepare(request.tiny_vae_decode, self.registry.list("vae_approx"), self.tiny_vaes,
                                   family.name, family.label)

    def with_previews(self, context: JobContext, components) -> JobContext:
        """`context` whose progress reports carry the live previews the settings ask for."""
        family = components.spec.family
        return replace(context, previews=self.previews.for_job(family.name, context.control, family.label))

    # --- other checkpoints of a job: the refiner, hires fix's ---------------------------------
    def other_files(self, file: ModelFile, request: GenerationRequest) -> dict[str, ModelFile]:
        """The checkpoints the request switches to, by field (refiner_checkpoint, hr_checkpoint_name),
        checked before anything loads: RequestError naming the field for an unknown name, or for a
        model whose latents are unlike those of `file` (an SDXL refiner after an SD 1.x base). The
        job's own checkpoint and a refiner switching at 1.0 are left out: nothing runs on them (A1111)."""
        wanted = {"refiner_checkpoint": request.refiner_checkpoint,
                  "hr_checkpoint_name": request.hr_checkpoint_name if request.enable_hr else None}
        found = {}
        for field_name, name in wanted.items():
            if name is None:
                continue
            other = self.registry.find("checkpoints", name)
            if other is None:
                names = ", ".join(f.name for f in self.registry.list("checkpoints")) or "none"
                raise RequestError(field_name, f"unknown checkpoint {name!r}; available: {names}")
            ours, theirs = (BY_NAME.get(f.details.get("family_id")) for f in (file, other))
            if ours and theirs and ours.latent_scaling_factor != theirs.latent_scaling_factor:
                raise RequestError(field_name, f"{other.name} ({theirs.label}) works on latents unlike those of "
                                               f"{file.name} ({ours.label}); choose a checkpoint of the same kind")
            unused = field_name == "refiner_checkpoint" and request.refiner_switch_at >= 1
            if other.name != file.name and not unused:
                found[field_name] = other
        return found

    def load_others(self, files: dict[str, ModelFile], request: GenerationRequest,
                    prepared: PreparedModel) -> dict[str, OtherModel]:
        """Load the job's other checkpoints (after its own); their infotext keys go into `prepared.extra`."""
        others = {}
        prompts = [request.prompt, request.negative_prompt, request.hr_prompt, request.hr_negative_prompt]
        for field_name, other in files.items():
            model = self.load(other, request.text_encoders, request.vae)
            components, _ = self.with_choices(model.components, other, request.vae)
            found = embeddings.for_request(self.registry.list("embeddings"), components, prompts)
            others[field_name] = OtherModel(other, model, components, found)
        if "refiner_checkpoint" in others:
            prepared.extra.update({"Refiner": others["refiner_checkpoint"].title,
                                   "Refiner switch at": request.refiner_switch_at})
        if "hr_checkpoint_name" in others:
            prepared.extra["Hires checkpoint"] = others["hr_checkpoint_name"].title
        return others

    def crowded(self, names: list[str], warnings: list[str]) -> bool:
        """Whether the model cache's budget could not keep all of a job's checkpoints: loading one
        evicted another. The job still holds the evicted one (its lock too) until it ends, so that is
        safe; the job then runs in the low-memory mode (on a GPU each model waits in RAM while another
        runs) and the evicted one is freed afterwards. Said in `warnings`."""
        loaded = self.manager.loaded_names()
        evicted = [name for name in names if name not in loaded]
        if evicted:
            warnings.append(f"{', '.join(names)} do not fit the model memory budget together: ran in low-memory "
                            f"mode, and {', '.join(evicted)} left the model cache after the job")
        return bool(evicted)

    @contextlib.contextmanager
    def held(self, prepared: PreparedModel, others: list[OtherModel], request: GenerationRequest,
             plan: memory.MemoryPlan, crowded: bool):
        """What a job's models are held in while it runs, its own checkpoint and each other one: the
        model's lock (one job at a time on the same weights), the memory mode, the LoRAs (on another
        checkpoint only when it is of the same family: a LoRA's layers fit no other) and seamless tiling."""
        warnings = prepared.result.warnings
        family = prepared.components.spec.family
        models = [prepared, *others]
        with contextlib.ExitStack() as stack:
            for lock in {id(item.model.lock): item.model.lock for item in models}.values():
                stack.enter_context(lock)
            seen = set()
            for item in models:
                components = item.components
                if id(components.unet) in seen:  # the refiner is also the hires checkpoint
                    continue
                seen.add(id(components.unet))
                stack.enter_context(self.memory_mode(components, plan, crowded))
                if item is prepared or components.spec.family.name == family.name:
                    stack.enter_context(lora.applied(components, prepared.loras, warnings))
                else:
                    stack.enter_context(lora.applied(components, [], warnings))  # no set merged from another job
                    note = (f"LoRA: not applied to {item.file.name} ({components.spec.family.label}), "
                            f"only to the {family.label} checkpoint its layers fit")
                    if prepared.loras and note not in warnings:
                        warnings.append(note)
                stack.enter_context(seamless.applied(components, request.tiling, warnings))
            yield

    # --- one generation ------------------------------------------------------------------------
    def run(self, file: ModelFile, request: GenerationRequest, context: JobContext) -> GenerationResult:
        """txt2img/img2img/inpaint (with hires fix when asked) of a request whose seeds are resolved."""
        hooks, control = context.hooks, context.control
        request, outpainting = outpaint.as_inpaint(request)  # outpainting is inpainting on a grown canvas
        other_files = self.other_files(file, request)  # bad names fail before anything loads
        prepared = self.prepare(file, request, outpainting)
        components, result, extra = prepared.components, prepared.result, prepared.extra
        tiny = self.tiny_decoder(request, components)  # RequestError before the job runs when none fits
        context = self.with_previews(context, components)
        others = self.load_others(other_files, request, prepared)
        crowded = self.crowded([file.name, *(o.file.name for o in others.values())], result.warnings)
        refiner, hr_model = others.get("refiner_checkpoint"), others.get("hr_checkpoint_name")
        refiner = refiner.second(request.refiner_switch_at) if refiner is not None else None
        width, height = request.size_for(components.spec.native_resolution)
        flow = flow_runner.is_flow(components)  # a flow-matching transformer (SD 3, Flux): its own loop
        flow_options = {"shift": request.shift, "guidance": request.distilled_cfg_scale}
        if flow:
            flow_runner.check_request(request, others)
            extra.update(flow_runner.infotext_params(components, **flow_options))
            extra.update(flux_kontext.infotext_params(components, request))
        _, prompt_units = ip_adapter.split_units(request.control_units, self.registry)
        controls = control_units.prepare(request, registry=self.registry, load_control=self.control_loader(components),
                                         paths=self.paths, family=components.spec.family.name,
                                         size=(width, height), device=str(self.placement.device),
                                         skip={index for index, _ in prompt_units})
        image_prompts = ip_adapter.prepare_image_prompts(request, prompt_units, registry=self.registry,
                                                         unet=components.unet, device=self.placement.device)
        control_titles = {**controls.titles, **image_prompts.titles}
        for note in [*ip_adapter.unused_notes(request, prompt_units), *regions.unused_notes(request, flow),
                     *deep_cache.unused_notes(request, flow), *token_merging.unused_notes(request, flow)]:
            if note not in result.warnings:  # where the image prompts or the layout do not act: said
                result.warnings.append(note)
        hr_upscaler = self.hires_upscaler(request.hr_upscaler, control) if request.enable_hr else None
        restore_faces = self.face_restoration(request, extra)
        if request.enable_hr:
            extra.update(hires_info.infotext_params(request, width, height))
        size = request.hires_size(width, height) if request.enable_hr else (width, height)
        # OutOfMemory (a RequestError) here when not even the low-memory mode fits
        plan = max((memory.plan_job(c, self.placement, *size, request.batch_size, request.cfg_scale != 1.0)
                    for c in [components, *(o.components for o in others.values())]), key=lambda p: p.working_bytes)

        def batches(first_batch: int, prompt_steps):
            if flow:
                upscale = lambda image, size: upscalers.upscale_image(image, hr_upscaler, target_size=size)  # noqa: E731
                if request.enable_hr:
                    return flow_runner.run_hires(components, self.placement.device, request, upscale, context.track,
                                                 control, first_batch=first_batch, **flow_options)
                return flow_runner.run(components, self.placement.device, request, context.track, control,
                                       first_batch=first_batch, **flow_options)
            if request.enable_hr:
                return hires.run(components, self.placement.device, request,
                                 lambda image, size: upscalers.upscale_image(image, hr_upscaler, target_size=size),
                                 context.track, control, embeddings=prepared.embeddings, first_batch=first_batch,
                                 hr_model=hr_model.second() if hr_model is not None else None, refiner=refiner,
                                 controls=controls.loaded, image_prompts=prompt_steps)
            return runner.run(components, self.placement.device, request, context.track, control,
                              embeddings=prepared.embeddings, on_step=hooks.step_hook(request),
                              first_batch=first_batch, refiner=refiner, controls=controls.loaded,
                              image_prompts=prompt_steps)

        next_batch = 0
        try:
            while True:
                try:
                    with self.held(prepared, list(others.values()), request, plan, crowded), \
                            ip_adapter.applied(components.unet, image_prompts.prompts) as prompt_steps, \
                            tiny_decode.applied([components, *(o.components for o in others.values())], tiny):
                        for batch in batches(next_batch, prompt_steps):
                            for image, seed, subseed in zip(batch.images, batch.seeds, batch.subseeds):
                                image = restore_faces(image, result.warnings)
                                image, fields = hooks.after_image(image, request=request, seed=seed,
                                                                  subseed=subseed, index=len(result.images))
                                params = infotext.generation_params(
                                    request, seed=seed, subseed=subseed, width=width, height=height,
                                    model_name=file.stem, model_hash=file.short_hash, version=VERSION,
                                    extra={**extra, **fields}, control_titles=control_titles)
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

    def control_loader(self, components) -> Callable[[ModelFile], Any]:
        """Loads a control model for `components`' U-Net from the model cache (device and precision
        of the placement); an SDXL one splits its embedding input as that U-Net does."""
        width = components.unet.config.get("addition_time_embed_dim")
        return lambda file: self.manager.get_control(file.path, time_ids_width=width)

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
            restored, found = self.faces.restore(image, restorer, request.code_former_weight, warnings=warnings)
            if not found and "restore_faces: no face was found in the image" not in warnings:
                warnings.append("restore_faces: no face was found in the image")
            return restored
        return restore

    def memory_mode(self, components, plan: memory.MemoryPlan, crowded: bool = False):
        """The low-memory mode for a job planned (or retried) in it, or whose checkpoints do not fit
        the model cache together (`crowded`); else nothing changes."""
        if plan.low_memory or plan.retried or crowded:
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
        names = save_formats.pattern_values(request.prompt, request.negative_prompt, params,
                                            batch_number=len(result.images) - 1)
        result.paths.append(self.save(image, folder, text, request, result, seed=seed, name_values=names))

    def save(self, image, folder: str, text: str, request, result: GenerationResult, *,
             seed: int | None = None, name_values: dict[str, str] | None = None) -> str:
        """Save `image` under the outputs folder when the request asks for it, in the format and
        with the file name its save options say; the path, or "" (not asked, a grid while grids are
        not saved, or failed: then a warning in `result`, and the image still goes back)."""
        options = request.save_options
        if not request.save_images or (folder in GRID_FOLDERS and not options.save_grids):
            return ""
        try:
            return str(outputs.save_image(image, self.outdir, folder, seed=seed, infotext=text, options=options,
                                          name_values=name_values))
        except outputs.OutputError as exc:
            # the image still goes back to the user; the failure is said, not swallowed
            message = f"image not saved: {exc}"
            if message not in result.warnings:
                result.warnings.append(message)
            log.error(message)
            return ""
