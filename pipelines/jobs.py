"""One fair queue for every caller (UI, API, CLI): jobs run one at a time, in arrival order.

A plain lock is not fair (a thread that just released it may take it again); tickets are.
The running job's progress is readable by anyone (the API's /progress reports it).
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .progress import JobControl, Progress


class QueueFull(RuntimeError):
    pass


@dataclass
class Job:
    id: int
    kind: str  # "txt2img", "img2img", "inpaint", "extras"
    owner: str | None = None  # session hash or API client, for acting on one's own job
    control: JobControl = field(default_factory=JobControl)
    progress: Progress | None = None
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None


class JobQueue:
    def __init__(self, max_waiting: int | None = None):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: list[Job] = []
        self._running: Job | None = None

    def new_job(self, kind: str, owner: str | None = None, control: JobControl | None = None) -> Job:
        return Job(id=next(self._tickets), kind=kind, owner=owner, control=control or JobControl())

    @contextmanager
    def run(self, job: Job) -> Iterator[Job]:
        """Wait for this job's turn (FIFO), hold the slot while the body runs."""
        with self._cond:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} jobs waiting); try again shortly")
            self._waiting.append(job)
            try:
                while self._running is not None or self._waiting[0] is not job:
                    self._cond.wait()
            except BaseException:
                self._waiting.remove(job)
                self._cond.notify_all()
                raise
            self._waiting.pop(0)
            self._running = job
            job.started_at = time.monotonic()
        try:
            yield job
        finally:
            with self._cond:
                self._running = None
                self._cond.notify_all()

    def running(self) -> Job | None:
        return self._running

    def position(self, job: Job) -> int:
        """0 when running, n when n-1 jobs are ahead of it, -1 when not queued."""
        with self._cond:
            if self._running is job:
                return 0
            return self._waiting.index(job) + 1 if job in self._waiting else -1

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)
