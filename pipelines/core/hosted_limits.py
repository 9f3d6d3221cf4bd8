"""What a public hosted demo (a Hugging Face Space, `--space`) refuses, and how it says so.

`SpaceLimits` bound one request (steps, size, batch, upscale size) and the queue; the engine
holds every job to them where it enters (`Engine.hosted_limits`: a generation, each cell of a
script such as X/Y/Z plot, an Extras upscale, an SD upscale), and the UI shows them as slider
maxima. A refusal is a `RequestError` naming the field, raised before the job is queued.

`ZeroGPUError` is ZeroGPU's own refusal (quota, duration, no GPU free), which the UI and the
API tell apart from a bad request. Torch-free: the UI imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.request import GenerationRequest, RequestError, UpscaleRequest, scaled_size


@dataclass(frozen=True)
class SpaceLimits:
    """What one request may ask for on a hosted demo; the UI shows these as slider maxima."""

    hardware: str  # "cpu" | "gpu": what the limits were chosen for
    max_steps: int
    default_steps: int
    max_side: int  # width and height, pixels
    max_pixels: int  # width * height
    max_batch_size: int
    max_batch_count: int
    max_images: int  # batch size * batch count
    max_upscale_side: int  # upscaler output, and input, per side
    queue_max_size: int  # waiting jobs (UI and API, the engine's queue); more are refused with "Queue full"

    def summary(self) -> str:
        return (f"up to {self.max_steps} steps, {self.max_side}×{self.max_side} pixels, "
                f"batch size {self.max_batch_size} × batch count {self.max_batch_count} "
                f"({self.max_images} images a job), "
                f"upscales up to {self.max_upscale_side} pixels a side")


# A free CPU Space (2 vCPU, 16 GB): an SD 1.x image at 512×512 takes minutes, so the defaults
# keep one job to a few minutes and the queue short; a GPU Space can afford SDXL sizes.
CPU_LIMITS = SpaceLimits(hardware="cpu", max_steps=30, default_steps=15, max_side=768,
                         max_pixels=768 * 768, max_batch_size=1, max_batch_count=2, max_images=2,
                         max_upscale_side=2048, queue_max_size=10)
GPU_LIMITS = SpaceLimits(hardware="gpu", max_steps=50, default_steps=20, max_side=1024,
                         max_pixels=1024 * 1024, max_batch_size=4, max_batch_count=4, max_images=8,
                         max_upscale_side=4096, queue_max_size=20)



def limits_for(device: object) -> SpaceLimits:
    """The limits for a device ("cpu", "cuda", "cuda:0", "mps", or a torch.device)."""
    return CPU_LIMITS if str(device).split(":")[0] == "cpu" else GPU_LIMITS


def queue_bound(limits: SpaceLimits, max_waiting: int | None) -> int:
    """The demo's bound on waiting jobs: its own, or --max-queue-size where that is lower."""
    return min(limits.queue_max_size, max_waiting or limits.queue_max_size)


def over_limit(field: str, what: str, limits: SpaceLimits) -> RequestError:
    """The refusal of a request over the hosted limits, naming the field."""
    return RequestError(field, f"{what} on this hosted demo ({limits.hardware.upper()} Space; "
                               "run the app on your own machine for larger jobs)")


def check_generation(request: GenerationRequest, limits: SpaceLimits, native: int = 512) -> None:
    """Raise RequestError naming the first field over the hosted limits. `native`: the
    checkpoint's resolution, the size of a request that gives none."""
    if request.steps > limits.max_steps:
        raise over_limit("steps", f"at most {limits.max_steps} steps, got {request.steps}", limits)
    width, height = request.size_for(native)
    for name, value in (("width", width), ("height", height)):
        if value > limits.max_side:
            raise over_limit(name, f"at most {limits.max_side} pixels, got {value}", limits)
    check_pixels("width", width, height, limits)
    if request.batch_size > limits.max_batch_size:
        raise over_limit("batch_size", f"batch size at most {limits.max_batch_size}, got {request.batch_size}",
                         limits)
    if request.batch_count > limits.max_batch_count:
        raise over_limit("batch_count", f"batch count at most {limits.max_batch_count}, got {request.batch_count}",
                         limits)
    if request.images_total > limits.max_images:
        raise over_limit("batch_count", f"at most {limits.max_images} images per job, got {request.images_total}",
                         limits)
    if request.init_image is not None:
        check_input_side("init_image", request.init_image, limits)


