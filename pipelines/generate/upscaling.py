"""The upscalers on offer and the two upscale jobs, once the engine has queued them.

- Extras: every image of an `UpscaleRequest` through the first upscaler, the second one blended
  in by its visibility, by a factor or to an exact size; saved with "Postprocess" parameters
  after the image's own generation parameters.
- SD upscale: an img2img request's image upscaled by `scale`, then img2img'd tile by tile
  (`hires.sd_upscale`) on the request's checkpoint, recorded like a generation.

`Upscaling` also answers which upscalers exist (`upscaler_choices`: Lanczos & co., then the upscaler
folder's models) and turns a name into an Upscaler, for these jobs and for hires fix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipelines.core import infotext
from pipelines.core.progress import JobControl, Progress
from pipelines.core.request import (
    LATENT_UPSCALE_MODES,
    GenerationRequest,
    GenerationResult,
    RequestError,
    UpscaleRequest,
)
from pipelines.generate import hires, lora, regions, tiling, tiny_decode, upscalers
from pipelines.generate.generation import VERSION, Generator, JobContext
from pipelines.generate.upscaler_choices import UpscalerChoices
from pipelines.models.registry import ModelFile, ModelRegistry


@dataclass(frozen=True)
class SdUpscaleOptions:
    """What SD upscale adds to its img2img request."""

    upscaler: str = "Lanczos"
    scale: float = 2.0
    overlap: int = 64  # pixels neighbouring tiles share (their seams are feathered)

    def checked(self) -> "SdUpscaleOptions":
        """These options as numbers, or a RequestError naming the one out of range."""
        if not 1.0 <= float(self.scale) <= 8.0:
            raise RequestError("scale", f"must be between 1 and 8, got {self.scale}")
        if not 0 <= int(self.overlap) <= 256:
            raise RequestError("overlap", f"must be between 0 and 256, got {self.overlap}")
        return SdUpscaleOptions(self.upscaler, float(self.scale), int(self.overlap))


def tiled(upscaler, tile: int, overlap: int, control: JobControl | None, on_tile=None):
    """A model upscaler set to run tile by tile (stopping when the job is skipped or
    interrupted); Lanczos & co. as they are."""
    if not isinstance(upscaler, upscalers.ModelUpscaler):
        return upscaler
    cancelled = (lambda: control.stop_current) if control is not None else None
    return upscaler.with_options(upscalers.TileOptions(tile=tile, overlap=overlap, on_tile=on_tile,
                                                       cancelled=cancelled))


class Upscaling(UpscalerChoices):
    """The upscaler folder's models beside the built-in ones, and the jobs that use them."""

    def __init__(self, registry: ModelRegistry, models: upscalers.UpscalerModels, generator: Generator):
        super().__init__(registry, models)
        self.generator = generator  # loads checkpoints and records images for SD upscale

    def hires_upscaler(self, name: str, control: JobControl | None = None):
        """The latent mode name itself, or the Upscaler object (RequestError naming hr_upscaler)."""
        if name in LATENT_UPSCALE_MODES:
            return name
        if name in ("None", ""):
            name = "Lanczos"
        try:
            found = upscalers.get_upscaler(name, self.available())
        except RequestError as exc:
            choices = ", ".join(self.hires_names())
            raise RequestError("hr_upscaler", f"unknown value {name!r}; choose one of: {choices}") from exc
        return tiled(found, upscalers.DEFAULT_TILE, upscalers.DEFAULT_OVERLAP, control)

    def chosen(self, request: UpscaleRequest) -> tuple:
        """(first, second or None) of an Extras request, as Upscaler objects (RequestError naming
        upscaler / upscaler_2 when unknown)."""
        available = self.available()
        first = upscalers.get_upscaler(request.upscaler, available)
        self.face_restorers(request)  # a visibility without a model fails before queueing
        second = None
        if request.upscaler_2 and request.upscaler_2_visibility > 0:
            try:
                second = upscalers.get_upscaler(request.upscaler_2, available)
            except RequestError as exc:
                raise RequestError("upscaler_2", exc.message) from None
        return first, second

    def face_restorers(self, request: UpscaleRequest) -> list:
        """The Extras' face restorers with their visibility (RequestError naming the visibility)."""
        if request.gfpgan_visibility <= 0 and request.codeformer_visibility <= 0:
            return []
        if self.generator.faces is None:
            raise RequestError("gfpgan_visibility", "face restoration is not available in this engine")
        return self.generator.faces.postprocess_restorers(request)

    def sd_upscaler(self, name: str):
        """SD upscale's upscaler by name (RequestError naming "upscaler")."""
        try:
            return upscalers.get_upscaler(name, self.available())
        except RequestError as exc:
            raise RequestError("upscaler", exc.message) from None

    # --- Extras ---------------------------------------------------------------------------------
    def extras(self, request: UpscaleRequest, chosen: tuple, context: JobContext) -> GenerationResult:
        """Upscale every image of the request with `chosen` = (first, second or None)."""
        first, second = chosen
        job, control = context.job, context.control
        target = (request.target_width, request.target_height) if request.target_width else None
        images = request.all_images
        restorers = self.face_restorers(request)
        result = GenerationResult()
        started = time.monotonic()

        for index, source in enumerate(images):
            if control.interrupted:
                break

            def on_tile(report: tiling.TileReport, index: int = index) -> None:
                context.track(Progress(step=report.done, steps=report.total, batch_index=index,
                                       batch_count=len(images), elapsed=time.monotonic() - started, eta=None))

            image = source if source.mode in ("RGB", "RGBA", "L") else source.convert("RGBA")
            try:
                upscaled = [upscalers.upscale_image(
                    image, tiled(u, request.tile_size, request.tile_overlap, control, on_tile),
                    scale=None if target else request.scale, target_size=target)
                    for u in ([first, second] if second is not None else [first])]
            except tiling.Cancelled:
                control.take_skip()
                continue
            output = upscaled[0]
            if second is not None:
                output = upscalers.blend(output, upscaled[1], request.upscaler_2_visibility)
            if restorers:  # after upscaling, as A1111's Extras
                output = self.generator.faces.postprocess(output, restorers)
            text = self.extras_infotext(request, source, first, second)
            output.info["parameters"] = text
            result.images.append(output)
            result.infotexts.append(text)
            result.paths.append(self.generator.save(output, "extras-images", text, request, result))
            if context.on_progress:  # (not kept on the job: its last tile report stays there)
                context.on_progress(Progress(step=1, steps=1, batch_index=index, batch_count=len(images),
                                             elapsed=time.monotonic() - started, eta=None))
        result.interrupted = job.control.interrupted
        return result

    @staticmethod
    def extras_infotext(request: UpscaleRequest, source, first, second) -> str:
        """The upscaled image's infotext: the source's generation parameters (as A1111 keeps
        them), then the "Postprocess" fields of this upscale."""
        params: dict = {}
        if request.target_width:
            params["Postprocess upscale to"] = f"{request.target_width}x{request.target_height}"
        else:
            params["Postprocess upscale by"] = f"{request.scale:g}"
        params["Postprocess upscaler"] = first.name
        if second is not None:
            params["Postprocess upscaler 2"] = second.name
            params["Postprocess upscaler 2 visibility"] = f"{request.upscaler_2_visibility:g}"
        if request.gfpgan_visibility > 0:  # A1111's keys
            params["GFPGAN visibility"] = f"{request.gfpgan_visibility:g}"
        if request.codeformer_visibility > 0:
            params["CodeFormer visibility"] = f"{request.codeformer_visibility:g}"
            params["CodeFormer weight"] = f"{request.codeformer_weight:g}"
        text = infotext.build_infotext("", "", params).strip()
        original = source.info.get("parameters")
        if isinstance(original, str) and original.strip():
            text = f"{original.strip()}, {text}"
        return text

    # --- SD upscale -----------------------------------------------------------------------------
    def sd_upscale(self, file: ModelFile, request: GenerationRequest, options: SdUpscaleOptions,
                   context: JobContext) -> GenerationResult:
        """Upscale the request's image by `options.scale`, then img2img it tile by tile (tiles of
        request.width x height). The request's seeds are resolved."""
        chosen = self.sd_upscaler(options.upscaler)
        control = context.control
        prepared = self.generator.prepare(file, request, {"SD upscale overlap": int(options.overlap),
                                                          "SD upscale upscaler": chosen.name})
        # Size is the picture made; the tile it was sampled in is said beside it
        tile_w, tile_h = request.size_for(prepared.components.spec.native_resolution)
        prepared.extra["SD upscale tile"] = f"{tile_w}x{tile_h}"
        result = prepared.result
        tiny = self.generator.tiny_decoder(request, prepared.components)  # refused before the upscale runs
        context = self.generator.with_previews(context, prepared.components)
        if request.refiner_checkpoint:  # said, not silently dropped: the tiles run on one model
            result.warnings.append("refiner_checkpoint: SD upscale runs every tile on the main checkpoint; "
                                   "the refiner was not used")
        tiles_note = regions.tiles_note(request)  # the layout's regions do not fit the tiles: said
        if tiles_note:
            result.warnings.append(tiles_note)
        try:
            upscaled = upscalers.upscale_image(
                request.init_image.convert("RGB"),
                tiled(chosen, upscalers.DEFAULT_TILE, upscalers.DEFAULT_OVERLAP, control), scale=options.scale)
        except tiling.Cancelled:
            result.interrupted = True
            return result
        components = prepared.components
        with prepared.model.lock, lora.applied(components, prepared.loras, result.warnings), \
                tiny_decode.applied([components], tiny):
            for image, seed, subseed in hires.sd_upscale(components, self.generator.placement.device, request,
                                                         upscaled, int(options.overlap), context.track, control,
                                                         embeddings=prepared.embeddings):
                params = infotext.generation_params(
                    request, seed=seed, subseed=subseed, width=image.width, height=image.height, model_name=file.stem,
                    model_hash=file.short_hash, version=VERSION, extra=prepared.extra)
                self.generator.record(result, request, image, (seed, subseed), params, "img2img-images")
        result.interrupted = control.interrupted
        return result
