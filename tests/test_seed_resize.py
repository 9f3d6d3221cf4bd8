"""Resize seed from (A1111's seed_resize_from_w/h): the noise of another size, pasted centred,
so a composition found at one size survives at another. Engine, infotext and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
from test_api import serve

from pipelines.core import infotext
from pipelines.core.request import GenerationRequest, RequestError
from pipelines.generate import noise as noise_module
from pipelines.generate import runner
from pipelines.generate.noise import noise_for_seed
from webui.api import ApiOptions, create_app

SEED = 1234
SHAPE_64 = (1, 4, 8, 8)  # 64x64 pixels
SHAPE_96x64 = (1, 4, 8, 12)  # width 96, height 64
SAMPLING = {"prompt": "a red circle", "seed": 7, "steps": 4, "sampler": "Euler", "save_images": False,
            "checkpoint": "tiny.safetensors"}


def test_the_centre_of_the_resized_noise_is_the_other_sizes_noise_exactly():
    small, _ = noise_for_seed(SEED, 0, 0.0, SHAPE_64)
    resized, _ = noise_for_seed(SEED, 0, 0.0, SHAPE_96x64, resize_from=(64, 64))
    plain, _ = noise_for_seed(SEED, 0, 0.0, SHAPE_96x64)
    assert resized.dtype == torch.float32 and resized.shape == SHAPE_96x64
    # offsets (12 - 8) // 2 = 2 latent columns, (8 - 8) // 2 = 0 rows
    assert torch.equal(resized[..., :, 2:10], small)
    # around it: the target size's own noise of the same seed
    assert torch.equal(resized[..., :, :2], plain[..., :, :2]) and torch.equal(resized[..., :, 10:], plain[..., :, 10:])
    # without seed resize, the centre is something else
    assert not torch.allclose(plain[..., :, 2:10], small)
    # off: a side <= 0 (A1111's API default is -1)
    for off in [None, (0, 0), (-1, -1), (64, 0)]:
        assert torch.equal(noise_for_seed(SEED, 0, 0.0, SHAPE_96x64, resize_from=off)[0], plain)


def test_the_variation_seed_is_blended_at_the_from_size():
    small, _ = noise_for_seed(SEED, 99, 0.3, SHAPE_64)
    resized, _ = noise_for_seed(SEED, 99, 0.3, SHAPE_96x64, resize_from=(64, 64))
    assert torch.equal(resized[..., :, 2:10], small)


def test_a_larger_from_size_is_centre_cropped_as_a1111_clips_it():
    big, _ = noise_for_seed(SEED, 0, 0.0, (1, 4, 13, 8))  # 64 wide, 104 high
    plain, _ = noise_for_seed(SEED, 0, 0.0, SHAPE_64)
    resized, _ = noise_for_seed(SEED, 0, 0.0, SHAPE_64, resize_from=(64, 104))
    # offset (8 - 13) // 2 = -3: rows 3..9 of the big noise fill rows 0..6; row 7 stays the target's
    assert torch.equal(resized[..., 0:7, :], big[..., 3:10, :])
    assert torch.equal(resized[..., 7:, :], plain[..., 7:, :])


def test_the_sampler_generator_is_where_it_would_be_without_resize():
    _, plain = noise_for_seed(SEED, 0, 0.0, SHAPE_96x64)
    _, resized = noise_for_seed(SEED, 0, 0.0, SHAPE_96x64, resize_from=(64, 64))
    assert torch.equal(torch.randn(5, generator=plain), torch.randn(5, generator=resized))


def test_request_validation_names_the_field():
    request = GenerationRequest(seed_resize_from_w=-1, seed_resize_from_h=-1)
    assert (request.seed_resize_from_w, request.seed_resize_from_h) == (0, 0)
    assert GenerationRequest(seed_resize_from_w=512.0, seed_resize_from_h=768).seed_resize_from_w == 512
    with pytest.raises(RequestError) as error:
        GenerationRequest(seed_resize_from_w=512)
    assert error.value.field == "seed_resize_from_h" and "both" in error.value.message
    with pytest.raises(RequestError) as error:
        GenerationRequest(seed_resize_from_w=4, seed_resize_from_h=64)
    assert error.value.field == "seed_resize_from_w"
    with pytest.raises(RequestError) as error:
        GenerationRequest(seed_resize_from_w=64, seed_resize_from_h=9000)
    assert error.value.field == "seed_resize_from_h"


def test_infotext_round_trip():
    request = GenerationRequest(prompt="p", seed=5, width=96, height=64, seed_resize_from_w=64, seed_resize_from_h=48)
    params = infotext.generation_params(request, seed=5, subseed=0, width=96, height=64, model_name="m",
                                        model_hash="0123456789", version="v")
    text = infotext.build_infotext("p", "", params)
    assert "Seed resize from: 64x48" in text
    keys = list(params)
    assert keys.index("Seed resize from") < keys.index("RNG")
    fields = infotext.request_fields_from_infotext(text)
    assert (fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (64, 48)
    pasted = GenerationRequest().replace(**{k: v for k, v in fields.items() if k not in ("model_name", "model_hash")})
    assert (pasted.seed_resize_from_w, pasted.seed_resize_from_h, pasted.width) == (64, 48, 96)
    plain = infotext.build_infotext("p", "", infotext.generation_params(
        GenerationRequest(seed=5), seed=5, subseed=0, width=64, height=64, model_name="m",
        model_hash=None, version="v"))
    assert "Seed resize" not in plain
    # a text without the key turns seed resize off when pasted
    assert infotext.request_fields_from_infotext(plain)["seed_resize_from_w"] == 0


def test_the_engine_draws_the_resized_noise_and_keeps_the_composition(engine, monkeypatch):
    drawn = []

    def recording(*args, **kwargs):
        noise, generator = noise_for_seed(*args, **kwargs)
        drawn.append(noise)
        return noise, generator

    monkeypatch.setattr(runner, "noise_for_seed", recording)
    small = engine.generate(GenerationRequest(width=64, height=64, **SAMPLING))
    resized = engine.generate(GenerationRequest(width=96, height=64, seed_resize_from_w=64, seed_resize_from_h=64,
                                                **SAMPLING))
    plain = engine.generate(GenerationRequest(width=96, height=64, **SAMPLING))
    assert torch.equal(drawn[1][..., :, 2:10], drawn[0]) and not torch.equal(drawn[2][..., :, 2:10], drawn[0])
    assert resized.images[0].size == (96, 64)
    assert "Seed resize from: 64x64" in resized.infotexts[0] and "Seed resize" not in plain.infotexts[0]

    def centre_difference(result) -> float:  # the middle 64 columns against the 64x64 image
        wide = np.asarray(result.images[0], dtype=np.float32)[:, 16:80]
        return float(np.abs(wide - np.asarray(small.images[0], dtype=np.float32)).mean())

    assert centre_difference(resized) < 0.5 * centre_difference(plain)


def test_noise_module_is_what_the_runner_uses():
    assert runner.noise_for_seed is noise_module.noise_for_seed


@pytest.fixture(scope="module")
def base_url(engine):
    with serve(create_app(engine, options=ApiOptions(sd_model_checkpoint="tiny.safetensors"))) as url:
        yield url


def test_api_fields_resize_the_seed(base_url):
    body = {"prompt": "a red circle", "seed": 7, "steps": 2, "sampler_name": "Euler", "width": 96, "height": 64,
            "seed_resize_from_w": 64, "seed_resize_from_h": 64}
    response = requests.post(f"{base_url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert "Seed resize from: 64x64" in info["infotexts"][0]
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (64, 64)
    assert not any("seed_resize" in warning for warning in info["warnings"])

    off = requests.post(f"{base_url}/sdapi/v1/txt2img", timeout=120,
                        json={**body, "seed_resize_from_w": -1, "seed_resize_from_h": -1}).json()
    info = json.loads(off["info"])
    assert "Seed resize" not in info["infotexts"][0] and info["seed_resize_from_w"] == -1

    bad = requests.post(f"{base_url}/sdapi/v1/txt2img", json={**body, "seed_resize_from_h": -1}, timeout=60)
    assert bad.status_code == 422 and bad.json()["field"] == "seed_resize_from_h"