def check_pixels(field: str, width: int, height: int, limits: SpaceLimits) -> None:
    """An image of width × height (generated, or SD upscaled) is at most `max_pixels` in all."""
    if width * height > limits.max_pixels:
        raise over_limit(field, f"at most {limits.max_pixels} pixels in all (width × height), got {width}×{height}",
                         limits)


def check_input_side(field: str, image, limits: SpaceLimits) -> None:
    """An input image (img2img, Extras, SD upscale) is at most `max_upscale_side` a side."""
    if max(image.size) > limits.max_upscale_side:
        raise over_limit(field, f"input images up to {limits.max_upscale_side} pixels a side, "
                                f"got {image.width}×{image.height}", limits)


def check_upscale(request: UpscaleRequest, limits: SpaceLimits) -> None:
    """An Extras upscale: every input image, and every output, at most `max_upscale_side` a side."""
    for image in request.all_images:
        check_input_side("image", image, limits)
        if request.target_width is not None:
            size = (request.target_width, request.target_height)
        else:
            size = scaled_size(image.size, request.scale)
        if max(size) > limits.max_upscale_side:
            field = "target_width" if request.target_width is not None else "scale"
            raise over_limit(field, f"upscales up to {limits.max_upscale_side} pixels a side, "
                                    f"this one would be {size[0]}×{size[1]}", limits)


def check_sd_upscale(request: GenerationRequest, scale: float, limits: SpaceLimits, native: int = 512) -> None:
    """SD upscale: the img2img request as a generation (steps, tile size, batch, input), and
    its output (input × scale) as the size of a generated image: at most `max_side` a side
    and `max_pixels` in all, since every output pixel is denoised like a generated one."""
    check_generation(request, limits, native)
    image = request.init_image
    if image is None:
        return
    width, height = scaled_size(image.size, scale)
    if max(width, height) > limits.max_side:
        raise over_limit("scale", f"SD upscale output at most {limits.max_side} pixels a side, "
                                  f"this one would be {width}×{height}", limits)
    check_pixels("scale", width, height, limits)


def check_job(request: GenerationRequest | UpscaleRequest, limits: SpaceLimits, native: int = 512,
              sd_upscale_scale: float | None = None) -> None:
    """The hosted limits of any job: an Extras upscale, an SD upscale (`sd_upscale_scale` given),
    or a generation (a whole job, or one cell of a script)."""
    if isinstance(request, UpscaleRequest):
        check_upscale(request, limits)
    elif sd_upscale_scale is not None:
        check_sd_upscale(request, sd_upscale_scale, limits, native)
    else:
        check_generation(request, limits, native)


ZERO_GPU_NOTE = ("ZeroGPU: each job borrows a GPU for the time its steps, size and batch need, from the "
                 "visitor's daily ZeroGPU quota (logged-in Hugging Face users get more); step progress and "
                 "Interrupt do not reach the GPU, the images arrive when the job ends.")


class ZeroGPUError(RuntimeError):
    """ZeroGPU refused or lost the job (quota, duration, no GPU free): not the request's fault."""

    def __init__(self, title: str, message: str):
        super().__init__(f"{title}: {message}")
        self.title = title
        self.message = message

    def __reduce__(self):  # keyword-free re-creation, so it pickles like the other engine errors
        return (type(self), (self.title, self.message))

    @property
    def quota(self) -> bool:
        """The visitor's (or the Space's) GPU quota is used up: try again later or log in."""
        return "quota" in self.title.lower() or "credits" in self.title.lower()
