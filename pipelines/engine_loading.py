"""Reading checkpoints into the model cache for the engine: hashed while they load, listed while
they load (for the UI), in a background thread when asked (start-up, a pick in the UI), with the
request's pick of text encoders and VAE (`models.module_pick`: Forge's "VAE / Text Encoder")."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from pipelines.core.jobs import JobQueue
from pipelines.core.settings import EngineSettings, Paths
from pipelines.models.checkpoint_file import CheckpointError
from pipelines.models.device import Placement, use_compile_cache
from pipelines.models.manager import LoadedModel, ModelManager
from pipelines.models.module_pick import pick_modules
from pipelines.models.registry import ModelFile, ModelRegistry

log = logging.getLogger(__name__)

# on_done(name, seconds, error) of a background load; error None when it loaded
LoadDone = Callable[[str, float, "Exception | None"], None]

GB = 1 << 30


def model_manager(paths: Paths, settings: EngineSettings, placement: Placement) -> ModelManager:
    """The engine's model cache, from its settings: the RAM budget, the text encoder and VAE folders
    split files draw on, --gguf-dequantize-once; with --compile, inductor's artefacts under the data
    folder so a compile is paid once per machine, not once per start."""
    if placement.compile:
        use_compile_cache(paths.data_dir)
    budget = int(settings.ram_budget_gb * GB) if settings.ram_budget_gb else None
    return ModelManager(placement, budget, text_encoder_dir=paths.folder("text_encoders"),
                        vae_dir=paths.folder("vae"), gguf_dequantize_once=settings.gguf_dequantize_once)


class CheckpointLoading:
    def __init__(self, registry: ModelRegistry, manager: ModelManager, prepare: Callable[[], object] | None = None):
        """`prepare`: called before every load (the engine's: its job side, made once). A load imports
        diffusers and transformers, and so does making the job side: done in this order, a load and a
        first job never import them in two threads at once (where Python can hand one of them a
        half-imported module)."""
        self.registry = registry
        self.manager = manager
        self.prepare = prepare
        self.loading: list[str] = []  # checkpoints being read into memory now, for the UI

    def load(self, file: ModelFile, text_encoders: Sequence[str] = (), vae: str | None = None) -> LoadedModel:
        """The checkpoint from the cache, read once (with the chosen `text_encoders` and `vae`: see
        module_pick, RequestError naming the field for one that does not fit); its hash is set on
        `file` (the infotext's)."""
        if self.prepare is not None:
            self.prepare()
        pick = pick_modules(self.registry, file, text_encoders, vae)
        loading = not self.manager.holds(file.path, pick)
        hashing = None
        if loading:
            self.loading.append(file.name)
            # the infotext's "Model hash" (cached after the first time): hashed while the weights
            # load, as both mostly wait outside the GIL (first load of a 2 GB file: 1.5 s sooner)
            hashing = self.registry.hash_in_background("checkpoints", file.name)
        try:
            model = self.manager.get(file.name, file.path, pick)
        except CheckpointError:
            raise
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file.name}: could not be loaded ({exc})") from exc
        finally:
            if loading:
                self.loading.remove(file.name)
        if hashing is not None:  # (a failed load does not wait for it: the error comes at once)
            hashing.join()
        self.registry.ensure_hash(file)  # sets file.sha256 (at once where the thread hashed it)
        return model

    def when_idle(self, file: ModelFile, queue: JobQueue) -> threading.Thread | None:
        """Load `file` in the background now if no job runs or waits, nothing else loads and it is
        not loaded yet (a pick in the UI: beside a job a load would slow it down and hold two models
        in RAM at once); None otherwise."""
        busy = queue.running() is not None or queue.waiting() or self.loading
        return None if busy or file.name in self.manager.loaded_names() else self.in_background(file)

    def in_background(self, file: ModelFile, on_done: LoadDone | None = None,
                      start: threading.Event | None = None) -> threading.Thread:
        """Load `file` in a daemon thread, listed as loading from now on; with `start`, the work
        waits until it is set (at start-up, until the page is served: a load imports diffusers and
        transformers, seconds that would hold the interpreter lock while the page is built). A
        failure is logged and told to `on_done`, not raised: the first job on it reports it too."""
        self.loading.append(file.name)

        def load() -> None:
            if start is not None:
                start.wait()
            started, error = time.monotonic(), None
            try:
                self.load(file)
            except Exception as exc:  # noqa: BLE001 - said through on_done and the log
                log.error("preloading %s failed: %s", file.name, exc)
                error = exc
            finally:
                self.loading.remove(file.name)
            if on_done is not None:
                on_done(file.name, time.monotonic() - started, error)

        thread = threading.Thread(target=load, name="sdui-preload", daemon=True)
        thread.start()
        return thread
