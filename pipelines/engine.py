"""The engine facade: the one object the UI, the API and the CLI talk to.

It owns the registry (what is on disk) and the model manager (what is loaded), and turns
requests into saved images. It never imports gradio; the UI gets it injected.
"""

from __future__ import annotations

from .progress import JobControl, ProgressCallback
from .request import GenerationRequest, GenerationResult, UpscaleRequest
from .settings import EngineSettings, Paths


class Engine:
    def __init__(self, paths: Paths | None = None, settings: EngineSettings | None = None):
        raise NotImplementedError("being written")

    # --- what is on disk ---------------------------------------------------------------
    def list_checkpoints(self, refresh: bool = False) -> list:
        """CheckpointInfo for every checkpoint (name, path, size, mtime, family, short_hash)."""

    def default_checkpoint(self) -> str | None:
        """The server default checkpoint name (--ckpt, else the first listed), None if none."""

    def native_resolution(self, checkpoint: str | None) -> int:
        """The checkpoint's native image size in pixels (512 for SD 1.x)."""

    # --- what is loaded ------------------------------------------------------------------
    def load_checkpoint(self, name: str):
        """Load (or touch in the cache) a checkpoint; returns its CheckpointInfo."""

    def loaded_checkpoints(self) -> list[str]:
        """Names currently in the model cache, most recently used first."""

    def describe(self) -> dict:
        """Device, dtype and attention backend, for the UI footer."""

    # --- work ------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 control: JobControl | None = None) -> GenerationResult:
        """Run a txt2img/img2img/inpaint request; images are saved when request.save_images."""

    def upscale(self, request: UpscaleRequest) -> GenerationResult:
        """Resize an image with a named upscaler; saved to extras-images."""

    def sampler_names(self) -> tuple[str, ...]: ...
    def schedule_types(self) -> tuple[str, ...]: ...
    def upscaler_names(self) -> list[str]: ...
