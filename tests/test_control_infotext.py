"""Control units in the infotext: sd-webui-controlnet's "ControlNet <i>" entries, written with
the generation parameters and read back by the parser, PNG Info and paste-parameters."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

from pipelines.core import control_infotext, infotext
from pipelines.core.control import ControlUnit
from pipelines.core.control_infotext import control_params, units_from_params
from pipelines.core.metadata_read import read_image_metadata
from pipelines.core.request import GenerationRequest

IMAGE = Image.new("RGB", (8, 8), (255, 255, 255))
UNITS = (
    ControlUnit(image=IMAGE, module="canny", model="control_canny.safetensors", threshold_b=180),
    ControlUnit(enabled=False, image=IMAGE, module="canny", model="control_canny.safetensors"),
    ControlUnit(module="none", model="sub/t2i_depth.safetensors", weight=0.45, guidance_start=0.15, guidance_end=0.7,
                control_mode="ControlNet is more important", resize_mode="Just Resize", pixel_perfect=True,
                processor_res=768),
    ControlUnit(image=IMAGE, module="invert"),  # no model: nothing to record
)
TITLES = {0: "control_canny [abcdef0123]", 2: "t2i_depth [0011223344]"}


def infotext_of(units=UNITS, titles=TITLES) -> str:
    request = GenerationRequest(prompt="a house", negative_prompt="blurry", width=64, height=64, steps=2, seed=5,
                                control_units=units, mode="img2img", init_image=IMAGE)
    params = infotext.generation_params(request, seed=5, subseed=5, width=64, height=64, model_name="tiny",
                                        model_hash="0123456789", version="v1", control_titles=titles)
    return infotext.build_infotext(request.prompt, request.negative_prompt, params)


def test_entries_follow_the_extensions_order_and_format():
    params = infotext.parse_infotext(infotext_of())
    assert [key for key in params if key.startswith("ControlNet")] == ["ControlNet 0", "ControlNet 2"]
    # the extension's field order, display names and value spellings; canny's unset low threshold is its default
    assert params["ControlNet 0"] == (
        "Module: canny, Model: control_canny [abcdef0123], Weight: 1, Resize Mode: Crop and Resize, "
        "Processor Res: 512, Threshold A: 100, Threshold B: 180, Guidance Start: 0, Guidance End: 1, "
        "Pixel Perfect: False, Control Mode: Balanced")
    assert params["ControlNet 2"].startswith("Module: none, Model: t2i_depth [0011223344], Weight: 0.45, ")
    assert "Threshold A: -1" in params["ControlNet 2"]  # "none" has no thresholds: the extension's "unset"
    # quoted as A1111 quotes a value with commas, and the keys after them still parse
    line = infotext_of().splitlines()[-1]
    assert 'ControlNet 0: "Module: canny, Model: control_canny [abcdef0123], ' in line
    assert params["Version"] == "v1" and params["Steps"] == "2"


def test_write_parse_read_gives_the_same_unit_values():
    units = units_from_params(infotext.parse_infotext(infotext_of()))
    assert len(units) == 3 and units[1] == {"enabled": False} and units[0]["enabled"] and units[2]["enabled"]
    for index in (0, 2):
        read, written = units[index], UNITS[index]
        assert read["image"] is None and read["model"] == TITLES[index]
        for field in ("module", "weight", "resize_mode", "processor_res", "guidance_start", "guidance_end",
                      "pixel_perfect", "control_mode"):
            assert read[field] == getattr(written, field), (index, field)
    assert (units[0]["threshold_a"], units[0]["threshold_b"]) == (100, 180)  # as the preprocessor ran
    assert (units[2]["threshold_a"], units[2]["threshold_b"]) == (None, None)  # -1: the default again
    # each dict makes a unit (the UI fills the image in)
    assert ControlUnit(**units[2]).weight == 0.45


def test_the_model_is_the_callers_title_or_the_units_name():
    params = control_params(UNITS[:1])
    assert params["ControlNet 0"].startswith("Module: canny, Model: control_canny.safetensors, ")
    assert control_params(UNITS[1:2]) == {} and control_params(UNITS[3:]) == {}


def test_a_listed_models_title_is_its_stem_and_hash():
    class File:
        name, short_hash = "sub/control_v11p_sd15_canny.safetensors", "abcdef0123"

    assert control_infotext.control_model_title(File()) == "control_v11p_sd15_canny [abcdef0123]"
    File.short_hash = None
    assert control_infotext.control_model_title(File()) == "control_v11p_sd15_canny"


def test_a_pasted_title_finds_its_file():
    class File:
        def __init__(self, name, short_hash):
            self.name, self.short_hash = name, short_hash

    files = [File("control_canny.safetensors", "abcdef0123"), File("sub/t2i_depth.safetensors", None)]
    for name in ("control_canny [abcdef0123]", "control_canny.safetensors", "CONTROL_CANNY",
                 "control_canny [d14c016b]"):  # the extension's own (older) hash: by the stem
        assert control_infotext.match_control_model(files, name) is files[0], name
    assert control_infotext.match_control_model(files, "t2i_depth") is files[1]
    assert control_infotext.match_control_model(files, "control_scribble [abcdef0123]") is None


def test_png_info_and_paste_keep_the_entries_intact():
    text = infotext_of()
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("parameters", text)
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG", pnginfo=pnginfo)
    metadata = read_image_metadata(io.BytesIO(buffer.getvalue()))
    assert metadata.infotext == text
    assert metadata.fields["ControlNet 0"] == infotext.parse_infotext(text)["ControlNet 0"]
    assert units_from_params(metadata.fields)[2]["control_mode"] == "ControlNet is more important"
    # paste-parameters still reads the rest of the line
    fields = infotext.request_fields_from_infotext(text)
    assert fields["steps"] == 2 and fields["seed"] == 5 and fields["model_name"] == "tiny"


def test_texts_from_the_extension_and_its_older_versions_read_back():
    a1111 = ('a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "Module: '
             'depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], Weight: 0.8, Resize Mode: Resize and Fill, '
             'Low Vram: False, Processor Res: 384, Threshold A: -1, Threshold B: -1, Guidance Start: 0.0, '
             'Guidance End: 0.9, Pixel Perfect: True, Control Mode: My prompt is more important, '
             'Save Detected Map: True", Version: v1.10.1')
    (unit,) = units_from_params(infotext.parse_infotext(a1111))
    assert unit["model"] == "control_v11f1p_sd15_depth [cfd03158]" and unit["weight"] == 0.8
    assert unit["module"] == "depth_midas" and unit["resize_mode"] == "Resize and Fill"
    assert (unit["processor_res"], unit["threshold_a"], unit["guidance_end"]) == (384, None, 0.9)
    assert unit["pixel_perfect"] is True and unit["control_mode"] == "My prompt is more important"
    legacy = ('preprocessor: canny, model: control_sd15_canny [fef5e48e], weight: 1, starting/ending: (0.2, 0.8), '
              'resize mode: Crop and Resize, pixel perfect: False, control mode: Balanced, '
              'preprocessor params: (512, 64, 128)')
    (unit,) = units_from_params({"ControlNet 0": legacy})
    assert (unit["module"], unit["guidance_start"], unit["guidance_end"]) == ("canny", 0.2, 0.8)
    assert (unit["processor_res"], unit["threshold_a"], unit["threshold_b"]) == (512, 64, 128)


def test_bad_values_fall_back_to_defaults_and_nothing_raises():
    units = units_from_params({
        "ControlNet 1": "Module: canny, Model: m, Weight: 9, Control Mode: Loud, Guidance Start: 0.9, "
                        "Guidance End: 0.1, Processor Res: big, Pixel Perfect: maybe",
        "ControlNet 99999": "Module: canny, Model: m",  # junk index: not a request for 100000 units
        "ControlNet 2": "nothing useful here",
        "Steps": "20",
    })
    assert len(units) == 3 and units[0] == {"enabled": False}
    bad = units[1]
    assert (bad["module"], bad["model"]) == ("canny", "m")
    assert (bad["weight"], bad["control_mode"], bad["processor_res"], bad["pixel_perfect"]) == (1.0, "Balanced", 512,
                                                                                               False)
    assert bad["guidance_end"] == 0.1 and bad["guidance_start"] == 0.0
    assert units[2]["enabled"] and units[2]["model"] == "None"
    assert units_from_params({"Steps": "20"}) == []
