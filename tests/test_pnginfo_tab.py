"""The PNG Info tab against a fake engine: what it shows, and what "Send to" fills."""

from __future__ import annotations

import json

import gradio as gr
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_metadata_read import A1111_TEXT, COMFY_PROMPT
from test_webui import FakeEngine, fake_request, values

from webui.app import build_ui
from webui.tabs import pnginfo as pnginfo_tab


@pytest.fixture
def ui():
    return build_ui(FakeEngine()).webui


def saved_png(path, **chunks) -> str:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(path, pnginfo=info)
    return str(path)


def by_name(ui, mode, updates):
    return {name: updates[component] for name, component in ui.fields[mode].items() if component in updates}


def test_describe_shows_format_fields_and_raw(tmp_path):
    summary, rows, text, raw = pnginfo_tab.describe(saved_png(tmp_path / "c.png", prompt=json.dumps(COMFY_PROMPT)))
    assert summary == "**Format:** ComfyUI"
    assert ["Sampler", "DPM++ 2M"] in rows and ["Schedule type", "Karras"] in rows
    assert ["Size", "512x768"] in rows and not any(key.startswith("Size-") for key, _ in rows)
    assert "Steps: 24" in text and '"KSampler"' in raw


def test_describe_without_metadata_or_image(tmp_path):
    summary, rows, text, _ = pnginfo_tab.describe(saved_png(tmp_path / "plain.png"))
    assert pnginfo_tab.NOTHING_FOUND in summary and rows == [] and text == ""
    (tmp_path / "junk.png").write_bytes(b"not a png")
    summary, rows, _, _ = pnginfo_tab.describe(str(tmp_path / "junk.png"))
    assert "Not an image" in summary and rows == []
    assert pnginfo_tab.describe(None) == ("", [], "", "")


def test_send_to_txt2img_and_img2img_fill_the_fields(ui, tmp_path):
    path = saved_png(tmp_path / "a.png", parameters=A1111_TEXT)
    _, _, text, _ = pnginfo_tab.describe(path)
    got = by_name(ui, "txt2img", pnginfo_tab.send_values(ui, "txt2img", text, path, "sd15"))
    assert got["prompt"] == "a castle on a hill, <lora:add_detail:0.8>" and got["negative_prompt"] == "blurry, lowres"
    assert (got["steps"], got["sampler"], got["schedule_type"], got["cfg_scale"]) == (28, "DPM++ 2M", "Karras", 6.5)
    assert (got["seed"], got["width"], got["height"], got["clip_skip"]) == (1234567890, 512, 768, 2)
    assert "init_image" not in got

    got = by_name(ui, "img2img", pnginfo_tab.send_values(ui, "img2img", text, path, "sd15"))
    assert got["steps"] == 28 and got["init_image"].size == (48, 32) and got["init_image"].mode == "RGB"
    got = by_name(ui, "inpaint", pnginfo_tab.send_values(ui, "inpaint", text, path, "sd15"))
    assert got["inpaint_image"]["background"].size == (48, 32) and got["inpaint_image"]["layers"] == []


def test_send_to_upscale_fills_image_and_sd_upscale_prompt(ui, tmp_path):
    path = saved_png(tmp_path / "a.png", parameters=A1111_TEXT)
    updates = pnginfo_tab.send_values(ui, "upscale", A1111_TEXT, path, "sd15")
    sd = ui.fields["sd_upscale"]
    assert updates[ui.fields["upscale"]["image"]].size == (48, 32)
    assert updates[sd["prompt"]].startswith("a castle") and updates[sd["steps"]] == 28
    assert sd["seed"] not in updates and sd["width"] not in updates  # they mean other things there


def test_send_without_parameters_says_so(ui, monkeypatch):
    shown = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: shown.append(message))
    assert pnginfo_tab.send_values(ui, "txt2img", "", None, "sd15") == {}
    assert shown == [pnginfo_tab.NOTHING_FOUND]


def test_buttons_switch_tab_then_fill(ui):
    blocks = ui.blocks
    parts = ui.components["pnginfo"]
    assert set(parts["buttons"]) == {"txt2img", "img2img", "inpaint", "upscale"}
    names = {fn.name for fn in blocks.fns.values()}
    assert {"pnginfo_show_txt2img", "pnginfo_send_txt2img", "pnginfo_send_upscale"} <= names


def test_clip_skip_is_a_header_value_every_tab_sends(ui):
    clip_skip = ui.components["clip_skip"]
    assert all(ui.fields[mode]["clip_skip"] is clip_skip for mode in ("txt2img", "img2img", "inpaint"))
    ui.generate("txt2img", values(ui, "txt2img", prompt="p", steps=2, width=64, height=64, clip_skip=2),
                request=fake_request("s"))
    assert ui.engine.requests[-1].clip_skip == 2
