"""The "Regional prompts" accordion against the fake engine (no torch, no browser): rows become
`request.regions` by name (boxes in percent, painted masks at the picture's size), bad values name
the row's component, the preview draws the layout in colours, and pasted parameters fill the rows
and the syntax settings."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_webui import FakeEngine, fake_request, values

from pipelines.core.infotext import build_infotext
from pipelines.core.regions import Region, request_infotext_params
from pipelines.core.request import GenerationRequest, RequestError
from webui import convert, region_fields
from webui.app import build_ui
from webui.tabs import generation
from webui.tabs.regions import preview_and_problem

WIRED = "regions" in vars(generation)  # the lead adds the accordion to the tabs
needs_wiring = pytest.mark.skipif(not WIRED, reason="webui/tabs/generation.py does not build the accordion yet")


def row(index: int, **settings) -> dict:
    return {region_fields.region_field(index, name): value for name, value in settings.items()}


def sketch(size=(96, 64), box=(0, 0, 48, 64)) -> dict:
    """A sketch canvas value with `box` painted (as Gradio sends it: a transparent layer with strokes);
    `box=None`: nothing painted."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    if box is not None:
        ImageDraw.Draw(layer).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(224, 60, 60, 255))
    return {"background": Image.new("RGBA", size, (255, 255, 255, 255)), "layers": [layer], "composite": None}


def grouped(fields: dict) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for name, value in fields.items():
        index, field = region_fields.split_region_field(name)
        rows.setdefault(index, {})[field] = value
    return rows


def test_rows_with_a_prompt_become_regions_by_name():
    fields = {**row(0, prompt="a red apple", weight=0.8, shape="Box", left=0, top=10, right=50, bottom=100, mask=None),
              **row(1, prompt="", shape="Box", left=0, top=0, right=100, bottom=100),  # no prompt: off
              **row(2, prompt="a blue car", weight=1.0, shape="Mask", mask=sketch())}
    first, second = region_fields.regions_from_ui(grouped(fields), 128, 64)
    assert (first.prompt, first.box, first.weight, first.mask) == ("a red apple", (0, 0.1, 0.5, 1.0), 0.8, None)
    assert second.box is None and second.mask.size == (128, 64)  # the canvas stretched to the picture
    mask = np.asarray(second.mask)
    assert mask[:, :60].min() == 255 and mask[:, 68:].max() == 0  # the painted left half, white


@pytest.mark.parametrize("settings, field, words", [
    (dict(shape="Box", left=60, right=40), "region_1_right", "right of Left"),
    (dict(shape="Box", top=50, bottom=50), "region_1_bottom", "below Top"),
    (dict(shape="Mask", mask=None), "region_1_mask", "paint the region"),
    (dict(shape="Mask", mask=sketch(box=None)), "region_1_mask", "paint the region"),
    (dict(shape="Box", weight=1.5), "region_1_weight", "between 0 and 1"),
])
def test_a_bad_row_names_its_component(settings, field, words):
    fields = {**row(0, prompt="sky"), **row(1, prompt="sea", **settings)}
    with pytest.raises(RequestError) as caught:
        region_fields.regions_from_ui(grouped(fields), 64, 64)
    assert caught.value.field == field and words in caught.value.message
    assert region_fields.region_where(field).startswith("Region 2: ")


def test_the_preview_draws_each_region_in_its_colour():
    regions = (Region("red", box=(0, 0, 0.5, 1)), Region("blue", box=(0.5, 0, 1, 1), weight=0.5))
    request = GenerationRequest(prompt="a park", regions=regions, width=512, height=256, save_images=False)
    image = np.asarray(region_fields.layout_preview(request), dtype=int)
    assert image.shape[:2] == (192, 384)  # the canvas's aspect, scaled
    left, right = image[96, 60], image[96, 320]
    assert left[0] > left[2] + 60 and right[2] > right[0] + 60  # the first region red, the second blue


