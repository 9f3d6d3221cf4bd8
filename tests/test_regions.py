"""Regional prompts (layout-to-image): the Regional Prompter syntax, regions' checks, the
infotext, and masked cross-attention on tiny models and the shipped demo model.

What a user sees: on the demo model, "a white circle on a red background ADDCOL ... blue
background" paints the left half red and the right half blue, and swapping the two regions'
prompts swaps the colours. Underneath: a region's prompt reaches only its own pixels at the
cross-attention, the negative prompt stays global, and the U-Net is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.checks import RequestError
from pipelines.core.infotext import build_infotext, parse_infotext
from pipelines.core.progress import JobControl
from pipelines.core.regions import (
    Layout,
    Region,
    check_regions,
    fields_from_params,
    fields_from_script_args,
    infotext_params,
    region_from_fields,
    regions_from_entries,
    request_layout,
    split_prompt,
)
from pipelines.core.request import GenerationRequest
from pipelines.core.settings import DEMO_CHECKPOINT_DIR, EngineSettings, Paths
from pipelines.generate import regions, runner
from pipelines.generate.prompts import encode_prompts

DEMO = DEMO_CHECKPOINT_DIR / "demo-shapes.safetensors"


def boxes(layout: Layout) -> list[tuple[float, ...]]:
    return [tuple(round(v, 4) for v in region.box) for region in layout.regions]


# --- the prompt syntax ---------------------------------------------------------------------------

def test_addcol_splits_left_to_right_by_the_ratios():
    layout = split_prompt("a red apple ADDCOL a blue car", ratios="1,3")
    assert [r.prompt for r in layout.regions] == ["a red apple", "a blue car"]
    assert boxes(layout) == [(0, 0, 0.25, 1), (0.25, 0, 1, 1)]
    assert layout.base_prompt == "a red apple"  # no ADDBASE: the regions cover all; the first stands for the base
    assert [r.weight for r in layout.regions] == [1.0, 1.0]


def test_the_readme_2d_example_rows_of_cells():
    # Columns mode: ";"-groups are rows, each group's first number is the row's height
    layout = split_prompt("sky ADDCOL hair ADDCOL aquarium ADDROW desk ADDCOL sofa", ratios="1,2,1,1;2,4,6")
    third = round(1 / 3, 4)
    assert boxes(layout) == [(0, 0, 0.5, third), (0.5, 0, 0.75, third), (0.75, 0, 1, third),
                             (0, third, 0.4, 1), (0.4, third, 1, 1)]


def test_rows_mode_splits_columns_first_and_break_is_the_next_cell():
    stacked = split_prompt("top BREAK bottom", mode="Rows", ratios="1,1")
    assert boxes(stacked) == [(0, 0, 1, 0.5), (0, 0.5, 1, 1)]
    layout = split_prompt("a ADDROW b ADDCOL c", mode="Rows", ratios="1;1;3,1;1")
    assert boxes(layout) == [(0, 0, 0.5, 0.25), (0, 0.25, 0.5, 1), (0.5, 0, 1, 1)]


def test_counts_that_do_not_match_split_equally():
    assert boxes(split_prompt("a ADDCOL b ADDCOL c", ratios="1,2")) == [(0, 0, 0.3333, 1), (0.3333, 0, 0.6667, 1),
                                                                        (0.6667, 0, 1, 1)]
    # one region per row: a 1-D ratio list sizes the rows
    assert boxes(split_prompt("a ADDROW b", ratios="1,3")) == [(0, 0, 1, 0.25), (0, 0.25, 1, 1)]


def test_common_and_base_prompts():
    layout = split_prompt("masterpiece ADDCOMM a garden ADDBASE red flowers ADDCOL blue sky", base_ratios="0.2,0.5")
    assert layout.base_prompt == "masterpiece, a garden"
    assert [r.prompt for r in layout.regions] == ["masterpiece, red flowers", "masterpiece, blue sky"]
    assert [r.weight for r in layout.regions] == [0.8, 0.5]
    assert [r.weight for r in split_prompt("a ADDBASE b ADDCOL c").regions] == [0.8, 0.8]  # the default 0.2


def test_a_prompt_without_layout_is_left_alone():
    assert split_prompt("a red circle BREAK on blue") is None  # BREAK alone is A1111's chunk break
    assert split_prompt("ADDCOLOUR is a word") is None
    assert len(split_prompt("red BREAK blue", ratios="1,1").regions) == 2  # ratios given: BREAK splits


@pytest.mark.parametrize("kwargs, field", [({"ratios": "1,x"}, "regional_ratios"),
                                           ({"ratios": "1,0"}, "regional_ratios"),
                                           ({"base_ratios": "1.5"}, "regional_base_ratios"),
                                           ({"mode": "Diagonal"}, "regional_mode")])
def test_bad_syntax_settings_name_their_field(kwargs, field):
    with pytest.raises(RequestError) as error:
        split_prompt("a ADDCOL b", **kwargs)
    assert error.value.field == field


# --- regions given as boxes or masks ---------------------------------------------------------------

@pytest.mark.parametrize("fields, field", [({"prompt": "a", "box": [0, 0, 1.5, 1]}, "regions[2].box"),
                                           ({"prompt": "a", "box": [0.5, 0, 0.5, 1]}, "regions[2].box"),
                                           ({"prompt": "a"}, "regions[2].box"),
                                           ({"prompt": "a", "box": [0, 0, 1, 1], "weight": 2}, "regions[2].weight"),
                                           ({"prompt": 3, "box": [0, 0, 1, 1]}, "regions[2].prompt"),
                                           ({"prompt": "a", "box": [0, 0, 1, 1], "colour": "red"},
                                            "regions[2].colour")])
def test_bad_regions_name_the_field(fields, field):
    with pytest.raises(RequestError) as error:
        region_from_fields(2, fields)
    assert error.value.field == field


def test_a_mask_of_another_size_is_refused():
    good = Region("a", mask=Image.new("L", (64, 64), 255))
    bad = Region("b", mask=Image.new("L", (32, 64), 255))
    assert check_regions([good], 64, 64) == (good,)
    with pytest.raises(RequestError) as error:
        check_regions([good, bad], 64, 64)
    assert error.value.field == "regions[1].mask" and "64x64" in error.value.message
    with pytest.raises(RequestError) as error:
        request_layout("a ADDCOL b", [good])
    assert error.value.field == "regions"


def test_a_box_border_inside_a_pixel_covers_it_partly():
    coverage = np.asarray(Region("a", box=(0, 0, 0.55, 1)).coverage(10, 2))
    assert coverage[0, :5].tolist() == [255] * 5 and coverage[0, 6:].tolist() == [0] * 4
    assert 100 < coverage[0, 5] < 155


# --- the infotext ----------------------------------------------------------------------------------

def test_the_syntax_round_trips_through_the_infotext_with_the_extensions_keys():
    prompt = "a garden ADDBASE red ADDCOL blue ADDROW green"
    params = infotext_params(prompt, (), "Columns", "1,1,2;1,1", "0.3")
    assert params["RP Active"] is True and params["RP Use Base"] is True and params["RP Calc Mode"] == "Attention"
    read = parse_infotext(build_infotext(prompt, "", {"Steps": 20, **params}))
    assert fields_from_params(read) == {"regional_mode": "Columns", "regional_ratios": "1,1,2;1,1",
                                        "regional_base_ratios": "0.3"}
    # the extension's older texts name the submodes by direction
    assert fields_from_params({"RP Active": "True", "RP Matrix submode": "Vertical"})["regional_mode"] == "Rows"
    assert infotext_params("no layout", (), "Columns", "", "0.2") == {}
    assert fields_from_params({"RP Active": "True", "RP Ratios": "1,x"}) == {}  # a bad text is left out


def test_box_regions_round_trip_through_the_infotext():
    given = (Region("red", box=(0, 0, 0.5, 1), weight=0.7), Region("blue", box=(0.5, 0, 1, 1)))
    read = parse_infotext(build_infotext("a scene", "", {"Steps": 20, "Seed": 1, **infotext_params("a scene", given, "Columns", "", "0.2")}))
    assert fields_from_params(read)["regions"] == given


def test_the_extensions_own_texts_with_use_base_read_back_as_keywords():
    text = "a garden BREAK red BREAK blue\nSteps: 20, Seed: 1, RP Active: True, RP Matrix submode: Columns, " \
           "RP Ratios: 1,1, RP Use Base: True"
    fields = fields_from_params(parse_infotext(text))
    assert fields["prompt"] == "a garden ADDBASE red BREAK blue"
    layout = split_prompt(fields["prompt"], fields["regional_mode"], fields["regional_ratios"])
    assert layout.base_prompt == "a garden" and [r.prompt for r in layout.regions] == ["red", "blue"]


# --- the API ---------------------------------------------------------------------------------------

def test_api_regions_with_boxes_and_masks():
    decoded = []

    def decode(field, text):
        decoded.append(field)
        return Image.new("L", (64, 64), 255)

    found = regions_from_entries([{"prompt": "red", "box": [0, 0, 0.5, 1]},
                                  {"prompt": "blue", "mask": "aGVsbG8=", "weight": 0.5}], decode)
    assert found[0].box == (0, 0, 0.5, 1) and found[1].mask.size == (64, 64) and found[1].weight == 0.5
    assert decoded == ["regions[1].mask"]  # the decoder names the field in its own errors
    with pytest.raises(RequestError) as error:
        regions_from_entries([{"prompt": "red", "box": [0, 0, 0.5, 1]}, "blue"])
    assert error.value.field == "regions[1]"


def test_the_extensions_script_args():
    args = [True, False, "Matrix", "Rows", "Mask", "Prompt", "1,2", "0.3", True, False, False, "Latent"]
    fields, notes = fields_from_script_args("a garden BREAK top BREAK bottom", args)
    assert fields == {"prompt": "a garden ADDBASE top BREAK bottom", "regional_mode": "Rows",
                      "regional_ratios": "1,2", "regional_base_ratios": "0.3"}
    assert len(notes) == 1 and "Latent" in notes[0]
    layout = split_prompt(fields["prompt"], fields["regional_mode"], fields["regional_ratios"],
                          fields["regional_base_ratios"])
    assert boxes(layout) == [(0, 0, 1, 0.3333), (0, 0.3333, 1, 1)] and layout.regions[0].weight == 0.7
    assert fields_from_script_args("a ADDCOL b", [False]) == ({}, [])


# --- masked cross-attention --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from conftest import make_engine
    from tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("regions")
    for family in ("sd1", "sd2", "sdxl"):
        write_tiny_checkpoint(root / "Stable-diffusion" / f"{family}.safetensors", family=family, seed=0,
                              dtype=torch.float32)
    engine = make_engine(root, root)
    return {family: engine.manager.get(f"{family}.safetensors", root / "Stable-diffusion" / f"{family}.safetensors")
            .components for family in ("sd1", "sd2", "sdxl")}


def first_cross_attention(components, layout: Layout, batch: int, cfg: bool) -> torch.Tensor:
    """The output of the U-Net's first cross-attention layer (its input depends on the noise alone)."""
    conditioning = regions.encode_layout(components, layout, "ugly", 1, "cpu") if layout.regions else \
        encode_prompts(components, layout.base_prompt, "ugly", 1, "cpu")
    step = conditioning.at(0)
    context = torch.cat([step.uncond, step.cond]) if cfg else step.cond
    context = context.repeat_interleave(batch, dim=0)
    unet = components.unet
    rows = 2 * batch if cfg else batch
    sample = torch.randn((rows, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    extra = {}
    if step.pooled_cond is not None:
        extra = {"added_cond_kwargs": runner.added_conditioning(components, step.pooled_cond, step.pooled_uncond,
                                                                64, 64, cfg, batch, "cpu")}
    captured = []
    layer = regions.cross_attention_layers(unet)[0]
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with regions.applied(unet, conditioning, batch), torch.no_grad():
            unet(sample, 500, encoder_hidden_states=context, **extra)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("family, batch, cfg", [("sd1", 2, True), ("sd1", 1, False), ("sd2", 1, True),
                                                ("sdxl", 1, True)])
def test_a_regions_prompt_reaches_only_its_own_pixels(tiny_models, family, batch, cfg):
    components = tiny_models[family]

    def run(right_prompt: str) -> torch.Tensor:
        layout = Layout("a photo", (Region("a red apple", box=(0, 0, 0.5, 1)), Region(right_prompt, box=(0.5, 0, 1, 1))))
        return first_cross_attention(components, layout, batch, cfg)

    first, second = run("a blue car"), run("a green dog")
    plain = first_cross_attention(components, Layout("a photo", ()), batch, cfg)
    side = int(first.shape[1] ** 0.5)  # the layer's square grid (8x8 latent, maybe halved)
    grid = first.reshape(first.shape[0], side, side, -1)
    other = second.reshape(second.shape[0], side, side, -1)
    cond, half = (slice(batch, 2 * batch) if cfg else slice(0, batch)), side // 2
    assert torch.equal(grid[cond, :, :half], other[cond, :, :half])  # the left region does not see the right's prompt
    assert (grid[cond, :, half:] - other[cond, :, half:]).abs().mean() > 1e-3  # the right one does
    assert (grid[cond] - plain.reshape(grid.shape)[cond]).abs().mean() > 1e-3  # regions replace the base there
    if cfg:  # the negative prompt's rows are those of a plain run
        assert torch.allclose(first[:batch], plain[:batch], atol=1e-6)


def test_the_unet_is_left_as_it_was(tiny_models):
    unet = tiny_models["sd1"].unet
    before = dict(unet.attn_processors)
    layout = Layout("a", (Region("b", box=(0, 0, 1, 1)),))
    conditioning = regions.encode_layout(tiny_models["sd1"], layout, "", 1, "cpu")
    with pytest.raises(KeyError), regions.applied(unet, conditioning, 1) as wrapped:
        assert wrapped == len(regions.cross_attention_layers(unet)) > 0
        assert all(isinstance(p, regions.RegionalAttentionProcessor)
                   for name, p in unet.attn_processors.items() if "attn2" in name)
        raise KeyError("interrupted")
    assert unet.attn_processors == before and not unet._forward_pre_hooks
    with regions.applied(unet, encode_prompts(tiny_models["sd1"], "a", "", 1, "cpu"), 1) as wrapped:
        assert wrapped == 0  # a plain conditioning: nothing to do


def test_layer_grid_follows_the_unets_rounding():
    assert regions.layer_grid(8, 8, 64) == (8, 8) and regions.layer_grid(8, 8, 4) == (2, 2)
    assert regions.layer_grid(9, 13, 35) == (5, 7)  # 9x13 -> 5x7 (stride-2 convolutions round up)
    weights = regions.blend_weights(torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]]]), [1.0, 0.5])
    assert torch.allclose(weights.sum(0), torch.ones(1, 2))  # overlaps are scaled, shares sum to 1
    assert torch.allclose(weights[:, 0, 1], torch.tensor([0.0, 1.0, 0.0]))


