"""The engine facade: the one object the UI, the API and the CLI talk to.

It owns the registry (what is on disk) and the model manager (what is loaded), and turns
requests into saved images. It never imports gradio; the UI gets it injected. It holds
no per-user state: everything a job needs travels in its request.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import infotext, outputs, runner, samplers, upscalers
from .device import choose_placement
from .loading import CheckpointError, inspect_checkpoint, read_header, sniff_format
from .jobs import Job, JobQueue
from .manager import ModelManager
from .progress import JobControl, Progress, ProgressCallback
from .registry import HashCache, ModelFile, ModelRegistry, MODEL_KINDS
from .request import GenerationRequest, GenerationResult, RequestError, UpscaleRequest
from .settings import EngineSettings, Paths

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
        "metadata": {k: v for k, v in header.metadata.items() if len(v) < 2000},
    }


class Engine:
    def __init__(self, paths: Paths | None = None, settings: EngineSettings | None = None):
        self.paths = paths or Paths()
        self.settings = settings or EngineSettings()
        self.placement = choose_placement(self.settings)
        folders = {kind: self.paths.folder(kind) for kind in MODEL_KINDS}
        self.registry = ModelRegistry(folders, HashCache(Path(self.paths.data_dir) / "hashes.json"),
                                      describers={"checkpoints": describe_checkpoint})
        budget = int(self.settings.ram_budget_gb * GB) if self.settings.ram_budget_gb else None
        self.manager = ModelManager(self.placement, budget)
        self.queue = JobQueue()  # one fair queue for the UI, the API and scripts

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
        return usable[0].name if usable else (files[0].name if files else None)

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
        try:
            model = self.manager.get(file.name, file.path)
        except CheckpointError:
            raise
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file.name}: could not be loaded ({exc})") from exc
        self.registry.ensure_hash(file)  # the infotext's "Model hash"; cached after the first time
        return model

    def unload_checkpoint(self, name: str) -> bool:
        return self.manager.unload(name)

    def loaded_checkpoints(self) -> list[str]:
        return self.manager.loaded_names()

    def describe(self) -> dict:
        return self.placement.describe()

    # --- work ------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 control: JobControl | None = None, owner: str | None = None) -> GenerationResult:
        """Run a txt2img/img2img/inpaint request in its turn; images are saved when asked."""
        file = self.resolve_checkpoint(request.checkpoint)  # bad names fail before queueing
        try:
            self.registry.resolve_vae(file, request.vae)  # a bad VAE name fails before queueing too
        except LookupError as exc:
            raise RequestError("vae", str(exc)) from exc
        job = self.queue.new_job(request.mode, owner, control)
        with self.queue.run(job):
            return self._generate(file, request.with_resolved_seeds(), job, on_progress)

    def _generate(self, file: ModelFile, request: GenerationRequest, job: Job,
                  on_progress: ProgressCallback | None) -> GenerationResult:
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
        with model.lock:
            for batch in runner.run(components, self.placement.device, request, track, job.control):
                for image, seed, subseed in zip(batch.images, batch.seeds, batch.subseeds):
                    params = infotext.generation_params(
                        request, seed=seed, subseed=subseed, width=width, height=height,
                        model_name=file.stem, model_hash=file.short_hash, version=VERSION, extra=extra)
                    text = infotext.build_infotext(request.prompt, request.negative_prompt, params)
                    image.info["parameters"] = text
                    result.images.append(image)
                    result.seeds.append(seed)
                    result.subseeds.append(subseed)
                    result.infotexts.append(text)
                    result.paths.append(self._save(image, OUTPUT_FOLDERS[request.mode], seed, text, request,
                                                   result))
        result.interrupted = job.control.interrupted
        return result

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

    def upscale(self, request: UpscaleRequest, owner: str | None = None) -> GenerationResult:
        upscaler = upscalers.get_upscaler(request.upscaler)
        with self.queue.run(self.queue.new_job("extras", owner)):
            return self._upscale(request, upscaler)

    def _upscale(self, request: UpscaleRequest, upscaler) -> GenerationResult:
        target = (request.target_width, request.target_height) if request.target_width else None
        image = upscalers.upscale_image(request.image.convert("RGB"), upscaler,
                                        scale=None if target else request.scale, target_size=target)
        params = {"Postprocess upscaler": request.upscaler}
        if target:
            params["Postprocess upscale to"] = f"{target[0]}x{target[1]}"
        else:
            params["Postprocess upscale by"] = f"{request.scale:g}"
        text = infotext.build_infotext("", "", params).strip()
        image.info["parameters"] = text
        result = GenerationResult(images=[image], infotexts=[text])
        result.paths.append(self._save(image, "extras-images", None, text, request, result))
        return result

    def sampler_names(self) -> tuple[str, ...]:
        return samplers.SAMPLER_NAMES

    def schedule_types(self, sampler: str | None = None) -> tuple[str, ...]:
        """All schedule types, or those the given sampler supports."""
        return samplers.allowed_schedule_types(sampler) if sampler else samplers.SCHEDULE_TYPES

    def upscaler_names(self) -> list[str]:
        return upscalers.upscaler_names()
