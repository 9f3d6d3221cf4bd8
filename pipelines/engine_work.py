"""The engine's job side, made on a job's first use: `generate.generation` and `generate.upscaling`
import diffusers, transformers and peft (seconds, holding the interpreter lock), which neither
building the engine nor the lists the page is built from need. Start-up leaves them to the first
job or to the start-up load, which starts once the page is served (see `Engine.preload`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Work:
    generator: Any  # generation.Generator (a worker's: remote_saves.HoldingGenerator)
    upscaling: Any  # upscaling.Upscaling: the Extras and SD upscale jobs


class OnFirstUse:
    """What `make` returns, made the first time it is asked for: once, even when two jobs ask at once."""

    def __init__(self, make: Callable[[], Work]):
        self._make = make
        self._value: Work | None = None
        self._lock = threading.Lock()

    def get(self) -> Work:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._make()
        return self._value


def build_work(engine, hold_saves: bool) -> Work:
    """The generator (`hold_saves`: a Ray worker's, which writes no file) and the upscale jobs, on
    the engine's registry, cache, loader and face restorers."""
    from pipelines.generate.generation import Generator  # heavy (diffusers, transformers, peft): jobs only
    from pipelines.generate.upscaling import Upscaling  # heavy: the generator's modules
    from pipelines.hosting.remote_saves import HoldingGenerator  # heavy: a Generator

    generator_type = HoldingGenerator if hold_saves else Generator
    generator = generator_type(engine.registry, engine.manager, engine.placement, Path(engine.paths.outdir),
                               load=engine.loading.load, hires_upscaler=engine.hires_upscaler,
                               faces=engine.faces, paths=engine.paths)
    return Work(generator, Upscaling(engine.registry, engine.upscaler_models, generator))


def job_context(job, hooks=None, on_progress=None):
    """A running job's handles (`generation.JobContext`)."""
    from pipelines.generate.generation import JobContext  # heavy (diffusers & co.): jobs only

    return JobContext(job, hooks, on_progress)


def grid_folder(mode: str) -> str:
    """Where a script's grid of a `mode` job is saved (`generation.grid_folder`)."""
    from pipelines.generate.generation import grid_folder as folder  # heavy (diffusers & co.): jobs only

    return folder(mode)


def save_held(generator, request, result):
    """A worker's held saves written here (`remote_saves.save_held`)."""
    from pipelines.hosting.remote_saves import save_held as save  # heavy: imports the generator's modules

    return save(generator, request, result)


def sd_upscale_options(upscaler: str, scale: float, overlap: int):
    """SD upscale's options (`upscaling.SdUpscaleOptions`), not yet checked."""
    from pipelines.generate.upscaling import SdUpscaleOptions  # heavy: the generator's modules

    return SdUpscaleOptions(upscaler, scale, overlap)
