"""One fair queue for every caller (UI, API, CLI): jobs start in arrival order, one at a time on
one machine, or as many at once as there are slots (the live workers of a Ray cluster).

A plain lock is not fair (a thread that just released it may take it again); tickets are.
The running jobs' progress is readable by anyone (the API's /progress reports it).
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

from pipelines.core.progress import JobControl, Progress

CANCEL_POLL_SECONDS = 0.25  # how soon a waiting job notices it was interrupted
DEFAULT_MAX_WAITING = 64  # `--max-queue-size`; a hosted demo uses its own, smaller bound (pipelines.core.hosted_limits)

# Called with the number of jobs ahead (the running one included) whenever it changes while
# a job waits, from the waiting thread, under the queue's lock: it must be quick and must not
# wait on the queue itself.
WaitCallback = Callable[[int], None]
# How many jobs may run at once: a number, or a function read while jobs wait (the live workers of
# a cluster, which come and go); it must be quick: it is called under the queue's lock.
Slots = Union[int, Callable[[], int]]


class JobCancelled(Exception):
    """The job was interrupted while it waited: it leaves the queue without running."""


class QueueFull(RuntimeError):
    """The queue already holds its maximum of waiting jobs; the caller should retry later."""

    def __init__(self, waiting: int):
        super().__init__(f"Queue full ({waiting} waiting), try again in a moment")
        self.waiting = waiting


class NoWorkers(QueueFull):
    """No worker can run a job now (every worker of the cluster is gone): refused at once, like
    a full queue, so callers say "try again later" (a 503 in the API) until workers return."""

    def __init__(self) -> None:
        RuntimeError.__init__(self, "No workers available: every worker of the cluster is down; "
                                    "try again when workers return")
        self.waiting = 0


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
    def __init__(self, max_waiting: int | None = None, slots: Slots = 1):
        self.max_waiting = max_waiting
        self._slots = slots
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: list[Job] = []
        self._running: list[Job] = []  # in the order they started

    def slots(self) -> int:
        """How many jobs may run at once now."""
        return max(int(self._slots() if callable(self._slots) else self._slots), 0)

    def new_job(self, kind: str, owner: str | None = None, control: JobControl | None = None) -> Job:
        return Job(id=next(self._tickets), kind=kind, owner=owner, control=control or JobControl())

    def check_room(self) -> None:
        """Raise QueueFull now if a new job would be refused (a cheap early answer; `run`
        checks again)."""
        with self._cond:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting))

    def capacity(self) -> int | None:
        """Jobs that can be in the queue at once, the running ones included (None: unbounded)."""
        return None if self.max_waiting is None else self.max_waiting + max(self.slots(), 1)

    @contextmanager
    def run(self, job: Job, on_wait: WaitCallback | None = None) -> Iterator[Job]:
        """Wait for this job's turn (FIFO: it starts when a slot is free and it is first in
        line), hold a slot while the body runs.

        Raises QueueFull at once when `max_waiting` jobs already wait, NoWorkers when there
        are no slots at all, JobCancelled when the job's control is interrupted while it
        waits. `on_wait` hears how many jobs are ahead each time that number changes, and 0
        when the job's turn comes (not at all when it starts at once)."""
        with self._cond:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting))
            if self.slots() == 0:
                raise NoWorkers()
            self._waiting.append(job)
            told = None
            try:
                while len(self._running) >= self.slots() or self._waiting[0] is not job:
                    if job.control.interrupted:
                        raise JobCancelled(f"job {job.id} was interrupted while it waited")
                    ahead = self._ahead(job)
                    if on_wait is not None and ahead != told:
                        told = ahead
                        on_wait(ahead)
                    self._cond.wait(CANCEL_POLL_SECONDS)  # an interrupt does not notify the queue
            except BaseException:
                self._waiting.remove(job)
                self._cond.notify_all()
                raise
            self._waiting.pop(0)
            self._running.append(job)
            job.started_at = time.monotonic()
            if on_wait is not None and told is not None:
                on_wait(0)
        try:
            yield job
        finally:
            with self._cond:
                self._running.remove(job)
                self._cond.notify_all()

    def running(self) -> Job | None:
        """The first of the running jobs (the one job on one machine); None when idle."""
        with self._cond:
            return self._running[0] if self._running else None

    def running_jobs(self) -> list[Job]:
        """Every running job, the earliest started first."""
        with self._cond:
            return list(self._running)

    def ahead(self, job: Job) -> int:
        """How many jobs run or wait before `job` (every running one counts): 0 when it runs,
        -1 when not queued."""
        with self._cond:
            return self._ahead(job)

    def _ahead(self, job: Job) -> int:
        if job in self._running:
            return 0
        if job not in self._waiting:
            return -1
        return self._waiting.index(job) + len(self._running)

    def first_waiting(self, owner: str) -> Job | None:
        """The earliest waiting job of `owner` (for telling a caller where it stands)."""
        with self._cond:
            return next((job for job in self._waiting if job.owner == owner), None)

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)
