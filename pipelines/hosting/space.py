"""Hosted mode (a public Hugging Face Space): detection, limits, persistent storage.

A Space runs `python launch.py` with no arguments and sets `SPACE_ID` (and `SYSTEM=spaces`)
in the environment; `--space` turns the same mode on anywhere, for trying it locally.

In hosted mode the engine is wrapped in `LimitedEngine`, so every entry point (UI, REST API)
meets the same limits on steps, size and batch before a job is queued, with a message that
names the field. The limits depend on the hardware: a free CPU Space (2 vCPU) gets small
ones, a GPU Space roomier ones. Nothing here imports torch or gradio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipelines.core.request import GenerationRequest, RequestError, UpscaleRequest

# Set by Hugging Face on every Space (https://huggingface.co/docs/hub/spaces-overview#helper-environment-variables)
SPACE_ENV = ("SPACE_ID", "SYSTEM")
PERSISTENT_ROOT = Path("/data")  # a Space's persistent storage, mounted when the owner adds it


def running_on_space(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Hugging Face Space: SPACE_ID is set, or SYSTEM=spaces."""
    env = os.environ if environ is None else environ
    return bool(env.get("SPACE_ID")) or env.get("SYSTEM") == "spaces"


def space_id(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("SPACE_ID") or None


def persistent_root(root: Path | None = None) -> Path | None:
    """The Space's persistent storage (/data) when it is mounted and writable, else None."""
    root = Path(root or PERSISTENT_ROOT)
    if root.is_dir() and os.access(root, os.W_OK | os.X_OK):
        return root
    return None


def space_paths(args: Any, root: Path | None = None) -> tuple[Path, Path]:
    """(outdir, data_dir) for a Space: --outdir/--data-dir first, then the persistent storage
    (/data) when mounted, then the repository's outputs/ and data/ as without a Space."""
    from pipelines.core.settings import REPO_ROOT

    storage = persistent_root(root)
    outdir = args.outdir or (storage / "outputs" if storage else REPO_ROOT / "outputs")
    data_dir = args.data_dir or (storage / "sdui" if storage else REPO_ROOT / "data")
    return Path(outdir), Path(data_dir)


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


def limits_for(device: str) -> SpaceLimits:
    """The limits for a device string ("cpu", "cuda", "cuda:0", "mps")."""
    return CPU_LIMITS if str(device).split(":")[0] == "cpu" else GPU_LIMITS


def _over(field: str, what: str, limits: SpaceLimits) -> RequestError:
    return RequestError(field, f"{what} on this hosted demo ({limits.hardware.upper()} Space; "
                               "run the app on your own machine for larger jobs)")


def check_generation(request: GenerationRequest, limits: SpaceLimits, native: int = 512) -> None:
    """Raise RequestError naming the first field over the hosted limits."""
    if request.steps > limits.max_steps:
        raise _over("steps", f"at most {limits.max_steps} steps, got {request.steps}", limits)
    width = request.width or native
    height = request.height or native
    for name, value in (("width", width), ("height", height)):
        if value > limits.max_side:
            raise _over(name, f"at most {limits.max_side} pixels, got {value}", limits)
    if width * height > limits.max_pixels:
        raise _over("width", f"at most {limits.max_pixels} pixels in all (width × height), got {width}×{height}",
                    limits)
    if request.batch_size > limits.max_batch_size:
        raise _over("batch_size", f"batch size at most {limits.max_batch_size}, got {request.batch_size}", limits)
    if request.batch_count > limits.max_batch_count:
        raise _over("batch_count", f"batch count at most {limits.max_batch_count}, got {request.batch_count}",
                    limits)
    if request.images_total > limits.max_images:
        raise _over("batch_count", f"at most {limits.max_images} images per job, got {request.images_total}",
                    limits)
    image = request.init_image
    if image is not None and max(image.size) > limits.max_upscale_side:
        raise _over("init_image", f"input images up to {limits.max_upscale_side} pixels a side, "
                                  f"got {image.width}×{image.height}", limits)


def check_upscale(request: UpscaleRequest, limits: SpaceLimits) -> None:
    image = request.image
    if max(image.size) > limits.max_upscale_side:
        raise _over("image", f"input images up to {limits.max_upscale_side} pixels a side, "
                             f"got {image.width}×{image.height}", limits)
    if request.target_width is not None:
        size = (request.target_width, request.target_height)
    else:
        size = (round(image.width * request.scale), round(image.height * request.scale))
    if max(size) > limits.max_upscale_side:
        field = "target_width" if request.target_width is not None else "scale"
        raise _over(field, f"upscales up to {limits.max_upscale_side} pixels a side, "
                           f"this one would be {size[0]}×{size[1]}", limits)


ZERO_GPU_NOTE = ("ZeroGPU: each job borrows a GPU for the time its steps, size and batch need, from the "
                 "visitor's daily ZeroGPU quota (logged-in Hugging Face users get more); step progress and "
                 "Interrupt do not reach the GPU, the images arrive when the job ends.")


def on_zero_gpu(environ: Mapping[str, str] | None = None) -> bool:
    """A ZeroGPU Space (the GPU is lent per call to `spaces.GPU` functions)."""
    env = os.environ if environ is None else environ
    return env.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


class LimitedEngine:
    """The engine as a hosted demo offers it: requests over `limits` fail before queueing.

    Everything else is the wrapped engine's (attribute access passes through), so the UI and
    the API take it wherever they take an Engine.
    """

    def __init__(self, engine: Any, limits: SpaceLimits):
        self._engine = engine
        self.limits = limits
        # the demo's bound on waiting jobs (--max-queue-size can only lower it): UI and API share it
        queue = getattr(engine, "queue", None)
        if queue is not None:
            queue.max_waiting = min(limits.queue_max_size, queue.max_waiting or limits.queue_max_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def wrapped(self) -> Any:
        return self._engine

    def generate(self, request: GenerationRequest, *args: Any, **kwargs: Any):
        native = 512
        if request.width is None or request.height is None:
            native = int(self._engine.native_resolution(request.checkpoint))
        check_generation(request, self.limits, native)
        return self._engine.generate(request, *args, **kwargs)

    def upscale(self, request: UpscaleRequest, *args: Any, **kwargs: Any):
        check_upscale(request, self.limits)
        return self._engine.upscale(request, *args, **kwargs)
