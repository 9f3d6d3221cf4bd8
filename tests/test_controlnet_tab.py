"""The ControlNet units of the generation tabs against the fake engine (no torch, no browser)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import gradio as gr
import pytest
from PIL import Image
from test_webui import FakeEngine, fake_request, values

from pipelines.core.control import DEFAULT_MAX_UNITS, NO_MODEL, ControlUnit
from pipelines.core.request import RequestError
from webui import control_fields, convert
from webui.app import build_ui
from webui.tabs import controlnet

UNIT_FIELDS = {f.name for f in dataclasses.fields(ControlUnit)} - {"mask"}  # the mask is the API's only


@dataclass
class FakeControlModel:
    """A models/ControlNet file as the engine lists it (the ModelFileInfo fields the tab reads)."""

    name: str
    short_hash: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name


class ControlEngine(FakeEngine):
    """The fake engine with one control model and a preprocessor whose weights are missing."""

    def __init__(self):
        super().__init__()
        self.control_files = [FakeControlModel("control_canny.safetensors", "abcd1234", {"family": "SD 1.x"})]

    def control_preprocessors(self):
        return [*super().control_preprocessors(),
                {"name": "depth_midas", "available": False,
                 "missing": "put dpt_hybrid-midas-501f0c75.pt in models/ControlNet-annotators"}]


@pytest.fixture
def engine():
    return ControlEngine()


@pytest.fixture
def ui(engine):
    return build_ui(engine).webui


def unit(index: int, **settings) -> dict:
    return {control_fields.control_field(index, name): value for name, value in settings.items()}


def find_fn(ui, name: str):
    fns = [fn for fn in ui.blocks.fns.values() if fn.name == name]
    assert len(fns) == 1, name
    return fns[0]


def test_each_generation_tab_has_the_units_with_every_field(ui, engine):
    for mode in ("txt2img", "img2img", "inpaint"):
        units = ui.components[f"{mode}_controlnet"]
        assert len(units) == DEFAULT_MAX_UNITS == engine.max_control_units
        names = set(ui.fields[mode])
        for index in range(DEFAULT_MAX_UNITS):
            assert {control_fields.control_field(index, name) for name in UNIT_FIELDS} <= names
            # only where there is an input image to use
            assert (control_fields.control_field(index, "use_input") in names) == (mode != "txt2img")
    blocks = ui.blocks.blocks.values()
    tabs = [b.label for b in blocks if isinstance(b, gr.Tab) and (b.elem_id or "").startswith("txt2img_controlnet")]
    assert tabs == ["ControlNet Unit 0", "ControlNet Unit 1", "ControlNet Unit 2"]
    model = ui.fields["txt2img"]["controlnet_0_model"]
    assert model.value == NO_MODEL
    assert model.choices == [(NO_MODEL, NO_MODEL), ("control_canny [abcd1234]", "control_canny.safetensors")]
    module = ui.fields["txt2img"]["controlnet_0_module"]
    assert module.value == "none"
    # not hidden: marked, and picking it says which file goes where
    assert ("depth_midas (weights missing)", "depth_midas") in module.choices
    refresh = ui.components["txt2img_controlnet"][0]["refresh"]
    assert "tool-icon-refresh" in refresh.elem_classes  # an SVG icon with a tooltip, not an emoji
    notes = [b.value for b in blocks if isinstance(b, gr.Markdown) and b.elem_id == "txt2img_controlnet_note"]
    assert notes and "not stored in the PNG" in notes[0]


def test_generate_with_unit_0_sends_the_uis_values(ui, engine):
    picture = Image.new("RGBA", (48, 40), (255, 0, 0, 128))
    fields = values(ui, "txt2img", steps=2, width=64, height=64, **unit(
        0, enabled=True, image=picture, module="canny", model="control_canny.safetensors", weight=0.65,
        guidance_start=0.1, guidance_end=0.8, control_mode="ControlNet is more important",
        resize_mode="Just Resize", pixel_perfect=True, processor_res=256.0, threshold_a=80.0, threshold_b=160.0))
    ui.generate("txt2img", fields, request=fake_request("s"))
    (got,) = engine.requests[-1].control_units
    assert (got.enabled, got.module, got.model, got.weight) == (True, "canny", "control_canny.safetensors", 0.65)
    assert (got.guidance_start, got.guidance_end, got.pixel_perfect, got.processor_res) == (0.1, 0.8, True, 256)
    assert (got.control_mode, got.resize_mode) == ("ControlNet is more important", "Just Resize")
    assert (got.threshold_a, got.threshold_b) == (80, 160)
    assert got.image.size == (48, 40) and got.image.mode == "RGB"  # transparency flattened, as the input image is
    # a preprocessor without thresholds: the hidden sliders' last values are not sent
    ui.generate("txt2img", {**fields, **unit(0, module="invert")}, request=fake_request("s"))
    got = engine.requests[-1].control_units[0]
    assert (got.module, got.threshold_a, got.threshold_b) == ("invert", None, None)


def test_units_keep_their_places_and_disabled_ones_are_not_checked(ui, engine):
    fields = values(ui, "txt2img", steps=2, width=64, height=64,
                    **unit(0, enabled=False, weight=7),  # out of range, but off: not checked
                    **unit(1, enabled=True, image=Image.new("RGB", (8, 8)), model="control_canny.safetensors"))
    ui.generate("txt2img", fields, request=fake_request("s"))
    first, second = engine.requests[-1].control_units  # unit 2 (off, after the last enabled one) is left out
    assert first.enabled is False and not first.active
    assert second.enabled and second.model == "control_canny.safetensors" and second.active
    ui.generate("txt2img", values(ui, "txt2img", steps=2, width=64, height=64), request=fake_request("s"))
    assert engine.requests[-1].control_units == ()  # nothing enabled: no units


@pytest.mark.parametrize("settings, where", [
    ({"weight": 5}, "ControlNet Unit 1: Control weight (weight)"),
    ({"guidance_start": 0.9, "guidance_end": 0.2}, "ControlNet Unit 1: Starting control step (guidance_start)"),
    ({"resize_mode": "Stretch"}, "ControlNet Unit 1: Resize mode (resize_mode)"),
])
def test_a_bad_value_names_the_unit_and_its_field(ui, engine, settings, where):
    fields = values(ui, "txt2img", **unit(0, enabled=True, weight=0.5),
                    **unit(1, enabled=True, image=Image.new("RGB", (8, 8)), **settings))
    with pytest.raises(gr.Error) as info:
        ui.generate("txt2img", fields, request=fake_request("s"))
    assert info.value.message.startswith(where)
    assert engine.requests == []


def test_the_engines_unit_errors_name_the_ui_unit(ui, engine):
    engine.error = RequestError("control_units[2].model", "no control model 'x' in models/ControlNet")
    with pytest.raises(gr.Error) as info:
        ui.generate("txt2img", values(ui, "txt2img", steps=2), request=fake_request("s"))
    assert info.value.message == "ControlNet Unit 2: Model (model): no control model 'x' in models/ControlNet"


def test_use_the_img2img_input(ui, engine):
    own = Image.new("RGB", (16, 16), "white")
    init = Image.new("RGB", (64, 64), "blue")
    base = dict(init_image=init, steps=2, width=64, height=64, denoising_strength=0.5)
    cases = [({"use_input": True, "image": own}, None),  # ticked: the input image even with one uploaded
             ({"use_input": False, "image": None}, None),  # nothing uploaded: the input image as well
             ({"use_input": False, "image": own}, own)]
    for settings, expected in cases:
        ui.generate("img2img", values(ui, "img2img", **base, **unit(0, enabled=True, **settings)),
                    request=fake_request("s"))
        assert engine.requests[-1].control_units[0].image is expected


def test_preview_shows_the_preprocessed_map_at_the_tabs_size(ui, engine):
    preview = find_fn(ui, "txt2img_controlnet_1_preview")
    assert {"width", "height"} <= set(preview.input_parameter_names)
    assert preview.outputs == [ui.components["txt2img_controlnet"][1]["preview"]]
    picture = Image.new("RGB", (30, 20), "green")
    inputs = dict(zip(preview.input_parameter_names, (c.value for c in preview.inputs)))
    shown = preview.fn(**{**inputs, "width": 96, "height": 64, **unit(1, image=picture, module="invert")})
    (called, width, height), = engine.previews
    assert (width, height) == (96, 64) and shown.size == (96, 64)
    assert called.module == "invert" and called.image is picture  # the unit need not be enabled to preview
    with pytest.raises(gr.Error) as info:
        preview.fn(**inputs)  # txt2img, no image: the engine names the field, the tab the unit
    assert info.value.message.startswith("ControlNet Unit 1: Control image (image):")


def test_preview_in_inpaint_uses_the_editors_picture(ui, engine):
    editor = {"background": Image.new("RGBA", (64, 64), (0, 0, 255, 255)), "layers": [], "composite": None}
    inputs = {name: getattr(c, "value", None) for name, c in ui.fields["inpaint"].items()
              if name.startswith("controlnet_0_")}
    shown = controlnet.preview_handler(ui, "inpaint", 0)(width=64, height=64, inpaint_image=editor, **inputs)
    assert shown.getpixel((0, 0)) == (0, 0, 255)


def test_picking_a_preprocessor_without_weights_says_what_is_missing(ui):
    table = ui.components["txt2img_controlnet"][0]["preprocessors"]
    shown = controlnet.missing_text(table, "depth_midas")
    assert shown["visible"] and "dpt_hybrid-midas-501f0c75.pt" in shown["value"]
    assert controlnet.missing_text(table, "canny")["visible"] is False


def test_refresh_reads_the_model_folder_again(ui, engine):
    engine.control_files.append(FakeControlModel("t2i_depth.safetensors"))
    update = controlnet.refresh_models(engine, "control_canny.safetensors")
    assert ("t2i_depth", "t2i_depth.safetensors") in update["choices"]
    assert update["value"] == "control_canny.safetensors"
    engine.control_files.clear()
    assert controlnet.refresh_models(engine, "control_canny.safetensors")["value"] == NO_MODEL


def test_the_preprocessor_sets_its_sliders(ui):
    changed = find_fn(ui, "img2img_controlnet_1_module_changed")
    sliders = [ui.fields["img2img"][f"controlnet_1_{name}"] for name in controlnet.SLIDERS]
    assert changed.outputs == [*sliders, ui.components["img2img_controlnet"][1]["missing"]]
    assert [slider.visible for slider in sliders] == [False, False, False]  # "none": no sliders
    resolution, low, high, missing = changed.fn(module="canny", pixel_perfect=False)
    assert (low["label"], low["minimum"], low["maximum"], low["value"], low["visible"]) == (
        "Canny Low Threshold", 1, 255, 100, True)
    assert (high["label"], high["value"]) == ("Canny High Threshold", 200)
    assert resolution["visible"] and resolution["value"] == 512 and missing["visible"] is False
    resolution, a, b, _ = changed.fn(module="tile_resample", pixel_perfect=False)
    assert not resolution["visible"] and a["label"] == "Down Sampling Rate" and a["step"] == 0.01
    assert not b["visible"]
    # Pixel Perfect picks the resolution from the output size: its slider goes away
    assert changed.fn(module="canny", pixel_perfect=True)[0]["visible"] is False
    toggled = find_fn(ui, "img2img_controlnet_1_pixel_perfect_changed")
    assert toggled.outputs == [sliders[0]]
    assert toggled.fn(module="canny", pixel_perfect=True)["visible"] is False
    assert toggled.fn(module="canny", pixel_perfect=False)["visible"] is True
    assert toggled.fn(module="none", pixel_perfect=False)["visible"] is False


TEXT_WITH_UNITS = (
    'a house\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, '
    'ControlNet 0: "Module: canny, Model: control_canny [abcd1234], Weight: 0.7, Resize Mode: Just Resize, '
    'Processor Res: 256, Threshold A: 90, Threshold B: 180, Guidance Start: 0.1, Guidance End: 0.9, '
    'Pixel Perfect: True, Control Mode: My prompt is more important", '
    'ControlNet 2: "Module: invert, Model: t2i_sketch [99999999], Weight: 1.2, Resize Mode: Resize and Fill, '
    'Processor Res: 512, Threshold A: -1, Threshold B: -1, Guidance Start: 0, Guidance End: 1, '
    'Pixel Perfect: False, Control Mode: Balanced"')


def test_read_parameters_fills_the_units_but_not_their_images(ui, engine):
    fields = ui.fields["txt2img"]
    updates = ui.read_parameters("txt2img", TEXT_WITH_UNITS, last=None, checkpoint="sd15")
    got = {name: updates[component] for name, component in fields.items()
           if component in updates and name.startswith("controlnet_")}
    assert {name: got[f"controlnet_0_{name}"] for name in (
        "enabled", "module", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
        "guidance_start", "guidance_end", "pixel_perfect", "control_mode")} == {
        "enabled": True, "module": "canny", "weight": 0.7, "resize_mode": "Just Resize", "processor_res": 256,
        "threshold_a": 90, "threshold_b": 180, "guidance_start": 0.1, "guidance_end": 0.9, "pixel_perfect": True,
        "control_mode": "My prompt is more important"}
    assert got["controlnet_1_enabled"] is False  # the text skips unit 1: it was off
    third = (got["controlnet_2_enabled"], got["controlnet_2_module"], got["controlnet_2_weight"])
    assert third == (True, "invert", 1.2)
    assert not any(name.endswith("_image") for name in got)  # the PNG has no control image
    # generating with what was pasted sends those units
    ui.generate("txt2img", values(ui, "txt2img", **got), request=fake_request("s"))
    first, second, third = engine.requests[-1].control_units
    assert (first.module, first.weight, first.threshold_a, second.enabled, third.resize_mode) == (
        "canny", 0.7, 90, False, "Resize and Fill")


def test_a_pasted_model_is_matched_in_the_model_list(engine):
    found = convert.ui_values_from_infotext(TEXT_WITH_UNITS, control_models=engine.control_models())
    assert found["controlnet_0_model"] == "control_canny.safetensors"  # listed: by its title
    assert found["controlnet_2_model"] == "t2i_sketch [99999999]"  # not listed: as the text names it
    rehashed = [FakeControlModel("control_canny.safetensors", "0123456789")]  # the extension's old hash
    found = convert.ui_values_from_infotext(TEXT_WITH_UNITS, control_models=rehashed)
    assert found["controlnet_0_model"] == "control_canny.safetensors"  # by its stem
    # the extension's texts may name the preprocessor by its label
    found = convert.ui_values_from_infotext(TEXT_WITH_UNITS.replace("Module: canny", "Module: softedge_hed"))
    assert found["controlnet_0_module"] == "hed"
    labels = {value: label for label, value in controlnet.preprocessor_choices({"hed": {}, "canny": {}})}
    assert labels == {"hed": "softedge_hed", "canny": "canny"}
