"""Progress reports (and the clock that times them) and the interrupt/skip handle of one
running job (which also collects the job's notes for the user)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Progress:
    step: int  # steps done in the current batch, 0..steps
    steps: int  # steps per batch
    batch_index: int  # which batch (0-based) of batch_count
    batch_count: int
    elapsed: float  # seconds since the job started
    eta: float | None  # seconds left for the whole job, None until one step is timed
    # a rough picture of the current latents, made only when someone asks (API /progress)
    preview: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    unit: str = "Batch"  # what a "batch" is to the user: a script's grid counts "Cell"s

    @property
    def fraction(self) -> float:
        total = self.steps * self.batch_count
        return (self.batch_index * self.steps + self.step) / total if total else 0.0

    def describe(self) -> str:
        text = f"Step {self.step}/{self.steps}"
        if self.batch_count > 1:
            text = f"{self.unit} {self.batch_index + 1}/{self.batch_count}, {text}"
        if self.eta is not None:
            text += f", ETA {self.eta:.0f}s"
        return text


ProgressCallback = Callable[[Progress], None]


class ProgressClock:
    """Counts the finished steps of a whole job and reports each as a `Progress` with the
    time elapsed and an ETA: the mean time per step so far times the steps left.

    steps_per_batch: steps one batch takes (every pass of it: hires fix counts both);
    `step_done(..., steps=n)` changes it once a batch knows its own count (img2img runs
    the tail of the schedule). first_batch: batches already done before this run (a retry
    resumes there), counted as finished so the ETA covers only what is left."""

    def __init__(self, steps_per_batch: int, batch_count: int, on_progress: ProgressCallback | None,
                 *, first_batch: int = 0, unit: str = "Batch"):
        self.unit = unit
        self.steps_per_batch = max(int(steps_per_batch), 1)
        self.batch_count = batch_count
        self.on_progress = on_progress
        self.done = first_batch * self.steps_per_batch
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step_done(self, batch_index: int, step: int, *, steps: int | None = None,
                  preview: Callable[[], Any] | None = None) -> Progress:
        """Count one finished step: `step` of the batch's `steps_per_batch` (capped there),
        in batch `batch_index`. Reports and returns the Progress."""
        self.done += 1
        if steps is not None:
            self.steps_per_batch = max(int(steps), 1)
        elapsed = self.elapsed()
        remaining = max(self.steps_per_batch * self.batch_count - self.done, 0)
        progress = Progress(step=min(step, self.steps_per_batch), steps=self.steps_per_batch,
                            batch_index=batch_index, batch_count=self.batch_count, elapsed=elapsed,
                            eta=elapsed / self.done * remaining, preview=preview, unit=self.unit)
        if self.on_progress:
            self.on_progress(progress)
        return progress


class JobControl:
    """Set from another thread: interrupt stops the job, skip ends the current batch."""

    def __init__(self) -> None:
        self._interrupted = threading.Event()
        self._skipped = threading.Event()
        self.started = time.monotonic()
        self.notes: list[str] = []  # what the user should know about how the job ran

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def interrupt(self) -> None:
        self._interrupted.set()

    def skip(self) -> None:
        self._skipped.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def take_skip(self) -> bool:
        """True once per skip request (the batch that sees it ends)."""
        if self._skipped.is_set():
            self._skipped.clear()
            return True
        return False

    @property
    def stop_current(self) -> bool:
        return self._interrupted.is_set() or self._skipped.is_set()
