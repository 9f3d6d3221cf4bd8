"""The Checkpoints tab: browse, search, sort, hash, load/unload and override prediction type.

The handlers are plain methods of `CheckpointsTab` so tests can call them without a browser;
`build` lays out the components and wires them. An engine call that fails (unload, memory,
prediction override, background hashing) becomes a message, never a broken page.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gradio as gr

from pipelines.core.engine_api import EngineAPI, ModelFileInfo
from pipelines.core.prediction_types import EPSILON, V_PREDICTION
from pipelines.core.request import RequestError
from webui import convert
from webui.common import QUIET, checkpoint_infos, describe_exception

log = logging.getLogger(__name__)

HEADERS = ["Name", "Family", "Resolution", "Prediction", "Size", "Short hash", "Modified",
           "Title", "Author", "License", "Trigger words"]
# shares of the table's width: long names and titles wrap inside their column instead of
# pushing the table past the page (Gradio sizes columns to their longest cell otherwise)
COLUMN_WIDTHS = ["14%", "7%", "9%", "9%", "7%", "9%", "9%", "11%", "8%", "7%", "10%"]
SORTS = ["Name", "Newest first"]
# dropdown label -> what set_prediction_type takes (None: what the file says)
PREDICTIONS = {"Automatic": None, "epsilon": EPSILON, "v-prediction": V_PREDICTION}
HASH_POLL_S = 0.5


def display_name(info: ModelFileInfo) -> str:
    """Checkpoints in subfolders show as `sub/name` whatever the OS separator."""
    return str(info.name).replace("\\", "/")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def checkpoint_row(info: ModelFileInfo) -> list[str]:
    details = info.details or {}
    error = details.get("error")
    family = f"unreadable: {error}" if error else _text(info.family or details.get("family"))
    if details.get("storage") and not error:  # quantized weights (GGUF Q4_0, fp8, NF4): said beside the family
        family += f" · {details['storage']}"
    prediction = _text(details.get("prediction"))
    if prediction and details.get("prediction_source") == "user override":
        prediction += " (override)"
    return [
        display_name(info), family, _text(details.get("resolution")), prediction,
        convert.human_size(info.size), info.short_hash or "", convert.modified(info.mtime),
        _text(details.get("title")), _text(details.get("author")), _text(details.get("license")),
        _text(details.get("trigger_words")),
    ]


def filter_and_sort(infos: list[ModelFileInfo], query: str | None = "", sort: str | None = None) -> list:
    """Infos whose name contains the query (case-insensitive), by name or newest first;
    no sort keeps the engine's listing order."""
    words = (query or "").strip().lower()
    found = [i for i in infos if words in display_name(i).lower()] if words else list(infos)
    if sort == "Name":
        found.sort(key=lambda i: display_name(i).lower())
    elif sort == "Newest first":
        found.sort(key=lambda i: i.mtime or 0.0, reverse=True)
    return found


def memory_line(memory: dict | None) -> str:
    if not memory:
        return ""
    parts = [f"**Model cache:** {convert.human_size(memory.get('cache_bytes') or 0)} RAM"]
    if memory.get("budget_bytes"):
        parts[0] += f" of {convert.human_size(memory['budget_bytes'])}"
    if memory.get("process_rss_bytes"):
        parts.append(f"process {convert.human_size(memory['process_rss_bytes'])}")
    if memory.get("vram_allocated_bytes") is not None:
        parts.append(f"VRAM {convert.human_size(memory['vram_allocated_bytes'])} allocated, "
                     f"{convert.human_size(memory.get('vram_reserved_bytes') or 0)} reserved")
    return " · ".join(parts)


