"""A txt2img API request without width/height draws at the checkpoint's native size (as the UI
starts from); an explicit size stays what the client asked for."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from conftest import make_engine
from PIL import Image
from test_api import serve
from test_webui import FakeEngine
from tiny import write_tiny_sd1_checkpoint

from webui.api import ApiOptions, create_app
from webui.api.bodies import Img2ImgRequest, Txt2ImgRequest
from webui.api.translate import generation_parameters, prepare_generation

SMALL = {"prompt": "a red circle", "seed": 3, "steps": 1, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """The API over one checkpoint that says it is native at 64 px, like the shipped demo model."""
    root = tmp_path_factory.mktemp("size-default")
    write_tiny_sd1_checkpoint(root / "models" / "Stable-diffusion" / "small.safetensors", seed=5,
                              metadata={"sdui.native_resolution": "64"})
    engine = make_engine(root / "models", root)
    assert engine.native_resolution("small.safetensors") == 64
    with serve(create_app(engine, options=ApiOptions())) as url:
        yield url


def txt2img(base_url, body) -> tuple[Image.Image, dict, dict]:
    response = requests.post(f"{base_url}/sdapi/v1/txt2img", json=body, timeout=300)
    assert response.status_code == 200, response.text
    answer = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    return image, answer["parameters"], json.loads(answer["info"])


def test_without_width_and_height_the_image_has_the_native_size(base_url):
    image, parameters, info = txt2img(base_url, SMALL)
    assert image.size == (64, 64)
    assert (parameters["width"], parameters["height"]) == (64, 64)
    assert (info["width"], info["height"]) == (64, 64) and "Size: 64x64" in info["infotexts"][0]
    # null means "the default" too
    image, _, _ = txt2img(base_url, {**SMALL, "width": None, "height": None})
    assert image.size == (64, 64)


def test_an_explicit_size_stays_as_asked(base_url):
    image, parameters, info = txt2img(base_url, {**SMALL, "width": 512, "height": 512})
    assert image.size == (512, 512) and (parameters["width"], info["height"]) == (512, 512)
    image, parameters, _ = txt2img(base_url, {**SMALL, "width": 96})  # only one side: the other is native
    assert image.size == (96, 64) and (parameters["width"], parameters["height"]) == (96, 64)


def test_the_native_size_is_the_chosen_checkpoints():
    engine = FakeEngine()  # sd15 (512) and sdxl (1024)
    for checkpoint, size in (("sd15", 512), ("sdxl", 1024)):
        body = Txt2ImgRequest(prompt="x", override_settings={"sd_model_checkpoint": checkpoint})
        prepared = prepare_generation(engine, body, ApiOptions())
        assert (prepared.request.width, prepared.request.height) == (size, size)
        assert generation_parameters(body, prepared.request)["width"] == size
    body = Img2ImgRequest(init_images=[_png()], override_settings={"sd_model_checkpoint": "sdxl"}, height=768)
    prepared = prepare_generation(engine, body, ApiOptions())
    assert (prepared.request.width, prepared.request.height) == (1024, 768)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
