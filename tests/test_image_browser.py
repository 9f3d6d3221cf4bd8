"""The Image browser tab against a fake engine: pages, search, the selected image's parameters,
Send to, delete into the trash and emptying it."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime

import gradio as gr
import pytest
from PIL import Image
from test_webui import FakeEngine

from pipelines.core.outputs import save_image
from webui.app import build_ui
from webui.tabs import pnginfo


def saved(outdir, folder: str, day: int, seed: int, prompt: str):
    text = (f"{prompt}\nNegative prompt: fog\n"
            f"Steps: 7, Sampler: Euler a, CFG scale: 6, Seed: {seed}, Size: 64x64, Model: sd15")
    path = save_image(Image.new("RGB", (64, 64), (seed % 256, 80, 160)), outdir, folder, seed=seed, infotext=text,
                      now=datetime(2026, 11, day, 9))
    os.utime(path, (1_800_000_000 + day * 100 + seed % 100,) * 2)  # later day, higher seed: newer
    return path


@pytest.fixture
def engine(tmp_path):
    engine = FakeEngine(data_dir=tmp_path)
    out = engine.paths.outdir
    saved(out, "txt2img-images", 1, 101, "a red fox")
    saved(out, "txt2img-images", 2, 202, "a blue whale")
    saved(out, "img2img-images", 2, 203, "a red barn")
    saved(out, "txt2img-grids", 3, 304, "grid of foxes")
    return engine


@pytest.fixture
def ui(engine):
    return build_ui(engine).webui


def shown(ui, folder="All", date="All", query="", page=1):
    """(file names, page, label, date choices) as the tab shows them."""
    items, names, page, label, dates, *_ = ui.browser_tab.show(folder, date, query, page)
    assert [caption for _, caption in items] == [n.rsplit("/", 1)[1] for n in names]
    return names, page, label, [c[0] for c in dates.choices]


def select(ui, names, index):
    return ui.browser_tab.select(gr.SelectData(None, {"index": index, "value": None}), names)


def test_lists_every_folder_newest_first_with_dates(ui):
    names, page, label, dates = shown(ui)
    assert names == ["txt2img-grids/2026-11-03/00000-304.png", "img2img-images/2026-11-02/00000-203.png",
                     "txt2img-images/2026-11-02/00000-202.png", "txt2img-images/2026-11-01/00000-101.png"]
    assert (page, label) == (1, "Page 1 of 1 · 4 images")
    assert dates == ["All", "2026-11-03", "2026-11-02", "2026-11-01"]
    names, _, _, dates = shown(ui, folder="txt2img-images")
    assert len(names) == 2 and dates == ["All", "2026-11-02", "2026-11-01"]
    assert shown(ui, folder="txt2img-images", date="2026-11-01")[0] == ["txt2img-images/2026-11-01/00000-101.png"]


def test_pages_and_a_page_past_the_end(engine, ui):
    for seed in range(40):
        saved(engine.paths.outdir, "extras-images", 4, 1000 + seed, f"upscale {seed}")
    names, page, label, _ = shown(ui)
    assert len(names) == 36 and label == "Page 1 of 2 · 44 images · showing 36"
    names, page, _, _ = shown(ui, page=7)
    assert page == 2 and len(names) == 8
    assert ui.browser_tab.show_handler(-1)(page=2)[2] == 1 and ui.browser_tab.show_handler(1)(page=1)[2] == 2
    assert ui.browser_tab.show_handler(None)(page=2)[2] == 1  # a new folder or date starts at page 1


def test_search_by_prompt_seed_and_model(ui):
    assert len(shown(ui, query="red")[0]) == 2
    assert shown(ui, query="202")[0] == ["txt2img-images/2026-11-02/00000-202.png"]
    assert len(shown(ui, query="sd15")[0]) == 4
    assert shown(ui, query="zebra")[2] == "No images found."


def test_the_selected_image_shows_its_parameters(ui):
    names = shown(ui)[0]
    last, name, text = select(ui, names, 2)
    assert last == {"selected": 2} and names[2] in name
    assert text.startswith("a blue whale\nNegative prompt: fog") and "Seed: 202" in text
    assert select(ui, names, 99) == ({}, "Select an image to see how it was made.", "")


def test_send_to_txt2img_and_img2img_carry_the_image_and_its_parameters(ui):
    items, *_ = ui.browser_tab.show("All", "All", "whale", 1)
    gallery = [(path, caption) for path, caption in items]
    updates = pnginfo.gallery_send_handler(ui, "txt2img")(gallery=gallery, last={"selected": 0}, checkpoint="sd15")
    fields = ui.fields["txt2img"]
    assert updates[fields["prompt"]] == "a blue whale" and updates[fields["seed"]] == 202
    assert updates[fields["steps"]] == 7
    updates = pnginfo.gallery_send_handler(ui, "img2img")(gallery=gallery, last={"selected": 0}, checkpoint="sd15")
    image = updates[ui.fields["img2img"]["init_image"]]
    assert image.size == (64, 64) and image.getpixel((0, 0)) == (202, 80, 160)


def test_delete_moves_the_selected_image_into_the_trash_and_empty_trash_removes_it(engine, ui):
    names = shown(ui)[0]
    trash_line = ui.browser_tab.delete(names, {"selected": 1})
    assert "Trash: 1 image" in trash_line
    assert (engine.paths.outdir / "trash" / names[1]).is_file()
    assert names[1] not in shown(ui)[0] and len(shown(ui)[0]) == 3
    assert ui.browser_tab.empty_trash() == "" and not (engine.paths.outdir / "trash").exists()


def test_delete_without_a_selection_is_a_message(ui):
    with pytest.raises(gr.Error, match="Select an image"):
        ui.browser_tab.delete(shown(ui)[0], {})


def test_an_empty_outputs_folder(tmp_path):
    ui = build_ui(FakeEngine(data_dir=tmp_path)).webui
    names, page, label, dates = shown(ui)
    assert (names, page, label, dates) == ([], 1, "No images found.", ["All"])


def test_a_hosted_demo_does_not_show_the_visitors_images(tmp_path):
    engine = FakeEngine(data_dir=tmp_path)
    engine.settings = replace(engine.settings, hosted=True)
    ui = build_ui(engine).webui
    assert "browser" not in ui.components
