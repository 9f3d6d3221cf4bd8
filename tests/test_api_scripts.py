"""A1111's selectable scripts by name through the REST API: `script_name` + positional
`script_args` give the same images as the same work through our extensions' named arguments
(or, for SD upscale, the engine's sd_upscale); /scripts and /script-info; bad arguments -> 422."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from extensions.manager import ExtensionManager
from pipelines.core.request import GenerationRequest
from webui.api import ApiOptions, create_app

SHIPPED = Path(__file__).resolve().parent.parent / "extensions"
BASE = {"prompt": "a square", "seed": 5, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    saved = engine.extensions
    manager = ExtensionManager(tmp_path_factory.mktemp("ext") / "extensions.json")
    manager.discover(SHIPPED)
    engine.extensions = manager
    yield TestClient(create_app(engine, options=ApiOptions(sd_model_checkpoint="tiny.safetensors")))
    engine.extensions = saved


def init_image() -> str:
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def call(client, route: str, **fields) -> tuple[list[Image.Image], dict]:
    response = client.post(f"/sdapi/v1/{route}", json={**BASE, **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    return [Image.open(io.BytesIO(base64.b64decode(i))) for i in body["images"]], json.loads(body["info"])


def same(first: list[Image.Image], second: list[Image.Image]) -> None:
    assert len(first) == len(second) and first
    for a, b in zip(first, second):
        assert a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def refused(client, route: str, **fields) -> dict:
    response = client.post(f"/sdapi/v1/{route}", json={**BASE, **fields})
    assert response.status_code == 422, response.text
    return response.json()


def test_listing_and_script_info(client):
    listed = client.get("/sdapi/v1/scripts").json()
    common = ["x/y/z plot", "prompt matrix", "prompts from file or textbox"]
    assert listed == {"txt2img": common, "img2img": [*common, "sd upscale", "loopback", "outpainting mk2",
                                                     "poor man's outpainting"]}
    info = client.get("/sdapi/v1/script-info").json()
    by_mode = {(s["name"], s["is_img2img"]): s for s in info}
    assert set(by_mode) == {(n, False) for n in common} | {(n, True) for n in listed["img2img"]}
    assert all(set(s) == {"name", "is_alwayson", "is_img2img", "args"} and s["is_alwayson"] is False for s in info)
    for s in info:
        assert all(set(a) == {"label", "value", "minimum", "maximum", "step", "choices"} for a in s["args"])
    xyz_t, xyz_i = by_mode[("x/y/z plot", False)]["args"], by_mode[("x/y/z plot", True)]["args"]
    assert len(xyz_t) == 18 and [a["label"] for a in xyz_t[:4]] == ["X type", "X values", "X values", "Y type"]
    # the axis type is an index into the mode's own list, as in A1111
    assert xyz_t[0]["choices"][5:8] == ["Hires steps", "CFG Scale", "Prompt S/R"]
    assert xyz_i[0]["choices"][5:8] == ["CFG Scale", "Image CFG Scale", "Prompt S/R"]
    overlap = by_mode[("sd upscale", True)]["args"][1]
    assert overlap == {"label": "Tile overlap", "value": 64, "minimum": 0, "maximum": 256, "step": 16, "choices": None}
    assert by_mode[("sd upscale", True)]["args"][2]["choices"][:2] == ["None", "Lanczos"]
    assert by_mode[("loopback", True)]["args"][0]["label"] == "Loops"


def test_new_scripts_have_ui_sections(engine, client):
    """Prompts from file in every generation tab, loopback where there is an input image."""
    def section_ids(tab):
        return {ext.id for ext, _ in engine.extensions.ui_sections(tab)}
    assert {"prompts-from-file", "xyz-plot", "prompt-matrix"} <= section_ids("txt2img")
    assert "loopback" not in section_ids("txt2img")
    assert {"prompts-from-file", "loopback"} <= section_ids("img2img") & section_ids("inpaint")


def test_xyz_plot_by_name_equals_extension_args(client):
    # X: Steps (index 4) from text; Y: Sampler (index 9 in txt2img) from the dropdown; sub images on
    args = [4, "1, 2", [], 9, "", ["Euler", "Euler a"], 0, "", [], True, True]
    by_name, info = call(client, "txt2img", script_name="X/Y/Z plot", script_args=args)
    by_ext, _ = call(client, "txt2img", alwayson_scripts={"xyz-plot": {"args": {
        "x_type": "Steps", "x_values": "1, 2", "y_type": "Sampler", "y_values": "Euler, Euler a",
        "include_images": True}}})
    same(by_name, by_ext)
    assert len(by_name) == 5  # the grid, then 2 x 2 cells
    assert "Sampler: Euler a" in info["infotexts"][4] and "Steps: 2" in info["infotexts"][4]
    grid_only, _ = call(client, "txt2img", script_name="x/y/z plot", script_args=args[:6])
    same(grid_only, by_name[:1])  # A1111's default: no sub images


def test_prompt_matrix_by_name_equals_extension_args(client):
    by_name, info = call(client, "txt2img", prompt="a square|red|blue", script_name="prompt matrix",
                         script_args=[False, True, "positive", "comma", 0])
    by_ext, _ = call(client, "txt2img", prompt="a square|red|blue",
                     alwayson_scripts={"prompt-matrix": {"args": {"different_seeds": True}}})
    same(by_name, by_ext)
    assert len(by_name) == 5 and info["all_seeds"][1:] == [5, 6, 7, 8]
    assert not info["warnings"]


def test_prompts_from_file_by_name_equals_extension_args(client):
    lines = "red\n\n--prompt blue stripes --steps 3 --cfg_scale 5"
    by_name, info = call(client, "txt2img", script_name="prompts from file or textbox",
                         script_args=[True, False, "end", lines])
    by_ext, _ = call(client, "txt2img", alwayson_scripts={"prompts-from-file": {"args": {
        "iterate_seed": True, "prompt_position": "end", "prompts": lines}}})
    same(by_name, by_ext)
    assert len(by_name) == 2
    first, second = info["infotexts"]
    assert first.startswith("a square red\n") and "Seed: 5," in first and "Steps: 2," in first
    assert second.startswith("a square blue stripes\n") and "Seed: 6," in second and "Steps: 3," in second
    assert "CFG scale: 5," in second
    bad = refused(client, "txt2img", script_name="prompts from file or textbox",
                  script_args=[False, False, "start", "ok\n--steps ten"])
    assert bad["field"] == "script_args[3] (List of prompt inputs)" and "line 2" in bad["error"]


def test_sd_upscale_by_name_equals_engine_sd_upscale(client, engine):
    fields = dict(init_images=[init_image()], denoising_strength=0.4, script_name="SD upscale")
    by_index, _ = call(client, "img2img", script_args=["", 16, 1, 2.0], **fields)  # 1: Lanczos
    by_label, _ = call(client, "img2img", script_args=[None, 16, "Lanczos", 2], **fields)
    same(by_index, by_label)
    assert by_index[0].size == (128, 128)
    init = Image.open(io.BytesIO(base64.b64decode(fields["init_images"][0])))
    request = GenerationRequest(mode="img2img", prompt="a square", seed=5, steps=2, width=64, height=64,
                                sampler="Euler", init_image=init, denoising_strength=0.4,
                                checkpoint="tiny.safetensors", save_images=False)
    direct = engine.sd_upscale(request, upscaler="Lanczos", scale=2.0, overlap=16)
    same(by_index, direct.images)
    bad = refused(client, "img2img", script_args=[None, 16, 1, 9], **fields)
    assert bad["field"] == "script_args[3] (Scale Factor)"
    bad = refused(client, "img2img", script_args=[None, 16, 99, 2], **fields)
    assert bad["field"] == "script_args[2] (Upscaler)" and "1 Lanczos" in bad["error"]


def test_loopback_by_name_equals_extension_args(client):
    fields = dict(init_images=[init_image()], denoising_strength=0.6)
    by_name, info = call(client, "img2img", script_name="loopback", script_args=[3, 0.2, "Lazy"], **fields)
    by_ext, _ = call(client, "img2img", alwayson_scripts={"loopback": {"args": {
        "loops": 3, "final_denoising_strength": 0.2, "denoising_curve": "Lazy"}}}, **fields)
    same(by_name, by_ext)
    assert len(by_name) == 4 and by_name[0].width > 3 * 64 - 1  # a row of the 3 loops, then each loop
    assert info["all_seeds"][1:] == [5, 6, 7]
    assert all("Denoising curve: Lazy" in t and "Denoising strength: " in t for t in info["infotexts"][1:])
    strengths = [t.split("Denoising strength: ")[1].split(",")[0] for t in info["infotexts"][1:]]
    assert strengths == ["0.6", "0.482843", "0.2"]  # Lazy: 1 - cos(progress * pi / 2) from 0.6 to 0.2
    # each loop starts from the previous loop's output
    assert by_name[2].tobytes() != by_name[1].tobytes()
    bad = refused(client, "img2img", script_name="loopback", script_args=[2, 0.5, "Linear", "CLIP"], **fields)
    assert bad["field"] == "script_args[3] (Append interrogated prompt at each iteration)"


def test_bad_script_args_name_the_argument(client):
    bad = refused(client, "txt2img", script_name="x/y/z plot", script_args=[99, "1"])
    assert bad["field"] == "script_args[0] (X type)" and "Prompt S/R" in bad["error"]
    bad = refused(client, "txt2img", script_name="x/y/z plot", script_args=[4, "1-x"])
    assert bad["field"] == "script_args[1] (X values)"
    bad = refused(client, "txt2img", script_name="x/y/z plot", script_args=[5, "1, 2"])  # Hires steps
    assert bad["field"] == "script_args[0] (X type)" and "Hires steps" in bad["error"]
    bad = refused(client, "txt2img", script_name="x/y/z plot", script_args=[4, "1", [], 0, "", [], 0, "", [], "yes"])
    assert bad["field"] == "script_args[9] (Draw legend)"
    bad = refused(client, "txt2img", script_name="prompt matrix", script_args=[False, False, "sideways"])
    assert bad["field"] == "script_args[2] (Prompt type)"
    bad = refused(client, "txt2img", script_name="prompt matrix", script_args=[False] * 6)
    assert bad["field"] == "script_args" and "at most 5" in bad["error"]
    bad = refused(client, "img2img", init_images=[init_image()], script_name="loopback", script_args=[0])
    assert bad["field"] == "script_args[0] (Loops)"


def test_unknown_and_unavailable_script_names(client):
    bad = refused(client, "txt2img", script_name="Ultimate SD upscale")
    assert bad["field"] == "script_name"
    assert all(name in bad["error"] for name in ("'x/y/z plot'", "'prompt matrix'", "'prompts from file or textbox'"))
    bad = refused(client, "txt2img", script_name="loopback")  # an img2img script
    assert bad["field"] == "script_name" and "img2img" in bad["error"]
    bad = refused(client, "img2img", init_images=[init_image()], script_name="Outpainting mk2",
                  script_args=[None, 4])
    assert bad["field"] == "script_args[1] (Pixels to expand)"
    bad = refused(client, "img2img", init_images=[init_image()], script_name="Poor man's outpainting",
                  script_args=[64, 4, 0, ["left", "sideways"]])
    assert bad["field"] == "script_args" and "sideways" in bad["error"]


def test_outpainting_scripts_grow_the_canvas(client):
    images, info = call(client, "img2img", init_images=[init_image()], script_name="Poor man's outpainting",
                        script_args=[32, 4, "original", ["right"]], steps=2, denoising_strength=0.8)
    assert images[0].size == (96, 64)
    assert "Outpaint: right 32" in info["infotexts"][0]
    images, info = call(client, "img2img", init_images=[init_image()], script_name="outpainting mk2",
                        script_args=[None, 16, 8, ["up", "down"], 1.0, 0.5], steps=2)
    assert images[0].size == (64, 96)
    assert any("script_args[5] (Color variation)" in w for w in info["warnings"])


def test_unavailable_argument_is_reported(client):
    images, info = call(client, "txt2img", prompt="a square|red", script_name="prompt matrix",
                        script_args=[False, False, "positive", "comma", 10])
    assert len(images) == 3
    assert any(w.startswith("script_args[4] (Grid margins)") for w in info["warnings"])
