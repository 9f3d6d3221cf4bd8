"""Progress reports and the interrupt/skip handle of one running job (which also collects
the job's notes for the user)."""

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

    @property
    def fraction(self) -> float:
        total = self.steps * self.batch_count
        return (self.batch_index * self.steps + self.step) / total if total else 0.0

    def describe(self) -> str:
        text = f"Step {self.step}/{self.steps}"
        if self.batch_count > 1:
            text = f"Batch {self.batch_index + 1}/{self.batch_count}, {text}"
        if self.eta is not None:
            text += f", ETA {self.eta:.0f}s"
        return text


ProgressCallback = Callable[[Progress], None]


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
