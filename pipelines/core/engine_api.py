"""EngineAPI: everything the UI, the REST API and extensions may call on the engine.

`pipelines.engine.Engine` implements it; so do the UI tests' fake engine and anything that
stands in for the engine (a remote worker, a hosted front end). `tests/test_architecture.py`
holds each of them to this protocol, method by method, so a change here that one of them
misses fails a test instead of a page.

It lives in `core` (torch-free) so the UI can name it without importing torch. What a caller
gets back is described by the small protocols below (`ModelFileInfo`) or by core types.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from PIL import Image

from pipelines.core.control import ControlUnit
from pipelines.core.hosted_limits import SpaceLimits
from pipelines.core.jobs import Job, JobQueue, WaitCallback
from pipelines.core.merge_request import MergeRequest, MergeResult
from pipelines.core.progress import JobControl, ProgressCallback
from pipelines.core.request import GenerationRequest, GenerationResult, UpscaleRequest
from pipelines.core.settings import EngineSettings, Paths

# `on_done(name, seconds, error)` of a background load
LoadDone = Callable[[str, float, "BaseException | None"], None]


class ModelFileInfo(Protocol):
    """One file of a model folder as the listings give it (`models.registry.ModelFile`)."""

    name: str  # relative to its folder, with extension: what requests name it by
    path: Path
    size: int
    mtime: float
    details: dict  # what the header says (family, resolution, prediction, error, ...)
    sha256: str | None

    @property
    def stem(self) -> str: ...

    @property
    def short_hash(self) -> str | None: ...

    @property
    def family(self) -> str | None: ...

    @property
    def title(self) -> str:
        """A1111's title: "name [short hash]" once hashed, else the name."""

    @property
    def model_name(self) -> str:
        """A1111's model_name: the name without its extension, folders joined with "_"."""


