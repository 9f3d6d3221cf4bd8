"""The page's finish against a fake engine (issue 23): sizes that snap to 8, "Send to" under
every gallery, icons that need no emoji font, the Generate button while a job runs, the brush
in proportion to the image, and the console's start-up lines."""

from __future__ import annotations

import argparse
import unicodedata

import gradio as gr
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_metadata_read import A1111_TEXT
from test_webui import FakeEngine, fake_request, values

from webui import cli
from webui.app import build_ui, page_css, page_script
from webui.common import BUSY_LABEL, GENERATE_LABEL, TOOL_ICONS, snap_size
from webui.tabs import pnginfo
from webui.tabs.generation import GenerationTabs, brush_size_for


# Buttons of modules this change does not own that still carry an emoji (see the report to the lead).
@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def ui(engine):
    return build_ui(engine).webui


def by_name(ui, mode, updates):
    return {name: updates[component] for name, component in ui.fields[mode].items() if component in updates}


def saved_png(path, text: str | None) -> str:
    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(path, pnginfo=info)
    return str(path)


# --- item 4: sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize("typed, snapped", [(63, 64), (70, 72), (100, 104), (511, 512), (512, 512), (67.0, 64)])
def test_sizes_snap_to_the_nearest_multiple_of_8(typed, snapped):
    assert snap_size(typed) == snapped


def test_a_size_that_is_no_multiple_of_8_generates_at_the_snapped_size(ui, engine):
    ui.generate("txt2img", values(ui, "txt2img", width=63, height=70), request=fake_request("s"))
    req = engine.requests[-1]
    assert (req.width, req.height) == (64, 72)


def test_a_size_out_of_range_still_names_the_field(ui, engine):
    with pytest.raises(gr.Error, match=r"\(width\)"):
        ui.generate("txt2img", values(ui, "txt2img", width=4096), request=fake_request("s"))
    assert engine.requests == []


# --- item 2: Send to under every gallery ---------------------------------------------------------

def test_every_gallery_has_send_to_buttons(ui):
    for source, targets in (("txt2img", {"img2img", "inpaint", "upscale"}),
                            ("img2img", {"txt2img", "img2img", "inpaint", "upscale"}),
                            ("inpaint", {"img2img", "inpaint", "upscale"}),
                            ("upscale", {"img2img", "inpaint", "upscale"})):
        buttons = ui.components[source]["send"]
        assert set(buttons) == targets, source
        assert all(button.elem_id == f"{source}_send_{mode}" for mode, button in buttons.items())


def test_gallery_send_carries_the_selected_image_and_its_parameters(ui, tmp_path):
    plain = saved_png(tmp_path / "plain.png", None)
    made = saved_png(tmp_path / "made.png", A1111_TEXT)
    gallery = [(plain, None), (made, None)]
    send = pnginfo.gallery_send_handler(ui, "img2img")
    got = by_name(ui, "img2img", send(gallery=gallery, last={"selected": 1}, checkpoint="sd15"))
    assert got["prompt"] == "a castle on a hill, <lora:add_detail:0.8>" and got["steps"] == 28
    assert got["init_image"].size == (48, 32)

    # an image saved without parameters: the tab's last result says them
    last = {"selected": 0, "infotexts": ["a red fox\nSteps: 7, Sampler: Euler a, CFG scale: 5, Seed: 3, Size: 48x32"]}
    got = by_name(ui, "inpaint", pnginfo.gallery_send_handler(ui, "inpaint")(gallery, last, "sd15"))
    assert got["prompt"] == "a red fox" and got["steps"] == 7
    assert got["inpaint_image"]["background"].size == (48, 32)

    sd = ui.fields["sd_upscale"]
    updates = pnginfo.gallery_send_handler(ui, "upscale")(gallery, {"selected": 1}, "sd15")
    assert updates[ui.fields["upscale"]["image"]].size == (48, 32) and updates[sd["steps"]] == 28


def test_sending_from_an_empty_gallery_says_so():
    with pytest.raises(gr.Error, match="gallery is empty"):
        pnginfo._gallery_tab("img2img")(gallery=[])


# --- item 3: icons and tooltips -----------------------------------------------------------------

def emoji(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) == "So" or 0x1F000 <= ord(c) <= 0x1FAFF]


def test_no_button_needs_an_emoji_font_and_every_tool_button_has_a_tooltip(ui):
    buttons = [b for b in ui.blocks.blocks.values() if isinstance(b, gr.Button)]
    labelled = [(b.elem_id, b.value) for b in buttons if emoji(str(b.value or ""))]
    assert labelled == []
    tools = [b for b in buttons if "tool-button" in (b.elem_classes or [])]
    assert {b.elem_id for b in tools} >= {"txt2img_random_seed", "txt2img_reuse_seed", "inpaint_reuse_seed"}
    css, script = page_css(), page_script()
    for button in tools:
        icon = next(c for c in button.elem_classes if c.startswith("tool-icon-"))
        assert f".{icon}::before" in css and "data:image/svg+xml" in css
        assert f'"{icon}": "{TOOL_ICONS[icon.removeprefix("tool-icon-")][1]}"' in script


# --- item 5: the Generate button while a job runs --------------------------------------------------

def test_generate_button_says_a_job_runs_until_it_ends_even_after_an_error(ui):
    generate = ui.components["txt2img"]["generate"]
    fns = list(ui.blocks.fns.values())
    busy = [fn for fn in fns if fn.name == "busy_button" and generate in fn.outputs]
    idle = [fn for fn in fns if fn.name == "idle_button" and generate in fn.outputs]
    assert busy and len(idle) >= 2
    job = next(fn for fn in fns if fn.name == "generate_txt2img")
    assert {fn.trigger_only_on_failure for fn in idle if fn.trigger_after == job._id} == {True, False}
    assert busy[0].fn().value == BUSY_LABEL and busy[0].fn().interactive is False
    assert idle[0].fn().value == GENERATE_LABEL and idle[0].fn().interactive is True


# --- item 6: the inpaint brush -------------------------------------------------------------------

@pytest.mark.parametrize("size, brush", [((64, 64), 3), ((512, 512), 24), ((1024, 768), 48), ((8, 8), 1)])
def test_brush_is_in_proportion_to_the_image(size, brush):
    assert brush_size_for(size) == brush


def test_an_uploaded_image_sets_the_brush(ui):
    slider_value, editor = GenerationTabs.brush_for_image({"background": Image.new("RGB", (64, 64))})
    assert slider_value == 3 and editor["brush"].default_size == 3
    assert GenerationTabs.brush_for_image(None) == (gr.skip(), gr.skip())


# --- item 9: start-up ---------------------------------------------------------------------------

class Served:
    protocol, server_name, server_port, share_url = "http", "127.0.0.1", 7860, None


def test_console_says_the_flag_not_gradios_code():
    lines = cli.serving_lines(Served(), argparse.Namespace(api=True, share=False))
    text = "\n".join(lines)
    assert "Running on local URL:  http://127.0.0.1:7860" in text and "--share" in text
    assert "share=True" not in text and "/sdapi/v1/" in text
    assert not any("--share" in line for line in cli.serving_lines(Served(), argparse.Namespace(api=False), True))
