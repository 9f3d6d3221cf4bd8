"""Extensions in the web UI: sections inside the generation tabs whose values reach
request.extension_args, extension tabs, the Extensions tab (status, enable/disable, reload),
and a UI-building failure isolated."""

from __future__ import annotations

import gradio as gr
import pytest
from test_extensions import SHIPPED, write_extension

from extensions.manager import ExtensionManager
from webui.app import build_ui
from webui.tabs import extensions as extensions_tab


@pytest.fixture
def ui_with_extensions(engine, tmp_path):
    saved = engine.extensions
    manager = ExtensionManager(tmp_path / "data" / "extensions.json")
    root = tmp_path / "exts"
    write_extension(root, "mytab", """
import gradio as gr

def setup(ext):
    ext.ui_tab(lambda ctx: gr.Markdown("hello from " + ctx.extension_id, elem_id="mytab_text"), title="My tab")
""")
    write_extension(root, "badui", """
def setup(ext):
    def build(ctx):
        raise RuntimeError("cannot build")
    ext.ui_section(build, tabs=["txt2img"])
""")
    write_extension(root, "broken", "import nowhere_to_be_found\n")
    manager.discover(SHIPPED, root)
    engine.extensions = manager
    try:
        yield build_ui(engine), manager
    finally:
        engine.extensions = saved


def values(ui, mode, **overrides):
    out = {name: getattr(component, "value", None) for name, component in ui.fields[mode].items()}
    out.update(overrides)
    return out


def test_tabs_sections_and_isolated_failures(ui_with_extensions):
    blocks, manager = ui_with_extensions
    labels = [block.label for block in blocks.blocks.values() if isinstance(block, gr.Tab)]
    assert labels[-4:] == ["My tab", "Extensions", "Image browser", "Settings"]
    ui = blocks.webui
    mapped = {v for v in ui.components["extension_fields"].values()}
    assert ("xyz-plot", "x_type") in mapped and ("prompt-matrix", "enabled") in mapped
    assert manager.get("badui").status == "failed" and "cannot build" in manager.get("badui").error
    table = extensions_tab.rows(manager)
    by_id = {row[0]: row for row in table}
    assert by_id["broken"][4] == "failed" and "ModuleNotFoundError" in by_id["broken"][5]
    assert by_id["xyz-plot"][4] == "enabled"
    assert "url" not in ui.components["extensions"]  # install from URL is off unless the launcher allows it


def test_section_values_become_extension_args(ui_with_extensions):
    blocks, _ = ui_with_extensions
    ui = blocks.webui
    names = {v: k for k, v in ui.components["extension_fields"].items() if k in ui.fields["txt2img"]}
    fields = values(ui, "txt2img", prompt="a red square", steps=2, width=64, height=64, seed=3,
                    sampler="Euler")
    fields.update({names[("xyz-plot", "enabled")]: True, names[("xyz-plot", "x_type")]: "Steps",
                   names[("xyz-plot", "x_values")]: "2, 3"})
    plain, args = extensions_tab.split_fields(ui, fields)
    assert args["xyz-plot"]["x_values"] == "2, 3" and args["prompt-matrix"]["enabled"] is False
    assert not any(name.startswith("ext_") for name in plain)
    images, infotext, last, _ = ui.generate("txt2img", fields, request=gr.Request(session_hash="s"))
    assert len(images) == 3 and len(last["seeds"]) == 3


def test_enable_disable_and_reload_handlers(ui_with_extensions):
    _, manager = ui_with_extensions
    table, text = extensions_tab.toggle(manager, "prompt-matrix", False)
    assert "disabled" in text and {r[0]: r[4] for r in table}["prompt-matrix"] == "disabled"
    table, _, text = extensions_tab.reload_handler(manager)
    assert {r[0]: r[4] for r in table}["prompt-matrix"] == "disabled"  # persisted
    extensions_tab.toggle(manager, "prompt-matrix", True)
    assert manager.get("prompt-matrix").status == "enabled"
    with pytest.raises(gr.Error):
        extensions_tab.toggle(manager, None, True)