@runtime_checkable
class EngineAPI(Protocol):
    # --- configuration (read-only for callers) -----------------------------------------------
    paths: Paths
    settings: EngineSettings
    queue: JobQueue  # the one fair queue: capacity, waiting jobs, jobs ahead of a caller
    extensions: Any  # extensions.manager.ExtensionManager (extensions import core, not back)

    @property
    def hosted_limits(self) -> SpaceLimits | None:
        """The hosted demo's limits every job is held to; None when not hosted."""

    @property
    def on_zero_gpu(self) -> bool:
        """Jobs borrow a ZeroGPU device per call (no step progress reaches the page)."""

    # --- what is on disk ---------------------------------------------------------------------
    def list_checkpoints(self, refresh: bool = False) -> list[ModelFileInfo]: ...

    def find_checkpoint(self, name: str) -> ModelFileInfo | None:
        """A listed checkpoint by any name A1111 clients use: file name, title "name [hash]",
        stem, short hash or sha256. Never a path: only the listing resolves."""

    def resolve_checkpoint(self, name: str | None) -> ModelFileInfo:
        """`find_checkpoint`, the default when `name` is empty; RequestError naming "checkpoint"."""

    def default_checkpoint(self) -> str | None: ...

    def native_resolution(self, checkpoint: str | None) -> int: ...

    def list_vaes(self, refresh: bool = False) -> list[ModelFileInfo]: ...

    def vae_choices(self) -> list[str]: ...

    def text_encoder_names(self, refresh: bool = False) -> list[str]:
        """models/text_encoder's files: what GenerationRequest.text_encoders names (Forge's "VAE /
        Text Encoder" pick for SD 3 and Flux; empty: automatic pairing)."""

    def sampler_names(self) -> tuple[str, ...]: ...

    def schedule_types(self, sampler: str | None = None) -> tuple[str, ...]: ...

    def upscalers(self, refresh: bool = False) -> list: ...

    def upscaler_names(self) -> list[str]: ...

    def hires_upscaler_names(self) -> list[str]: ...

    def lora_listing(self, refresh: bool = False) -> list[dict]: ...

    def embedding_listing(self, refresh: bool = False) -> dict: ...

    def face_restorers(self, refresh: bool = False) -> list[dict]:
        """Face restorer models (models/GFPGAN, models/Codeformer) as A1111 lists them: [{name, cmd_dir}]."""

    def recommended_settings(self, checkpoint: str | None, prompt: str) -> dict | None:
        """"Use recommended settings": what a few-step model wants (LCM, TCD, Hyper-SD, Lightning,
        Turbo) for the first such LoRA the prompt's <lora:...> tags name, else for `checkpoint`:
        {"sampler", "schedule_type", "steps", "cfg_scale", "why", "source" (the listed file name),
        "source_kind" ("lora" | "checkpoint")}; None when neither is one. RequestError naming
        "checkpoint" for a name the listing does not have."""

    # --- control models: ControlNet / T2I-Adapter (core.control) -----------------------------
    @property
    def max_control_units(self) -> int:
        """How many control units a request may have (the UI shows as many)."""

    def control_models(self, refresh: bool = False) -> list[ModelFileInfo]:
        """models/ControlNet's files; `details` holds family, control_type ("controlnet" |
        "t2i_adapter") and an error for a file that is not a usable control model."""

    def control_preprocessors(self) -> list[dict]:
        """Every preprocessor of core.control_modules.PREPROCESSORS with what this machine has:
        [{"name", "available": bool, "missing": "which file goes where" or ""}]."""

    def preprocess_control(self, unit: ControlUnit, width: int, height: int,
                           init_image: Image.Image | None = None) -> Image.Image:
        """The map `unit`'s preprocessor makes of its image (or of `init_image` when it has none)
        at width x height, as the job would use it: the UI's preview, /controlnet/detect.
        RequestError naming the unit's field for a missing image, module or annotator file."""

    # --- what is loaded ----------------------------------------------------------------------
    def load_checkpoint(self, name: str) -> ModelFileInfo: ...

    def unload_checkpoint(self, name: str) -> bool: ...

    def loaded_checkpoints(self) -> list[str]: ...

    def loading_checkpoints(self) -> list[str]: ...

    def preload(self, name: str | None = None, on_done: LoadDone | None = None,
                start: threading.Event | None = None) -> threading.Thread | None: ...

    def preload_when_idle(self, name: str) -> threading.Thread | None: ...

    def set_prediction_type(self, name: str, prediction: str | None) -> None:
        """The user's prediction-type override for a checkpoint (None: what the file says);
        KeyError for an unknown checkpoint, ValueError for an unknown prediction type."""

    def hash_checkpoint(self, name: str) -> threading.Thread | None:
        """Start hashing a checkpoint in the background (None when it is already hashed or being
        hashed); KeyError for an unknown checkpoint."""

    def hash_progress(self, name: str) -> float | None:
        """0..1 while a checkpoint is being hashed, None otherwise."""

    # --- status ------------------------------------------------------------------------------
    def describe(self) -> dict: ...

    def runtime_flags(self) -> dict: ...

    def cache_memory(self) -> dict: ...

    def current_job(self) -> Job | None: ...

    # --- work: each waits its turn in `queue`, then runs ---------------------------------------
    def generate(self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None,
                 control: JobControl | None = None, owner: str | None = None,
                 on_wait: WaitCallback | None = None) -> GenerationResult: ...

    def upscale(self, request: UpscaleRequest, *, on_progress: ProgressCallback | None = None,
                control: JobControl | None = None, owner: str | None = None,
                on_wait: WaitCallback | None = None) -> GenerationResult: ...

    def sd_upscale(self, request: GenerationRequest, *, upscaler: str = "Lanczos", scale: float = 2.0,
                   overlap: int = 64, on_progress: ProgressCallback | None = None,
                   control: JobControl | None = None, owner: str | None = None,
                   on_wait: WaitCallback | None = None) -> GenerationResult: ...

    def merge_checkpoints(self, request: MergeRequest, *, on_progress: ProgressCallback | None = None,
                          control: JobControl | None = None, owner: str | None = None,
                          on_wait: WaitCallback | None = None) -> MergeResult:
        """A1111's Checkpoint Merger: write the merged `.safetensors` into the checkpoints folder
        (listed afterwards); RequestError naming the field for bad names, families or shapes."""