class CheckpointsTab:
    def __init__(self, engine: EngineAPI, loaded_text: Callable[[], str],
                 default_checkpoint: Callable[[list[str]], str | None]):
        self.engine = engine
        self.loaded_text = loaded_text
        self.default_checkpoint = default_checkpoint
        self.components: dict[str, Any] = {}

    # --- look-ups -------------------------------------------------------------------------
    def infos(self, refresh: bool = False) -> list[ModelFileInfo]:
        return checkpoint_infos(self.engine, refresh)

    def rows(self, query: str | None = "", sort: str | None = None, refresh: bool = False) -> list[list[str]]:
        return [checkpoint_row(i) for i in filter_and_sort(self.infos(refresh), query, sort)]

    def memory(self) -> str:
        try:
            return memory_line(self.engine.cache_memory())
        except Exception:
            log.debug("cache memory unavailable", exc_info=True)
            return ""

    def _find(self, name: str | None) -> ModelFileInfo | None:
        """The listed checkpoint a row or the dropdown names (rows show `display_name`)."""
        for info in self.infos():
            if display_name(info) == name or info.name == name:
                return info
        return None

    # --- handlers -------------------------------------------------------------------------
    def refresh(self, current: str | None = None, query: str | None = "", sort: str | None = None):
        infos = self.infos(refresh=True)
        names = [i.name for i in infos]
        value = current if current in names else self.default_checkpoint(names)
        rows = [checkpoint_row(i) for i in filter_and_sort(infos, query, sort)]
        return rows or None, gr.update(choices=names, value=value), gr.update(choices=names), self.loaded_text()

    def show(self, query: str | None = "", sort: str | None = None, current: str | None = None,
             chosen: str | None = None):
        """The tab comes on screen: fresh rows, and the session's checkpoint (the header's) in
        the dropdown unless the user picked one here."""
        return (self.rows(query, sort) or None, self.loaded_text(), self.memory(),
                gr.update() if chosen else gr.update(value=self.preselected(current)))

    def preselected(self, current: str | None = None) -> str | None:
        """What the dropdown shows before the user picks: `current` when listed, else the default."""
        names = [i.name for i in self.infos()]
        return current if current in names else self.default_checkpoint(names)

    def filter(self, query: str | None = "", sort: str | None = None):
        return self.rows(query, sort) or None

    def select_row(self, evt: gr.SelectData):
        row = evt.row_value or []
        if not row:
            return gr.update(), gr.update()
        info = self._find(row[0])
        details = (info.details or {}) if info else {}
        override = details.get("prediction") if details.get("prediction_source") == "user override" else None
        label = next((k for k, v in PREDICTIONS.items() if v == override), "Automatic")
        return (info.name if info else row[0]), label

    def load(self, name: str | None = None):
        if not name:
            raise gr.Error("Checkpoint to load: pick a checkpoint first.", print_exception=False)
        info = self._find(name)
        error = (info.details or {}).get("error") if info else None
        try:
            self.engine.load_checkpoint(name)
        except Exception as exc:
            log.warning("loading %r failed: %s", name, exc)
            message = convert.error_message(exc) if isinstance(exc, RequestError) else describe_exception(exc)
            path = info.path if info else name
            kept = ", ".join(self._loaded_names()) or "nothing"
            detail = f" (file looks corrupt or truncated: {error})" if error else ""
            raise gr.Error(f"Loading {name} ({path}) failed: {message}{detail}. Still loaded: {kept}.",
                           print_exception=False) from None
        return name, self.loaded_text(), self.rows() or None, f"Loaded **{name}**. {self.memory()}"

    def _loaded_names(self) -> list[str]:
        try:
            return list(self.engine.loaded_checkpoints())
        except Exception:
            return []

    def unload(self, name: str | None = None):
        if not name:
            raise gr.Error("Checkpoint to unload: pick a checkpoint first.", print_exception=False)
        try:
            done = self.engine.unload_checkpoint(name)
        except Exception as exc:
            raise gr.Error(f"Unloading {name} failed: {describe_exception(exc)}", print_exception=False) from None
        status = f"Unloaded **{name}**." if done else f"{name} was not loaded."
        return self.loaded_text(), f"{status} {self.memory()}"

    def set_prediction(self, name: str | None = None, choice: str | None = "Automatic",
                       query: str | None = "", sort: str | None = None):
        if not name:
            raise gr.Error("Prediction type: pick a checkpoint first.", print_exception=False)
        value = PREDICTIONS.get(choice or "Automatic")
        try:
            self.engine.set_prediction_type(name, value)
        except Exception as exc:
            raise gr.Error(f"Prediction type for {name}: {describe_exception(exc)}", print_exception=False) from None
        note = "detected automatically" if value is None else f"forced to {value}"
        return self.rows(query, sort) or None, f"Prediction type of **{name}** {note} (applies on next load)."

    def compute_hash(self, name: str | None = None, query: str | None = "", sort: str | None = None):
        """Generator: starts a background hash and reports its progress until it is done."""
        if not name:
            raise gr.Error("Compute hash: pick a checkpoint first.", print_exception=False)
        try:
            thread = self.engine.hash_checkpoint(name)
        except Exception as exc:
            raise gr.Error(f"Hashing {name} failed: {describe_exception(exc)}", print_exception=False) from None
        while True:
            progress = self.engine.hash_progress(name)
            alive = thread is not None and thread.is_alive()
            if progress is None and not alive:
                break
            yield gr.update(), f"Hashing **{name}**: {100 * (progress or 0.0):.0f}%"
            time.sleep(HASH_POLL_S)
        info = self._find(name)
        short = info.short_hash if info else None
        yield (self.rows(query, sort) or None,
               f"Hash of **{name}**: `{short}`" if short else f"Hashing **{name}** did not finish.")

    # --- layout ---------------------------------------------------------------------------
    def build(self, tab, checkpoint, loaded, concurrency_id: str) -> None:
        rows = self.rows()
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="checkpoints_refresh", scale=0, min_width=120)
            search = gr.Textbox(label="Search by name", elem_id="checkpoints_search", scale=2)
            sort = gr.Radio(SORTS, value="Name", label="Sort", elem_id="checkpoints_sort", scale=1)
        with gr.Row():
            choice = gr.Dropdown(choices=[i.name for i in self.infos()], value=self.preselected(), label="Checkpoint",
                                 elem_id="checkpoints_choice", scale=3)
            load = gr.Button("Load", variant="primary", elem_id="checkpoints_load", scale=0, min_width=100)
            unload = gr.Button("Unload", elem_id="checkpoints_unload", scale=0, min_width=100)
            hash_button = gr.Button("Compute hash", elem_id="checkpoints_hash", scale=0, min_width=120)
            prediction = gr.Dropdown(list(PREDICTIONS), value="Automatic", label="Prediction type",
                                     elem_id="checkpoints_prediction", scale=1)
        memory = gr.Markdown(self.memory(), elem_id="checkpoints_memory")
        table = gr.Dataframe(value=rows or None, headers=HEADERS, interactive=False, datatype="str",
                             elem_id="checkpoints_table", wrap=True, column_count=len(HEADERS),
                             column_widths=COLUMN_WIDTHS)
        status = gr.Markdown("Select a row or pick a name, then **Load**.", elem_id="checkpoints_status")
        self.components.update(refresh=refresh, search=search, sort=sort, choice=choice, load=load,
                               unload=unload, hash=hash_button, prediction=prediction, memory=memory,
                               table=table, status=status)
        view = {"query": search, "sort": sort}
        refresh.click(self.refresh, inputs_kwargs={"current": checkpoint, **view},
                      outputs=[table, checkpoint, choice, loaded], api_name="refresh_checkpoints")
        search.change(self.filter, inputs_kwargs=view, outputs=table, **QUIET)
        sort.change(self.filter, inputs_kwargs=view, outputs=table, **QUIET)
        table.select(self.select_row, outputs=[choice, prediction], **QUIET)
        load.click(self.load, inputs_kwargs={"name": choice}, outputs=[checkpoint, loaded, table, status],
                   concurrency_id=concurrency_id, concurrency_limit=1, api_name="load_checkpoint")
        unload.click(self.unload, inputs_kwargs={"name": choice}, outputs=[loaded, status],
                     concurrency_id=concurrency_id, concurrency_limit=1, api_visibility="undocumented")
        hash_button.click(self.compute_hash, inputs_kwargs={"name": choice, **view}, outputs=[table, status],
                          api_visibility="undocumented")
        prediction.input(self.set_prediction, inputs_kwargs={"name": choice, "choice": prediction, **view},
                         outputs=[table, status], api_visibility="undocumented")
        tab.select(self.show, inputs_kwargs={**view, "current": checkpoint, "chosen": choice},
                   outputs=[table, loaded, memory, choice], **QUIET)
