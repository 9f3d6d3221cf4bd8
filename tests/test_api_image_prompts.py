"""The API's own `image_prompts` field through the real API and a tiny engine: an entry steers the
image and lands in the infotext as a ControlNet unit, every bad entry is a 422 naming
`image_prompts[i].<field>` (the engine's own errors about it too), and the server keeps answering."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from conftest import make_engine
from fastapi.testclient import TestClient
from PIL import Image
from test_ip_adapter import make_registry, prompt_image, psnr
from tiny import write_tiny_sd1_checkpoint
from tiny_ip_adapter import write_tiny_ip_adapter

from pipelines.models.build import load_components
from webui.api import create_app

BODY = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64, "seed": 11,
        "sampler_name": "Euler", "cfg_scale": 5}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_image_prompts")
    models = root / "models"
    checkpoint = write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", seed=0, dtype=None)
    unet = load_components(checkpoint).unet
    make_registry(models, unet, "sd1")
    write_tiny_ip_adapter(models / "ipadapter" / "wide.safetensors", unet, "base", 3, encoder_width=48)  # no encoder
    return TestClient(create_app(make_engine(models, root)))


def image_of(response) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))


def test_an_image_prompt_steers_the_image_and_is_in_the_infotext(client):
    plain = client.post("/sdapi/v1/txt2img", json=BODY)
    entry = {"image": b64(prompt_image()), "model": "ip-adapter-base_sd1", "weight": 0.8, "end": 0.9}
    prompted = client.post("/sdapi/v1/txt2img", json={**BODY, "image_prompts": [entry]})
    assert plain.status_code == 200 and prompted.status_code == 200, prompted.text
    assert psnr(image_of(prompted), image_of(plain)) < 35
    infotext = json.loads(prompted.json()["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: ip-adapter-auto, Model: ip-adapter-base_sd1 [' in infotext
    assert "Weight: 0.8" in infotext and "Guidance End: 0.9" in infotext
    zero = client.post("/sdapi/v1/txt2img", json={**BODY, "image_prompts": [{**entry, "weight": 0}]})
    assert np.array_equal(np.asarray(image_of(zero)), np.asarray(image_of(plain)))  # weight 0: as without it


def test_img2img_takes_image_prompts_too(client):
    body = {**BODY, "init_images": [b64(Image.new("RGB", (64, 64), (90, 90, 90)))], "denoising_strength": 0.6,
            "image_prompts": [{"image": b64(prompt_image()), "model": "ip-adapter-plus_sd1.safetensors"}]}
    done = client.post("/sdapi/v1/img2img", json=body)
    assert done.status_code == 200, done.text
    assert "Model: ip-adapter-plus_sd1 [" in json.loads(done.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("prompts, field, words", [
    ({"model": "ip-adapter-base_sd1"}, "image_prompts[1].image", "needs an image"),
    ({"image": "IMAGE"}, "image_prompts[1].model", "choose an IP-Adapter"),
    ({"image": "IMAGE", "model": "nothing-like-it"}, "image_prompts[1].model", "unknown control model"),
    ({"image": "IMAGE", "model": "ip-adapter-base_sd1", "weight": 3}, "image_prompts[1].weight", "2"),
    ({"image": "IMAGE", "model": "ip-adapter-base_sd1", "start": 0.9, "end": 0.1}, "image_prompts[1].start", "end"),
    ({"image": "IMAGE", "model": "ip-adapter-base_sd1", "strength": 1}, "image_prompts[1].strength", "unknown"),
    ({"image": "not base64!", "model": "ip-adapter-base_sd1"}, "image_prompts[1].image", ""),
    ("a string", "image_prompts[1]", "must be an object"),
    ({"image": "IMAGE", "model": "wide"}, "image_prompts[1].model", "models/clip_vision"),  # the engine's check
])
def test_a_bad_entry_is_a_422_naming_it(client, prompts, field, words):
    good = {"image": b64(prompt_image()), "model": "ip-adapter-base_sd1"}
    if isinstance(prompts, dict) and prompts.get("image") == "IMAGE":
        prompts = {**prompts, "image": good["image"]}
    answer = client.post("/sdapi/v1/txt2img", json={**BODY, "image_prompts": [good, prompts]})
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
    assert words in answer.json()["error"]
    assert client.get("/sdapi/v1/samplers").status_code == 200  # the server keeps answering


def test_the_list_itself_and_the_unit_limit(client):
    not_a_list = client.post("/sdapi/v1/txt2img", json={**BODY, "image_prompts": {"image": "x"}})
    assert not_a_list.status_code == 422 and not_a_list.json()["field"] == "image_prompts"
    entry = {"image": b64(prompt_image()), "model": "ip-adapter-base_sd1"}
    too_many = client.post("/sdapi/v1/txt2img", json={**BODY, "image_prompts": [entry] * 4})
    assert too_many.status_code == 422 and too_many.json()["field"] == "image_prompts"
    assert "ControlNet units and image prompts together" in json.dumps(too_many.json())