# --- what a user sees, on the demo model ---------------------------------------------------------------

LEFT_RED = "a white circle on a red background ADDCOL a white circle on a blue background"
LEFT_BLUE = "a white circle on a blue background ADDCOL a white circle on a red background"


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    if not DEMO.is_file():
        pytest.skip("the demo checkpoint is not trained yet")
    from pipelines.engine import Engine

    tmp = tmp_path_factory.mktemp("regions-demo")
    return Engine(Paths(models_dir=tmp / "models", data_dir=tmp / "data", outdir=tmp / "out"),
                  EngineSettings(device="cpu"))


def redness_of_halves(image: Image.Image) -> tuple[float, float]:
    """Mean red minus mean blue of the left and the right half."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    half = rgb.shape[1] // 2
    return tuple(float(part[..., 0].mean() - part[..., 2].mean()) for part in (rgb[:, :half], rgb[:, half:]))


def demo_request(prompt: str, **fields) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt="", steps=12, cfg_scale=6.0, sampler="DPM++ 2M",
                             seed=100, width=64, height=64, save_images=False, **fields)


def test_each_half_takes_its_own_regions_colour_on_the_demo_model(demo_engine):
    components = demo_engine.manager.get(DEMO.name, DEMO).components

    def halves(prompt: str) -> tuple[float, float]:
        request = demo_request(prompt)
        conditioning = regions.encode_layout(components, split_prompt(prompt), "", 1, "cpu", steps=request.steps)
        inputs = runner.BatchInputs(conditioning, [request.seed], [request.seed], 64, 64)
        with regions.applied(components.unet, conditioning, 1):
            image = runner.run_batch(components, "cpu", request, inputs, JobControl(), lambda *a, **k: None)[0]
        return redness_of_halves(image)

    (red_left, blue_right), (blue_left, red_right) = halves(LEFT_RED), halves(LEFT_BLUE)
    assert red_left > blue_left + 60 and red_right > blue_right + 60  # swapping the prompts swaps the colours
    assert red_left > blue_right + 60 and red_right > blue_left + 60


# --- through the engine and the API (run once GenerationRequest has the regional fields) ---------------

WIRED = "regions" in GenerationRequest.__dataclass_fields__
needs_wiring = pytest.mark.skipif(not WIRED, reason="GenerationRequest has no `regions` yet (wired by the lead)")


@needs_wiring
def test_the_engine_paints_each_region_and_the_infotext_brings_the_layout_back(demo_engine):
    from pipelines.core.infotext import request_fields_from_infotext

    result = demo_engine.generate(demo_request(LEFT_RED, regional_ratios="1,1"))
    left, right = redness_of_halves(result.images[0])
    assert left > right + 60
    pasted = request_fields_from_infotext(result.infotexts[0])
    assert (pasted["prompt"], pasted["regional_mode"], pasted["regional_ratios"]) == (LEFT_RED, "Columns", "1,1")


@needs_wiring
def test_hires_fix_keeps_the_layout_in_its_second_pass(engine, monkeypatch):
    seen = set()
    call = regions.RegionalAttentionProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        seen.add(self.mixer.latent_size)
        return call(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(regions.RegionalAttentionProcessor, "__call__", spy)
    request = GenerationRequest(prompt="red ADDCOL blue", steps=2, width=64, height=64, seed=1, sampler="Euler",
                                save_images=False, checkpoint="tiny.safetensors", enable_hr=True, hr_scale=2,
                                hr_upscaler="Latent", hr_denoising_strength=0.6)
    assert engine.generate(request).images[0].size == (128, 128)
    assert seen == {(8, 8), (16, 16)}  # both passes, each at its own latent size


@needs_wiring
def test_the_api_takes_regions_and_the_extensions_args_and_names_bad_fields(engine):
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from webui.api import create_app

    client = TestClient(create_app(engine))
    body = {"prompt": "a photo", "steps": 2, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler"}
    bad_box = client.post("/sdapi/v1/txt2img", json={**body, "regions": [{"prompt": "a", "box": [0, 0, 0.5, 1]},
                                                                        {"prompt": "b", "box": [0.5, 0, 1.5, 1]}]})
    assert bad_box.status_code == 422 and bad_box.json()["field"] == "regions[1].box"
    small = io.BytesIO()
    Image.new("L", (32, 32), 255).save(small, "PNG")
    bad_mask = client.post("/sdapi/v1/txt2img", json={**body, "regions": [
        {"prompt": "a", "mask": base64.b64encode(small.getvalue()).decode()}]})
    assert bad_mask.status_code == 422 and bad_mask.json()["field"] == "regions[0].mask"
    args = [True, False, "Matrix", "Columns", "Mask", "Prompt", "1,2", "0.2", False, False, False, "Attention"]
    done = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "red BREAK blue",
                                                  "alwayson_scripts": {"Regional Prompter": {"args": args}}})
    assert done.status_code == 200
    info = json.loads(done.json()["info"])
    assert "RP Ratios: \"1,2\"" in info["infotexts"][0] and not info.get("warnings")
    boxes_done = client.post("/sdapi/v1/txt2img", json={**body, "regions": [{"prompt": "a", "box": [0, 0, 0.5, 1]}]})
    assert boxes_done.status_code == 200 and "Regions: " in json.loads(boxes_done.json()["info"])["infotexts"][0]
