"""ZeroGPU (Hugging Face Spaces): the GPU is lent per call to functions decorated with `spaces.GPU`.

On ZeroGPU hardware (`SPACES_ZERO_GPU=true`) the main process has no GPU. `spaces` patches torch
so the app sees one, and every call of a `spaces.GPU` function first asks Hugging Face for a GPU
for `duration` seconds (counted against the visitor's daily quota; too long is refused), then
runs the function in a forked worker process that holds the GPU: arguments and return value
cross the process boundary by pickle, and nothing the worker changes comes back but the
return value. So the engine lends the GPU to request-only entry points (`GpuLease.lend`), one
per job, and keeps its queue, checks and extension hooks in the main process.

Duration (seconds) asked for one job, clamped to [MIN_SECONDS, MAX_SECONDS]:

    OVERHEAD_SECONDS                                          model to the GPU, text encoders, VAE
    + SECOND_MODEL_SECONDS × other checkpoints                 the refiner, hires fix's checkpoint
    + images × STEP_SECONDS × Σ over passes (steps × megapixels)
    + images × UPSCALE_SECONDS × upscaled megapixels           hires upscaler, Extras, SD upscale
    + FACE_LOAD_SECONDS + images × FACE_SECONDS                restore_faces (Extras: per restorer)

where images = batch size × batch count, an img2img pass runs steps × denoising strength steps
(as diffusers does), hires fix adds its second pass at the hires size, and SD upscale runs one
img2img pass per tile. The refiner's steps are the last (1 - refiner_switch_at) of each pass's
steps, already counted there (its U-Net costs about what the base's does); what it adds is a
second model moved to the GPU and its own prompt encoding. STEP_SECONDS is SDXL's cost per UNet
step (CFG doubles the batch) on a ZeroGPU slice with a margin; SD 1.x is faster, so the estimate
errs long, which costs queue priority but not an aborted job.

Elsewhere (no `spaces` package, or not on ZeroGPU) `lend` returns the function unchanged and
`spaces` is never imported. Nothing here imports torch or gradio (`spaces` itself imports gradio,
only on ZeroGPU).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pipelines.core.hosted_limits import ZeroGPUError
from pipelines.core.request import HR_SAME_CHECKPOINT, GenerationRequest, UpscaleRequest, scaled_size
from pipelines.hosting.space import on_zero_gpu

log = logging.getLogger(__name__)

MIN_SECONDS = 15  # below this a lent GPU is mostly start-up
MAX_SECONDS = 120  # longer asks are refused for most visitors ("illegal duration")
OVERHEAD_SECONDS = 10.0
STEP_SECONDS = 0.25  # one UNet step on one megapixel of one image
UPSCALE_SECONDS = 2.0  # one megapixel of output of a neural upscaler (ESRGAN & co.)
SECOND_MODEL_SECONDS = 6.0  # another checkpoint to the GPU (an SDXL refiner is ~4.5 GB in fp16) and its prompts
FACE_LOAD_SECONDS = 3.0  # the face detector and restorer to the GPU, once per job
FACE_SECONDS = 1.0  # detecting, aligning and restoring the faces of one image (a few 512x512 passes)
MEGAPIXEL = 1_000_000


def as_zero_gpu_error(exc: BaseException) -> ZeroGPUError | None:
    """spaces' own failures as a ZeroGPUError; None for anything else.

    spaces raises gr.Error(message, title="ZeroGPU quota exceeded" / "ZeroGPU illegal duration" /
    "ZeroGPU queue timeout" / "ZeroGPU client error" / "ZeroGPU worker error" / ...) and a few
    RuntimeErrors whose text starts with "ZeroGPU". Recognised by those titles, not by type: the
    engine does not import gradio.
    """
    if isinstance(exc, ZeroGPUError):
        return exc
    title = getattr(exc, "title", None)
    if isinstance(title, str) and title.startswith("ZeroGPU"):
        message = str(getattr(exc, "message", "") or exc)
        if title == "ZeroGPU worker error" and message == "GPU task aborted":
            message += (" (the job ran past the GPU time it asked for, or its worker died; "
                        "try fewer steps, a smaller size or a smaller batch)")
        elif title == "ZeroGPU worker error":  # the message is just an exception class name
            message = f"the GPU worker failed to start or to send its result back ({message}; see the Space's logs)"
        return ZeroGPUError(title, message)
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith("ZeroGPU"):
        return ZeroGPUError("ZeroGPU error", text)
    return None


# --- how long a job holds the GPU ----------------------------------------------------------------

def clamp_seconds(seconds: float) -> int:
    return int(min(MAX_SECONDS, max(MIN_SECONDS, math.ceil(seconds))))


def _megapixels(width: int, height: int) -> float:
    return width * height / MEGAPIXEL


def _img2img_steps(steps: int, strength: float) -> int:
    return max(1, math.ceil(steps * strength))


def generation_seconds(request: GenerationRequest, native_resolution: int = 512) -> float:
    """Estimated GPU seconds for a txt2img / img2img / inpaint request (unclamped)."""
    width, height = request.size_for(native_resolution)
    steps = request.steps if request.mode == "txt2img" else _img2img_steps(request.steps,
                                                                           request.denoising_strength)
    step_work = steps * _megapixels(width, height)
    upscaled = 0.0
    if request.enable_hr:
        hr_width, hr_height = request.hires_size(width, height)
        hr_steps = _img2img_steps(request.hr_second_pass_steps or request.steps, request.hr_denoising_strength)
        step_work += hr_steps * _megapixels(hr_width, hr_height)
        upscaled = _megapixels(hr_width, hr_height)
    images = request.batch_size * request.batch_count
    return (OVERHEAD_SECONDS + SECOND_MODEL_SECONDS * other_checkpoints(request) + face_seconds(request, images)
            + images * (STEP_SECONDS * step_work + UPSCALE_SECONDS * upscaled))


def other_checkpoints(request: GenerationRequest) -> int:
    """How many checkpoints besides the job's own run: a refiner that takes over before the end,
    hires fix's own checkpoint (one, when it is the refiner too). A name that turns out to be the
    job's own checkpoint still counts: names are matched to files by the registry, not here,
    and the estimate may err long."""
    names = set()
    if request.refiner_checkpoint and request.refiner_switch_at < 1:
        names.add(request.refiner_checkpoint)
    if request.enable_hr and request.hr_checkpoint_name not in (None, HR_SAME_CHECKPOINT):
        names.add(request.hr_checkpoint_name)
    return len(names)


def face_seconds(request: GenerationRequest | UpscaleRequest, images: int) -> float:
    """Face restoration's share: the models to the GPU once per restorer, then a per-image cost."""
    if isinstance(request, UpscaleRequest):
        restorers = (request.gfpgan_visibility > 0) + (request.codeformer_visibility > 0)
    else:
        restorers = int(bool(request.restore_faces))
    return restorers * (FACE_LOAD_SECONDS + images * FACE_SECONDS)


