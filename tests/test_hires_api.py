"""Hires fix and neural upscalers through the REST API and the UI handlers."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from test_api import serve
from test_hires import hr_engine  # noqa: F401 - the engine with a tiny ESRGAN, a fixture

from pipelines.core.request import GenerationRequest
from webui import convert
from webui.api import ApiOptions, create_app
from webui.app import build_ui


@pytest.fixture(scope="module")
def base_url(hr_engine):
    with serve(create_app(hr_engine, options=ApiOptions(sd_model_checkpoint="tiny.safetensors"))) as url:
        yield url


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unb64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def post(base_url, route, body) -> requests.Response:
    return requests.post(f"{base_url}/sdapi/v1/{route}", json=body, timeout=120)


def test_txt2img_enable_hr(base_url):
    body = {"prompt": "x", "seed": 3, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
            "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "4x-Tiny", "hr_second_pass_steps": 4,
            "denoising_strength": 0.5, "hr_sampler_name": "DPM++ 2M Karras"}
    response = post(base_url, "txt2img", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert unb64(answer["images"][0]).size == (96, 96)
    info = json.loads(answer["info"])
    text = info["infotexts"][0]
    for part in ("Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 1.5", "Hires steps: 4",
                 "Hires upscaler: 4x-Tiny", "Hires sampler: DPM++ 2M", "Hires schedule type: Karras"):
        assert part in text
    assert info["denoising_strength"] == 0.5 and not any("enable_hr" in w for w in info["warnings"])


def test_txt2img_bad_hires_fields_are_422_naming_the_field(base_url):
    small = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "enable_hr": True}
    response = post(base_url, "txt2img", {**small, "hr_upscaler": "Magic"})
    assert response.status_code == 422 and response.json()["field"] == "hr_upscaler"
    response = post(base_url, "txt2img", {**small, "hr_scale": 10})
    assert response.status_code == 422 and response.json()["field"] == "hr_scale"
    response = post(base_url, "txt2img", {**small, "hr_sampler_name": "Nope"})
    assert response.status_code == 422 and response.json()["field"] == "hr_sampler_name"


def test_extras_with_a_neural_upscaler_and_the_upscaler_list(base_url):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    response = post(base_url, "extra-single-image", {"image": b64(image), "upscaler_1": "4x-Tiny",
                                                      "upscaling_resize": 4})
    assert response.status_code == 200, response.text
    assert unb64(response.json()["image"]).size == (120, 80)
    listed = requests.get(f"{base_url}/sdapi/v1/upscalers", timeout=10).json()
    assert "4x-Tiny" in [u["name"] for u in listed]


def test_ui_hires_fields_reach_the_request_by_name(hr_engine):
    ui = build_ui(hr_engine).webui
    fields = ui.fields["txt2img"]
    for name in ("enable_hr", "hr_upscaler", "hr_scale", "hr_second_pass_steps", "hr_denoising_strength",
                 "hr_resize_x", "hr_resize_y", "hr_sampler", "hr_schedule_type", "hr_prompt", "hr_negative_prompt"):
        assert name in fields
    assert "Latent (nearest-exact)" in [c[0] for c in fields["hr_upscaler"].choices]
    assert "4x-Tiny" in [c[0] for c in fields["hr_upscaler"].choices]
    values = {name: component.value for name, component in fields.items() if name != "checkpoint"}
    values.update(enable_hr=True, prompt="x", hr_upscaler="4x-Tiny")
    request = convert.generation_request("txt2img", values)
    assert isinstance(request, GenerationRequest) and request.enable_hr and request.hr_sampler is None
    assert request.hr_schedule_type is None and request.hr_upscaler == "4x-Tiny"


def test_ui_upscale_batch_of_files(hr_engine, tmp_path):
    ui = build_ui(hr_engine).webui
    paths = []
    for i, size in enumerate([(20, 10), (16, 16)]):
        path = tmp_path / f"in{i}.png"
        Image.new("RGB", size, (i * 100, 50, 50)).save(path)
        paths.append(str(path))
    (tmp_path / "notes.txt").write_text("not an image")
    gallery, info = ui.upscale(source="Batch", image=None, batch_files=paths + [str(tmp_path / "notes.txt")],
                               batch_folder=None, upscaler="4x-Tiny", upscale_mode="Scale by", scale=2,
                               target_width=None, target_height=None, upscaler_2="None", upscaler_2_visibility=0,
                               tile_size=0, tile_overlap=16)
    assert len(gallery) == 2 and info.startswith("2 images upscaled")
    sizes = [Image.open(item).size if isinstance(item, str) else item.size for item in gallery]
    assert sizes == [(40, 20), (32, 32)]


def test_ui_sd_upscale(hr_engine):
    ui = build_ui(hr_engine).webui
    assert {"prompt", "sd_upscaler", "sd_scale", "sd_overlap", "image", "checkpoint"} <= set(ui.fields["sd_upscale"])
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    gallery, info = ui.sd_upscale(image=image, checkpoint="tiny.safetensors", sd_upscaler="Lanczos", sd_scale=2,
                                  sd_overlap=16, prompt="x", negative_prompt="", steps=2, sampler="Euler",
                                  denoising_strength=0.5, cfg_scale=7, seed=1.0, width=64, height=64)
    item = gallery[0]
    assert (Image.open(item) if isinstance(item, str) else item).size == (96, 80)
    assert "SD upscale overlap: 16" in info and "Seed: 1," in info
