"""Image prompts (IP-Adapter) in the generation tabs against the fake engine (no torch, no browser):
the accordion's prompts become ip-adapter control units after the ControlNet units, bad values name
the prompt's component, the accordion says which files are missing and where they go, and pasted
parameters fill the prompts from the infotext's ControlNet entries."""

from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image
from test_controlnet_tab import ControlEngine, FakeControlModel
from test_webui import fake_request, values

from pipelines.core.control import ControlUnit
from pipelines.core.control_infotext import control_params
from pipelines.core.infotext import build_infotext
from pipelines.core.request import RequestError
from webui import control_fields, convert
from webui.app import build_ui
from webui.tabs import generation, image_prompts

WIRED = "image_prompts" in vars(generation)  # the lead adds the accordion to the tabs
needs_wiring = pytest.mark.skipif(not WIRED, reason="webui/tabs/generation.py does not build the accordion yet")

ADAPTER = FakeControlModel("ip-adapter_sd15.safetensors", "0a1b2c3d4e", {
    "control_type": "ip_adapter", "family_label": "SD 1.x", "image_encoder": "CLIP-ViT-H.safetensors"})
ADAPTER_XL = FakeControlModel("ip-adapter_sdxl.safetensors", None, {
    "control_type": "ip_adapter", "family_label": "SDXL",
    "missing": "ip-adapter_sdxl.safetensors needs a CLIP vision encoder of projection width 1280: put that file "
               "into models/clip_vision"})


class PromptEngine(ControlEngine):
    """The fake engine with a ControlNet model and two IP-Adapters, one without its image encoder."""

    def __init__(self, adapters=(ADAPTER, ADAPTER_XL)):
        super().__init__()
        self.control_files = [*self.control_files, *adapters]


@pytest.fixture
def engine():
    return PromptEngine()


@pytest.fixture
def ui(engine):
    return build_ui(engine).webui


def prompt(index: int, **settings) -> dict:
    return {control_fields.image_prompt_field(index, name): value for name, value in settings.items()}


