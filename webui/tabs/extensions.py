"""The Extensions tab, and what extensions add to the rest of the UI.

- `add_sections(ui, mode, fields)`: each active extension's `ui_section` inside a
  generation tab, in an accordion. Its components join the tab's `fields` under generated
  names (`ext_<n>`); `split_fields` turns their values back into
  `extension_args[<id>][<name>]` for the request.
- `build_tabs(ui, tabs, blocks)`: the extensions' own tabs, then the Extensions tab (list
  with status, enable/disable persisted in the data folder, reload, install from a URL only
  when the launcher allows it: never with --listen/--share or on a hosted demo), and a notice
  on page load when an extension failed.

Extension code that raises while building its UI is reported and disabled; the page builds.
An engine without extensions (`engine.extensions` is None, as in the UI tests) adds nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from extensions.api import API_VERSION, UIContext
from webui.common import QUIET, Page

log = logging.getLogger(__name__)

HEADERS = ("ID", "Name", "Version", "API", "Status", "Details", "Folder")
# shares of the table's width: long text wraps inside its column instead of pushing the
# table past the page (Gradio sizes columns to their longest cell otherwise)
COLUMN_WIDTHS = ["11%", "13%", "7%", "6%", "8%", "35%", "20%"]
NEEDS_RESTART = ("Hooks follow at once; UI sections, tabs and API routes of a newly enabled extension appear "
                 "after a restart.")


def _failure_notice(ext: Any, where: str, exc: BaseException, manager: Any) -> None:
    message = manager.fail(ext, where, exc)
    gr.Markdown(f"**Error:** {message}", elem_classes="extension-error")


def add_sections(ui: Page, mode: str, fields: dict) -> None:
    manager = ui.engine.extensions
    if manager is None:
        return
    mapping = ui.components.setdefault("extension_fields", {})
    for ext, section in manager.ui_sections(mode):
        with gr.Accordion(section["title"], open=False, elem_id=f"{mode}_ext_{ext.id}"):
            try:
                built = dict(section["build"](UIContext(engine=ui.engine, extension_id=ext.id, tab=mode)) or {})
            except Exception as exc:  # noqa: BLE001
                _failure_notice(ext, "ui_section", exc, manager)
                continue
        for arg, component in built.items():
            name = f"ext_{len(mapping)}"
            mapping[name] = (ext.id, str(arg))
            fields[name] = component


def split_fields(ui: Page, fields: dict) -> tuple[dict, dict]:
    """(the request's own fields, {extension id: {argument: value}})."""
    mapping = ui.components.get("extension_fields", {})
    plain: dict = {}
    args: dict = {}
    for name, value in fields.items():
        if name in mapping:
            ext_id, arg = mapping[name]
            args.setdefault(ext_id, {})[arg] = value
        else:
            plain[name] = value
    return plain, args


def rows(manager: Any) -> list[list[str]]:
    table = []
    for item in manager.list():
        details = item["error"] or item["description"]
        if item["requirements"]:
            details += f" (needs: {', '.join(item['requirements'])}; install them yourself)"
        table.append([item["id"], item["name"], item["version"], item["api"], item["status"], details.strip(),
                      item["folder"]])
    return table


def build_tabs(ui: Page, tabs: dict, blocks: gr.Blocks | None = None) -> None:
    manager = ui.engine.extensions
    if manager is None:
        return
    for ext, tab in manager.ui_tabs():
        with gr.Tab(tab["title"], id=f"ext_{ext.id}", elem_id=f"tab_ext_{ext.id}") as tabs[f"ext_{ext.id}"]:
            try:
                tab["build"](UIContext(engine=ui.engine, extension_id=ext.id, tab=None))
            except Exception as exc:  # noqa: BLE001
                _failure_notice(ext, "ui_tab", exc, manager)
    with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions") as tabs["extensions"]:
        build_extensions_tab(ui, manager)
    if blocks is not None:
        blocks.load(lambda: notify_failures(manager), **QUIET)


def notify_failures(manager: Any) -> None:
    for line in manager.failures():
        gr.Warning(line)


def build_extensions_tab(ui: Page, manager: Any) -> None:
    gr.Markdown(f"Extension API **{API_VERSION}**. {NEEDS_RESTART}", elem_id="extensions_intro")
    table = gr.Dataframe(value=rows(manager) or None, headers=list(HEADERS), interactive=False, datatype="str",
                         wrap=True, column_count=len(HEADERS), column_widths=COLUMN_WIDTHS,
                         elem_id="extensions_table")
    ids = [e["id"] for e in manager.list()]
    with gr.Row():
        choice = gr.Dropdown(ids, value=None, label="Extension", elem_id="extensions_choice", scale=3)
        enable = gr.Button("Enable", elem_id="extensions_enable", scale=0, min_width=100)
        disable = gr.Button("Disable", elem_id="extensions_disable", scale=0, min_width=100)
        reload = gr.Button("Reload", elem_id="extensions_reload", scale=0, min_width=100)
    status = gr.Markdown("", elem_id="extensions_status")
    parts = dict(table=table, choice=choice, enable=enable, disable=disable, reload=reload, status=status)
    if manager.allow_install:
        with gr.Row():
            url = gr.Textbox(label="Install from a git URL", placeholder="https://github.com/owner/extension.git",
                             elem_id="extensions_url", scale=4)
            install = gr.Button("Install", elem_id="extensions_install", scale=0, min_width=100)
        parts.update(url=url, install=install)
        install.click(lambda url: install_handler(manager, url), inputs=url, outputs=[table, choice, status],
                      api_visibility="undocumented")
    else:
        gr.Markdown("Installing from a URL is off on a server others can reach (--listen, --share, hosted demo): "
                    "copy the extension's folder into `extensions/` and restart.", elem_id="extensions_no_install")
    ui.components["extensions"] = parts
    enable.click(lambda ext_id: toggle(manager, ext_id, True), inputs=choice, outputs=[table, status],
                 api_visibility="undocumented")
    disable.click(lambda ext_id: toggle(manager, ext_id, False), inputs=choice, outputs=[table, status],
                  api_visibility="undocumented")
    reload.click(lambda: reload_handler(manager), outputs=[table, choice, status], api_visibility="undocumented")
    table.select(_row_id, outputs=choice, **QUIET)


def _row_id(evt: gr.SelectData):
    row = evt.row_value or []
    return row[0] if row else gr.update()


def toggle(manager: Any, ext_id: str | None, enabled: bool):
    if not ext_id:
        raise gr.Error("Pick an extension first.", print_exception=False)
    try:
        ext = manager.set_enabled(ext_id, enabled)
    except KeyError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    text = f"**{ext.id}**: {ext.status}" + (f" — {ext.error}" if ext.error else "")
    if ext.error:
        gr.Warning(f"Extension {ext.id}: {ext.error}")
    return rows(manager) or None, text


def reload_handler(manager: Any):
    manager.reload()
    failures = manager.failures()
    for line in failures:
        gr.Warning(line)
    ids = [e["id"] for e in manager.list()]
    return (rows(manager) or None, gr.update(choices=ids),
            f"Reloaded {len(ids)} extension(s); {len(failures)} with problems. {NEEDS_RESTART}")


def install_handler(manager: Any, url: str | None):
    if not manager.allow_install:
        raise gr.Error("Installing from a URL is off on this server.", print_exception=False)
    try:
        ext = manager.install(url or "")
    except (ValueError, RuntimeError) as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    ids = [e["id"] for e in manager.list()]
    return (rows(manager) or None, gr.update(choices=ids),
            f"Installed **{ext.id}** ({ext.status}). Restart to see its UI. Its requirements, if any, are "
            f"listed in the table: install them yourself.")
