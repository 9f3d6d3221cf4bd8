"""Which job belongs to which browser session, so Interrupt/Skip only touch the caller's own.

One `JobRegistry` is created per built UI (inside `build_ui`, never at import time) and keyed by
Gradio's `session_hash`, which is unique per open page. A job is registered when its handler
starts, before it waits in the engine's queue, and removed when it ends; Interrupt/Skip look
the caller's session up and flip that job's `JobControl` only. A job interrupted while it still
waits leaves the queue at once (pipelines.core.jobs.JobCancelled) without running.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from pipelines.core.progress import JobControl


class JobRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobControl] = {}

    @contextmanager
    def run(self, session: str | None) -> Iterator[JobControl]:
        """Register a fresh JobControl for `session` for the duration of the block."""
        key = session or ""
        control = JobControl()
        with self._lock:
            self._jobs[key] = control
        try:
            yield control
        finally:
            with self._lock:
                if self._jobs.get(key) is control:
                    del self._jobs[key]

    def current(self, session: str | None) -> JobControl | None:
        with self._lock:
            return self._jobs.get(session or "")

    def interrupt(self, session: str | None) -> bool:
        """Stop the session's running job; False when it has none."""
        control = self.current(session)
        if control is None:
            return False
        control.interrupt()
        return True

    def skip(self, session: str | None) -> bool:
        """End the current batch of the session's running job; False when it has none."""
        control = self.current(session)
        if control is None:
            return False
        control.skip()
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
