"""The Image browser tab: the saved outputs by folder and date, newest first, a page at a time,
searched by prompt, seed or model; the selected image's parameters beside it, "Send to" the
other tabs (PNG Info's mechanism: `pnginfo.wire_gallery_sends`), delete into
<outdir>/trash and "Empty trash".

Listing and searching are `pipelines.core.output_index` (nothing outside the outputs folder is
ever read or moved). A page holds `output_index.PER_PAGE` images, so a folder of 10,000 opens as fast as
one of 36. On a hosted demo the tab only says it is not available: the outputs there are
every visitor's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.core.checks import RequestError
from pipelines.core.metadata_read import read_image_metadata
from pipelines.core.output_index import ALL_FOLDERS, FOLDERS, OutputIndex
from webui.common import QUIET, Page
from webui.tabs import pnginfo

log = logging.getLogger(__name__)

INDEX_CACHE = "output_index.json"  # in the data folder: the searched images' parameters
HOSTED_NOTE = "The image browser is not available on a hosted demo: the saved images are every visitor's."
NOTHING_SELECTED = "Select an image to see how it was made."


def page_label(shown: int, page: int, pages: int, total: int) -> str:
    if not total:
        return "No images found."
    return f"Page {page} of {pages} · {total} image{'s' if total != 1 else ''}" + (
        f" · showing {shown}" if pages > 1 else "")


class BrowserTab:
    """The tab's components and handlers (plain methods, so tests call them without a browser)."""

    def __init__(self, ui: Page):
        self.ui = ui
        paths = ui.engine.paths
        cache = Path(paths.data_dir) / INDEX_CACHE if paths.data_dir is not None else None
        self.index = OutputIndex(Path(paths.outdir), cache)
        self.components: dict[str, Any] = {}

    @property
    def hosted(self) -> bool:
        return bool(getattr(self.ui.engine.settings, "hosted", False))

    # --- layout ----------------------------------------------------------------------------
    def build(self, tabs: gr.Tabs, tab: gr.Tab) -> None:
        if self.hosted:
            gr.Markdown(HOSTED_NOTE, elem_id="browser_hosted_note")
            return
        c = self.components
        with gr.Row(equal_height=True):
            c["folder"] = gr.Dropdown([ALL_FOLDERS, *FOLDERS], value=ALL_FOLDERS, label="Folder",
                                      elem_id="browser_folder", scale=1, min_width=160)
            c["date"] = gr.Dropdown([ALL_FOLDERS], value=ALL_FOLDERS, label="Date", elem_id="browser_date",
                                    scale=1, min_width=140)
            c["query"] = gr.Textbox(label="Search (prompt, seed or model)", elem_id="browser_query",
                                    placeholder="e.g. cat 1234", scale=3, min_width=200, max_lines=1)
            c["search"] = gr.Button("Search", elem_id="browser_search", variant="primary", scale=0, min_width=90)
        with gr.Row(equal_height=False, elem_id="browser_pager"):
            c["previous"] = gr.Button("‹ Previous", elem_id="browser_previous", size="sm", scale=0, min_width=100)
            c["page"] = gr.Number(1, label="Page", precision=0, minimum=1, elem_id="browser_page", scale=0,
                                  min_width=90)
            c["next"] = gr.Button("Next ›", elem_id="browser_next", size="sm", scale=0, min_width=100)
            c["label"] = gr.Markdown("", elem_id="browser_page_label")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                c["gallery"] = gr.Gallery(label="Saved images", columns=3, fit_columns=False, height=560,
                                          object_fit="contain",
                                          allow_preview=False, interactive=False, type="filepath",
                                          elem_id="browser_gallery")
            with gr.Column(scale=2, min_width=280):
                c["name"] = gr.Markdown(NOTHING_SELECTED, elem_id="browser_selected")
                c["infotext"] = gr.Textbox(label="Parameters", lines=6, max_lines=16, interactive=False,
                                           elem_id="browser_infotext", buttons=["copy"])
                with gr.Row():
                    sends = {mode: gr.Button(label, elem_id=f"browser_send_{mode}", size="sm", min_width=100)
                             for mode, label in pnginfo.TARGETS}
                with gr.Row():
                    c["delete"] = gr.Button("Delete (into trash)", elem_id="browser_delete", variant="stop",
                                            size="sm", min_width=120)
                    c["empty_trash"] = gr.Button("Empty trash", elem_id="browser_empty_trash", size="sm",
                                                 min_width=120)
                c["trash"] = gr.Markdown("", elem_id="browser_trash")
        c["names"] = gr.State([])  # the shown page's files, in gallery order
        c["last"] = gr.State({})  # {"selected": index}: what "Send to" sends (as under the galleries)
        self.ui.components["browser"] = c
        self._wire(tabs, tab, sends)

    def _wire(self, tabs: gr.Tabs, tab: gr.Tab, sends: dict[str, gr.Button]) -> None:
        c = self.components
        listing = [c["gallery"], c["names"], c["page"], c["label"], c["date"], c["last"], c["name"],
                   c["infotext"], c["trash"]]
        filters = {"folder": c["folder"], "date": c["date"], "query": c["query"], "page": c["page"]}
        for event, page_step in ((tab.select, 0), (c["search"].click, 0), (c["query"].submit, 0),
                                 (c["folder"].input, None), (c["date"].input, None),
                                 (c["previous"].click, -1), (c["next"].click, 1), (c["page"].submit, 0)):
            event(self.show_handler(page_step), inputs_kwargs=filters, outputs=listing, **QUIET)
        c["gallery"].select(self.select, inputs_kwargs={"names": c["names"]},
                            outputs=[c["last"], c["name"], c["infotext"]], **QUIET)
        c["delete"].click(self.delete, inputs_kwargs={"names": c["names"], "last": c["last"]},
                          outputs=[c["trash"]], **QUIET).success(
            self.show_handler(0), inputs_kwargs=filters, outputs=listing, **QUIET)
        c["empty_trash"].click(self.empty_trash, outputs=c["trash"], **QUIET)
        pnginfo.wire_gallery_sends(self.ui, tabs, sends, c["gallery"], c["last"])

    # --- handlers --------------------------------------------------------------------------
    def show_handler(self, page_step: int | None):
        """Show a page: `page_step` 0 the same page, -1/+1 the one before/after, None the first."""
        def show(folder=ALL_FOLDERS, date=ALL_FOLDERS, query="", page=1) -> tuple:
            number = 1 if page_step is None else int(page or 1) + page_step
            return self.show(folder, date, query, number)

        show.__name__ = "browser_show" if page_step is None else f"browser_show_{page_step:+d}"
        return show

    def show(self, folder: str | None, date: str | None, query: str | None, page: int) -> tuple:
        """(gallery items, names, page, label, date choices, selection, name, infotext, trash line)."""
        try:
            dates = self.index.dates(folder)
            date = date if date in dates else ALL_FOLDERS
            files = self.index.search(query or "", folder, date)
        except RequestError as exc:
            raise gr.Error(f"{exc.field}: {exc.message}", print_exception=False) from None
        shown = self.index.page(files, page)
        names = [f.name for f in shown.files]
        items = [(str(self.index.outdir / name), name.rsplit("/", 1)[-1]) for name in names]
        return (items, names, shown.page, page_label(len(names), shown.page, shown.pages, shown.total),
                gr.Dropdown(choices=[ALL_FOLDERS, *dates], value=date), {}, NOTHING_SELECTED, "",
                self.trash_line())

    def select(self, evt: gr.SelectData, names: list[str] | None = None) -> tuple:
        """The clicked image: its name and parameters; it becomes what Send to and Delete take."""
        names = list(names or [])
        index = evt.index if isinstance(evt.index, int) else 0
        if not 0 <= index < len(names):
            return {}, NOTHING_SELECTED, ""
        return {"selected": index}, f"**{names[index]}**", self.infotext(names[index])

    def infotext(self, name: str) -> str:
        try:
            return read_image_metadata(self.index.path_of(name)).infotext or "(no parameters saved in this image)"
        except RequestError as exc:
            return exc.message
        except (OSError, ValueError) as exc:
            log.info("cannot read %s: %s", name, exc)
            return f"cannot read this image: {exc}"

    def delete(self, names: list[str] | None = None, last: dict | None = None) -> str:
        index = (last or {}).get("selected")
        names = list(names or [])
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise gr.Error("Select an image to delete first.", print_exception=False)
        try:
            self.index.delete(names[index])
        except RequestError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        gr.Info(f"Moved {names[index]} into the trash.")
        return self.trash_line()

    def empty_trash(self) -> str:
        count = self.index.empty_trash()
        gr.Info(f"Deleted {count} image{'s' if count != 1 else ''} for good." if count else "The trash is empty.")
        return self.trash_line()

    def trash_line(self) -> str:
        count = self.index.trash_count()
        return f"Trash: {count} image{'s' if count != 1 else ''} (in {self.index.outdir / 'trash'})" if count else ""