def upscale_seconds(request: UpscaleRequest) -> float:
    """Estimated GPU seconds for an Extras upscale (every image, both upscalers; unclamped)."""
    passes = 2 if request.upscaler_2 and request.upscaler_2_visibility > 0 else 1
    output = 0.0
    for image in request.all_images:
        if request.target_width:
            output += _megapixels(request.target_width, request.target_height)
        else:
            output += _megapixels(image.width, image.height) * request.scale ** 2
    return (OVERHEAD_SECONDS + passes * UPSCALE_SECONDS * output
            + face_seconds(request, len(request.all_images)))


def _tiles(length: int, tile: int, overlap: int) -> int:
    if length <= tile:
        return 1
    return math.ceil((length - overlap) / max(8, tile - overlap))


def sd_upscale_seconds(request: GenerationRequest, scale: float, overlap: int,
                       native_resolution: int = 512) -> float:
    """Estimated GPU seconds for SD upscale: the upscale, then one img2img pass per tile."""
    image = request.init_image
    width, height = scaled_size(image.size, scale) if image else (0, 0)
    tile_w, tile_h = request.size_for(native_resolution)
    tiles = _tiles(width, tile_w, overlap) * _tiles(height, tile_h, overlap)
    step_work = tiles * _img2img_steps(request.steps, request.denoising_strength) * _megapixels(tile_w, tile_h)
    images = request.batch_size * request.batch_count
    return (OVERHEAD_SECONDS + UPSCALE_SECONDS * _megapixels(width, height) + images * STEP_SECONDS * step_work
            + face_seconds(request, images))


