"""Many workers behind one page and one API, on Ray Serve (`--ray ADDRESS`).

This process becomes the front end: the page, the API, the fair queue, hashing and saving stay
here; generation, upscaling and model loading run in the replicas of one Serve deployment, each
owning its engine and model manager (`ray_replica`), reached through `RayWorkers`
(`ray_workers`). Every node needs the same models folder (a shared volume): replicas open the
files by path and check each checkpoint's sha256 against the front end's.

Nothing here imports Ray: without --ray (and the `ray` extra) nothing of it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.core.settings import EngineSettings, Paths

if TYPE_CHECKING:  # annotations only: importing it imports Ray
    from pipelines.hosting.ray_workers import RayWorkers


@dataclass(frozen=True)
class RayOptions:
    address: str = "auto"  # "auto" (RAY_ADDRESS or a running local cluster), "ray://host:10001", or "local"
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    app_name: str = "sdui"

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("--ray: a cluster address (auto, local, ray://host:10001 or host:port), got ''")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"--ray-replicas: MIN:MAX with 1 <= MIN <= MAX, got "
                             f"'{self.min_replicas}:{self.max_replicas}'")
        if self.gpus_per_replica < 0:
            raise ValueError(f"--ray-gpus-per-replica: 0 or more, got {self.gpus_per_replica}")
        if self.cpus_per_replica < 0:
            raise ValueError(f"--ray-cpus-per-replica: 0 or more, got {self.cpus_per_replica}")

    @classmethod
    def from_flags(cls, address: str, replicas: str = "1:1", gpus: float = 0.0, cpus: float = 1.0) -> "RayOptions":
        """The options from the launcher's flags; ValueError naming the flag on bad input."""
        low, sep, high = str(replicas).partition(":")
        try:
            least, most = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"--ray-replicas: MIN:MAX with 1 <= MIN <= MAX, got {replicas!r}") from None
        if not 1 <= least <= most:
            raise ValueError(f"--ray-replicas: MIN:MAX with 1 <= MIN <= MAX, got {replicas!r}")
        return cls(address=address, min_replicas=least, max_replicas=most, gpus_per_replica=float(gpus),
                   cpus_per_replica=float(cpus))


def worker_app(paths: Paths, settings: EngineSettings, options: RayOptions):
    """The Serve application of the workers (for `serve.run`, or a config's import path)."""
    from pipelines.hosting import ray_replica  # Ray Serve: an optional extra, imported only with --ray

    return ray_replica.deployment(options, paths, settings)


def connect(options: RayOptions, paths: Paths, settings: EngineSettings) -> "RayWorkers":
    """Join the cluster at options.address and start the workers there (or use those already running
    under options.app_name); the handle to give `Engine(remote=...)`."""
    from pipelines.hosting import ray_workers  # Ray: an optional extra, imported only with --ray

    return ray_workers.connect(options, worker_app(paths, settings, options))
