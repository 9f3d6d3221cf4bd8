"""The threads API jobs wait and run in, apart from FastAPI's pool the listings use."""

from __future__ import annotations

from typing import Any, Callable

import anyio

from pipelines.core.engine_api import EngineAPI
from pipelines.core.jobs import DEFAULT_MAX_WAITING


class JobThreads:
    """One thread per job the engine's queue can hold (running or waiting): a job waiting its
    turn blocks its own thread, never the event loop or a listing's."""

    def __init__(self, engine: EngineAPI):
        self.engine = engine
        self.limiter = anyio.CapacityLimiter(engine.queue.capacity() or DEFAULT_MAX_WAITING + 1)

    async def run(self, handler: Callable[..., Any], *args: Any) -> Any:
        """`handler(*args)` in a job thread; a full queue answers 503 (QueueFull) without waiting.
        The queue is looked up on each call: whoever owns the engine may replace it."""
        self.engine.queue.check_room()
        return await anyio.to_thread.run_sync(handler, *args, limiter=self.limiter)