# --- lending the GPU -------------------------------------------------------------------------------

@dataclass
class _Returned:
    """What the worker sends back: the value, or the exception (spaces would reduce an exception
    to its class name; this keeps the message the user should read)."""

    value: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _portable(exc: BaseException) -> BaseException:
    """`exc` when it survives pickling (it must cross back from the worker), else a RuntimeError
    with the same text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _returning_errors(fn: Callable[..., Any]) -> Callable[..., _Returned]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> _Returned:
        try:
            return _Returned(value=fn(*args, **kwargs))
        except Exception as exc:
            log.exception("%s failed on the lent GPU", getattr(fn, "__name__", "job"))
            return _Returned(error=_portable(exc))

    return run


def import_spaces(environ: Mapping[str, str] | None = None) -> Any:
    """The `spaces` module on ZeroGPU (imported now: call this before anything touches CUDA),
    else None without importing it."""
    env = os.environ if environ is None else environ
    if not on_zero_gpu(env):
        return None
    if importlib.util.find_spec("spaces") is None:
        log.warning("SPACES_ZERO_GPU is set but the `spaces` package is not installed: "
                    "running without spaces.GPU (pip install spaces)")
        return None
    try:
        return importlib.import_module("spaces")
    except Exception as exc:  # e.g. SPACES_ZERO_DEVICE_API_URL missing, CUDA initialised first
        log.error("SPACES_ZERO_GPU is set but `spaces` could not be loaded (%s: %s): running without "
                  "spaces.GPU", type(exc).__name__, exc)
        return None


class GpuLease:
    """Lends the GPU to the engine's device work: on ZeroGPU through `spaces.GPU`, else not at all.

    Create it before torch touches CUDA: on ZeroGPU, importing `spaces` patches torch (the main
    process then sees a CUDA device, so the engine places models on "cuda"), and `spaces`
    refuses to load once CUDA is initialised.
    """

    def __init__(self, environ: Mapping[str, str] | None = None):
        self.spaces: Any = import_spaces(environ)

    @property
    def active(self) -> bool:
        """True on ZeroGPU: device work must go through the functions `lend` returns."""
        return self.spaces is not None

    def lend(self, fn: Callable[..., Any], seconds: Callable[..., float]) -> Callable[..., Any]:
        """`fn` as a `spaces.GPU` function asking for `seconds(*args)` (clamped) of GPU time.

        Its arguments and result must pickle. Its exceptions come back as they were raised;
        ZeroGPU's own refusals (quota, duration, no GPU) are raised as ZeroGPUError. Off
        ZeroGPU, `fn` itself.
        """
        if not self.active:
            return fn

        def duration(*args: Any, **kwargs: Any) -> int:
            asked = clamp_seconds(seconds(*args, **kwargs))
            log.info("%s: asking ZeroGPU for %d s", fn.__name__, asked)
            return asked

        lent = self.spaces.GPU(duration=duration)(_returning_errors(fn))

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                returned = lent(*args, **kwargs)
            except Exception as exc:
                zero = as_zero_gpu_error(exc)
                if zero is None:
                    raise
                log.warning("%s", zero)
                raise zero from None
            return returned.unwrap()

        return call