def test_the_preview_shows_the_prompts_own_layout_and_says_what_is_wrong():
    split = {"prompt": "sky ADDROW sea", "width": 64, "height": 64, "regional_mode": "Columns",
             "regional_ratios": "1,3", "regional_base_ratios": "0.2"}
    image, problem = preview_and_problem(split)
    pixels = np.asarray(image, dtype=int)
    assert pixels[40, 192][0] > pixels[40, 192][2] + 60  # the top quarter: region 1 (red)
    assert pixels[200, 192][2] > pixels[200, 192][0] + 60  # below it: region 2 (blue)
    assert problem["visible"] is False
    _, problem = preview_and_problem({**split, **row(0, prompt="x", shape="Box", left=70, top=0, right=20,
                                                     bottom=100, weight=1.0)})
    assert problem["visible"] and "Region 1: Right % (right)" in problem["value"]
    _, problem = preview_and_problem({**split, "regional_ratios": "1,x"})
    assert problem["visible"] and "regional_ratios" in problem["value"]


def test_pasted_box_regions_fill_the_rows_and_empty_the_rest():
    regions = (Region("sky", box=(0, 0, 1, 0.25)), Region("sea", box=(0, 0.25, 1, 1), weight=0.75))
    filled = region_fields.region_values(regions, 4)
    assert filled == {**row(0, prompt="sky", weight=1.0, shape="Box", left=0, top=0, right=100, bottom=25),
                      **row(1, prompt="sea", weight=0.75, shape="Box", left=0, top=25, right=100, bottom=100),
                      **row(2, prompt=""), **row(3, prompt="")}


# --- the page ----------------------------------------------------------------------------------------

@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def ui(engine):
    return build_ui(engine).webui


@needs_wiring
def test_generate_sends_the_drawn_regions_and_the_syntax_settings(ui, engine):
    fields = values(ui, "txt2img", prompt="a park", steps=2, width=96, height=64, regional_ratios="1,2",
                    **row(0, prompt="a red kite", shape="Box", left=10, top=0, right=40, bottom=50, weight=0.9),
                    **row(1, prompt="a blue lake", shape="Mask", mask=sketch()))
    ui.generate("txt2img", fields, request=fake_request("s"))
    sent = engine.requests[-1]
    assert [r.prompt for r in sent.regions] == ["a red kite", "a blue lake"]
    assert sent.regions[0].box == (0.1, 0.0, 0.4, 0.5) and sent.regions[0].weight == 0.9
    assert sent.regions[1].mask.size == (96, 64) and sent.regional_ratios == "1,2"


@needs_wiring
def test_untouched_rows_send_no_regions(ui, engine):
    ui.generate("img2img", values(ui, "img2img", init_image=Image.new("RGB", (64, 64))), request=fake_request("s"))
    assert engine.requests[-1].regions == ()


@needs_wiring
def test_a_bad_row_is_a_toast_naming_it(ui, engine):
    fields = values(ui, "txt2img", **row(2, prompt="x", shape="Box", left=50, right=50))
    with pytest.raises(gr.Error, match=r"Region 3: Right % \(right\)"):
        ui.generate("txt2img", fields, request=fake_request("s"))
    assert engine.requests == []


@needs_wiring
def test_paste_parameters_restore_the_layout(ui, engine):
    request = GenerationRequest(prompt="a park", regions=(Region("a kite", box=(0.1, 0, 0.4, 0.5), weight=0.9),),
                                width=64, height=64, save_images=False)
    params = {"Steps": 20, "Sampler": "Euler", "CFG scale": 7, "Seed": 1, "Size": "64x64",
              **request_infotext_params(request)}
    updates = ui.read_parameters("txt2img", build_infotext("a park", "", params), last=None, checkpoint="sd15")
    fields = ui.fields["txt2img"]
    got = {name: updates[fields[name]] for name in row(0, prompt=1, weight=1, left=1, top=1, right=1, bottom=1)}
    assert got == row(0, prompt="a kite", weight=0.9, left=10, top=0, right=40, bottom=50)
    assert updates[fields[region_fields.region_field(1, "prompt")]] == ""
    syntax = "sky ADDCOL sea"
    params = {**params, "RP Active": True, "RP Matrix submode": "Rows", "RP Ratios": "1,3", "RP Base Ratios": "0.2"}
    params.pop("Regions")
    updates = ui.read_parameters("txt2img", build_infotext(syntax, "", params), last=None, checkpoint="sd15")
    assert (updates[fields["regional_mode"]], updates[fields["regional_ratios"]]) == ("Rows", "1,3")
    assert convert.generation_request("txt2img", {"prompt": syntax, "regional_mode": "Rows",
                                                  "regional_ratios": "1,3"}).regional_mode == "Rows"
