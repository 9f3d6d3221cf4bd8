"""Live previews of a job's latents while it runs: made only when someone asks (API /progress).

The runner hands each step's latents to `preview_of`, which defers all work. A job's
`JobPreviews` (from the engine's `LivePreviews`, with the settings read as the job starts)
turns those into what the settings ask for, A1111's two options:
- `show_progress_type` ("Live preview display method"): "Approx cheap", a linear latent -> RGB
  map at latent size (no decoding at all), or "TAESD", the tiny autoencoder of models/VAE-approx
  for the job's family at full size. Without a TAESD file for the family (or with one that does
  not load) the cheap map stands in, and the job says so once.
- `show_progress_every_n_steps`: the preview follows every Nth step (and the last); 0: none.
Each preview is computed at most once however often it is polled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from pipelines.core.progress import JobControl, Progress
from pipelines.core.user_settings import PREVIEW_CHEAP, PREVIEW_TAESD
from pipelines.generate.pixels import to_image
from pipelines.models import taesd
from pipelines.models.checkpoint_file import CheckpointError

log = logging.getLogger(__name__)

# Approximate latent -> RGB map of the SD VAE (a linear fit, A1111's "Approx cheap" idea):
# good enough to watch an image form, at latent resolution and at no decoding cost.
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))

Decode = Callable[[torch.Tensor], "Image.Image | None"]


def latent_preview(latents: torch.Tensor) -> Image.Image | None:
    """The first image of a batch as a cheap RGB preview (None for non-4-channel latents)."""
    if latents.shape[1] != len(LATENT_RGB):
        return None
    factors = torch.tensor(LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latents[0].detach().float().cpu(), factors)
    return to_image(rgb.clamp(-1, 1))


class LatentPreview:
    """A deferred preview of one step's latents (Progress.preview): decoded on the first call,
    the same picture for every later one."""

    def __init__(self, latents: torch.Tensor, decode: Decode = latent_preview):
        self.latents = latents
        self.decode = decode
        self._lock = threading.Lock()
        self._done = False
        self._picture: Image.Image | None = None

    def __call__(self) -> Image.Image | None:
        with self._lock:  # two polls at once decode once
            if not self._done:
                self._picture, self._done = self.decode(self.latents), True
            return self._picture


def preview_of(latents: torch.Tensor | None) -> LatentPreview | None:
    """A deferred preview for Progress.preview: nothing is computed unless it is called."""
    return None if latents is None else LatentPreview(latents)


@dataclass(frozen=True)
class PreviewSettings:
    method: str = PREVIEW_CHEAP  # show_progress_type
    every_n_steps: int = 1  # show_progress_every_n_steps; 0: no preview

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> PreviewSettings:
        """From the server's settings (core.user_settings values); what they lack keeps its default."""
        return cls(method=values.get("show_progress_type", cls.method),
                   every_n_steps=int(values.get("show_progress_every_n_steps", cls.every_n_steps)))


class JobPreviews:
    """One job's previews: `__call__` turns each Progress the runner reports into the one to keep
    (its preview made the chosen way, or the last preview kept between every Nth step)."""

    def __init__(self, settings: PreviewSettings, decode: Decode = latent_preview):
        self.settings = settings
        self.decode = decode
        self._last: LatentPreview | None = None

    def __call__(self, progress: Progress) -> Progress:
        made = progress.preview
        if not isinstance(made, LatentPreview):
            return progress
        every = self.settings.every_n_steps
        if every <= 0:
            return replace(progress, preview=None)
        if progress.step % every == 0 or progress.step >= progress.steps:
            self._last = LatentPreview(made.latents, self.decode)
        return replace(progress, preview=self._last)


class LivePreviews:
    """The engine's live previews: each job gets a `JobPreviews` under the settings of its start.
    `tiny_files()`: the VAE-approx listing; `settings()`: the server's settings values;
    `tiny`: the tiny autoencoder cache (shared with the fast final decode)."""

    def __init__(self, tiny_files: Callable[[], list], settings: Callable[[], Mapping[str, Any]],
                 tiny: taesd.TinyAutoencoders):
        self.tiny_files = tiny_files
        self.settings = settings
        self.tiny = tiny
        self._told: set[str] = set()  # what was said already: once per server, not once per job

    def tell_once(self, message: str, control: JobControl | None) -> None:
        if message in self._told:
            return
        self._told.add(message)
        log.warning(message)
        if control is not None:
            control.note(message)

    def for_job(self, family: str, control: JobControl | None = None, label: str | None = None) -> JobPreviews:
        """The previews of a job on a checkpoint of `family` (its label for messages); `control`
        hears what the user should know (no TAESD file: the cheap previews stand in)."""
        settings = PreviewSettings.of(self.settings())
        if settings.method != PREVIEW_TAESD or settings.every_n_steps <= 0:
            return JobPreviews(settings)
        file = taesd.pick_taesd(self.tiny_files(), family)
        if file is None:
            self.tell_once(f"Live previews: {taesd.missing_text(family, label)}; showing the cheap approximation",
                           control)
            return JobPreviews(settings)
        return JobPreviews(settings, self.tiny_decoder(file, control))

    def tiny_decoder(self, file, control: JobControl | None) -> Decode:
        """Decode with `file`'s TAESD (loaded on the first preview asked for); a file that does not
        load is said once, and the cheap map stands in."""
        def decode(latents: torch.Tensor) -> Image.Image | None:
            try:
                loaded = self.tiny.get(file)
            except (CheckpointError, OSError) as exc:
                self.tell_once(f"Live previews: {file.name} did not load ({exc}); showing the cheap approximation",
                               control)
                return latent_preview(latents)
            return loaded.decode_preview(latents)

        return decode