def picture(colour=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", (40, 32), colour)


# --- pure translations ----------------------------------------------------------------------------

def test_prompts_with_an_image_become_ip_adapter_units_in_order():
    units = control_fields.image_prompt_units({
        0: {"image": picture(), "model": ADAPTER.name, "weight": 0.7, "start": 0.1, "end": 0.9},
        1: {"image": None, "model": ADAPTER.name, "weight": 1.0, "start": 0.0, "end": 1.0},  # no image: off
        2: {"image": picture((0, 0, 255)).convert("RGBA"), "model": ADAPTER_XL.name, "weight": 1.2,
            "start": 0.0, "end": 0.5},
    })
    assert [(u.module, u.model, u.weight, u.guidance_start, u.guidance_end) for u in units] == [
        ("ip-adapter-auto", ADAPTER.name, 0.7, 0.1, 0.9), ("ip-adapter-auto", ADAPTER_XL.name, 1.2, 0.0, 0.5)]
    assert units[1].image.mode == "RGB" and units[1].image.getpixel((0, 0)) == (0, 0, 255)
    assert all(unit.active for unit in units)


@pytest.mark.parametrize("settings, field, words", [
    ({"model": "None"}, "image_prompt_1_model", "IP-Adapter model"),
    ({"weight": 2.5}, "image_prompt_1_weight", "2"),
    ({"start": 0.8, "end": 0.2}, "image_prompt_1_start", "guidance_end"),
])
def test_a_bad_value_names_the_prompts_component(settings, field, words):
    good = {"image": picture(), "model": ADAPTER.name, "weight": 1.0, "start": 0.0, "end": 1.0}
    with pytest.raises(RequestError) as caught:
        control_fields.image_prompt_units({0: good, 1: {**good, **settings}})
    assert caught.value.field == field and words in caught.value.message
    label = control_fields.IMAGE_PROMPT_LABELS[field.rsplit("_", 1)[1]]
    assert convert.error_message(caught.value).startswith(f"Image prompt 2: {label} (")


def test_the_dropdown_lists_only_usable_adapters_with_their_family():
    infos = [*ControlEngine().control_files, ADAPTER, ADAPTER_XL,
             FakeControlModel("broken.safetensors", None, {"control_type": "ip_adapter", "error": "FaceID"})]
    assert control_fields.image_prompt_models(infos) == [
        ("ip-adapter_sd15 [0a1b2c3d4e] (SD 1.x)", ADAPTER.name), ("ip-adapter_sdxl (SDXL)", ADAPTER_XL.name)]


def test_the_status_says_what_is_missing_and_where_it_goes():
    none = control_fields.image_prompt_status(ControlEngine().control_files, "/m/ipadapter", "/m/clip_vision")
    assert "No IP-Adapter model found" in none and "/m/ipadapter" in none and "/m/clip_vision" in none
    encoder = control_fields.image_prompt_status([ADAPTER, ADAPTER_XL], "/m/ipadapter", "/m/clip_vision")
    assert "No image encoder" in encoder and "ip-adapter_sdxl.safetensors needs" in encoder
    assert "ip-adapter_sd15" not in encoder
    assert control_fields.image_prompt_status([ADAPTER], "/m/ipadapter", "/m/clip_vision") == ""


def test_pasted_ip_adapter_entries_fill_the_image_prompts_and_switch_their_unit_off():
    units = (ControlUnit(module="canny", model="control_canny.safetensors", weight=0.5),
             ControlUnit(module="ip-adapter_clip_sd15", model=ADAPTER.name, weight=0.6, guidance_end=0.7),
             ControlUnit(module="none", model=ADAPTER_XL.name, guidance_start=0.25))  # an adapter by its model
    text = build_infotext("a cat", "", {"Steps": 20, **control_params(units, {1: "ip-adapter_sd15 [0a1b2c3d4e]"})})
    values_ = control_fields.control_values_from_infotext(text, [*ControlEngine().control_files, ADAPTER,
                                                                  ADAPTER_XL])
    assert values_["controlnet_0_module"] == "canny" and values_["controlnet_0_weight"] == 0.5
    assert values_["controlnet_1_enabled"] is False and values_["controlnet_2_enabled"] is False
    assert "controlnet_1_model" not in values_
    assert {k: v for k, v in values_.items() if k.startswith("image_prompt_")} == {
        **prompt(0, model=ADAPTER.name, weight=0.6, start=0.0, end=0.7),
        **prompt(1, model=ADAPTER_XL.name, weight=1.0, start=0.25, end=1.0)}


# --- the page ----------------------------------------------------------------------------------------

@needs_wiring
def test_each_tab_has_the_accordion_with_the_adapters(ui, engine):
    for mode in ("txt2img", "img2img", "inpaint"):
        fields = ui.fields[mode]
        model = fields[control_fields.image_prompt_field(0, "model")]
        assert [value for _, value in model.choices] == [ADAPTER.name, ADAPTER_XL.name]
        assert model.value == ADAPTER.name
        assert control_fields.image_prompt_field(engine.max_control_units - 1, "image") in fields
        missing = ui.components[f"{mode}_image_prompts"]["missing"]
        assert missing.visible and "ip-adapter_sdxl.safetensors needs" in missing.value


@needs_wiring
def test_an_empty_engine_says_where_adapters_go():
    ui = build_ui(PromptEngine(adapters=())).webui
    missing = ui.components["txt2img_image_prompts"]["missing"]
    assert missing.visible and "No IP-Adapter model found" in missing.value and "ipadapter" in missing.value


@needs_wiring
def test_generate_sends_the_prompts_after_the_controlnet_units(ui, engine):
    fields = values(ui, "txt2img", steps=2, width=64, height=64,
                    **{control_fields.control_field(0, "enabled"): True,
                       control_fields.control_field(0, "model"): "control_canny.safetensors",
                       control_fields.control_field(0, "image"): picture()},
                    **prompt(1, image=picture((0, 255, 0)), weight=0.4, end=0.6))
    ui.generate("txt2img", fields, request=fake_request("s"))
    canny, image_prompt = engine.requests[-1].control_units
    assert canny.model == "control_canny.safetensors"
    assert (image_prompt.module, image_prompt.model, image_prompt.weight, image_prompt.guidance_end) == (
        "ip-adapter-auto", ADAPTER.name, 0.4, 0.6)
    assert image_prompt.image.getpixel((0, 0)) == (0, 255, 0)


@needs_wiring
def test_a_bad_prompt_is_a_toast_naming_it_and_nothing_runs(ui, engine):
    fields = values(ui, "img2img", init_image=picture(), **prompt(0, image=picture(), model="None"))
    with pytest.raises(gr.Error, match=r"Image prompt 1: IP-Adapter model \(model\)"):
        ui.generate("img2img", fields, request=fake_request("s"))
    assert engine.requests == []


def test_refresh_reads_the_folders_again_and_keeps_a_listed_pick(engine):
    engine.control_files = [*ControlEngine().control_files, ADAPTER_XL]  # ADAPTER was taken away
    *models, status = image_prompts.refreshed(engine, [ADAPTER.name, ADAPTER_XL.name, None])
    assert [update["value"] for update in models] == [ADAPTER_XL.name] * 3  # a gone pick falls to the first
    assert models[0]["choices"] == [("ip-adapter_sdxl (SDXL)", ADAPTER_XL.name)]
    assert status["visible"] and "No image encoder" in status["value"]


@needs_wiring
def test_paste_parameters_fill_the_prompts(ui, engine):
    units = (ControlUnit(module="ip-adapter_clip_sd15", model=ADAPTER.name, weight=0.6, guidance_end=0.7),)
    text = build_infotext("a cat", "", {"Steps": 20, "Sampler": "Euler", "CFG scale": 7, "Seed": 1,
                                        "Size": "64x64", **control_params(units, {0: "ip-adapter_sd15 [0a1b2c3d4e]"})})
    updates = ui.read_parameters("txt2img", text, last=None, checkpoint="sd15")
    fields = ui.fields["txt2img"]
    assert updates[fields[control_fields.image_prompt_field(0, "model")]] == ADAPTER.name
    assert updates[fields[control_fields.image_prompt_field(0, "weight")]] == 0.6
    assert updates[fields[control_fields.image_prompt_field(0, "end")]] == 0.7
    assert updates[fields[control_fields.control_field(0, "enabled")]] is False
