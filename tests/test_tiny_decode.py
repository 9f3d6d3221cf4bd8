"""The fast final decode (pipelines/generate/tiny_decode.py): a job's images decoded by the TAESD
of models/VAE-approx instead of the full VAE, when the request asks (`tiny_vae_decode`).

Random weights cannot make TAESD's picture "close" to the VAE's, so the tests prove the path:
what the job returns is AutoencoderTiny's decode of the job's final latents, the full VAE is
untouched afterwards, the infotext says so and a paste asks for it again."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_engine
from test_taesd import original_layout, tiny_autoencoder, write
from tiny import make_tiny_sd1, write_tiny_sd1_checkpoint

from pipelines.core.checks import RequestError
from pipelines.generate import tiny_decode
from pipelines.generate.pixels import decode_latents
from pipelines.models import taesd

LATENTS = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 2


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def listed(path, name=None):
    return SimpleNamespace(name=name or path.name, path=path)


@pytest.fixture(scope="module")
def vae_approx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "VAE-approx"
    return write(folder / "taesd_decoder.safetensors", original_layout(tiny_autoencoder(seed=2)), "safetensors")


def test_only_a_file_of_the_checkpoints_family_is_taken(vae_approx):
    files = [listed(vae_approx)]
    assert tiny_decode.choose(False, [], "sdxl") is None  # not asked: nothing needed
    assert tiny_decode.choose(True, files, "sd1") is files[0]
    with pytest.raises(RequestError, match="tiny_vae_decode") as refused:
        tiny_decode.choose(True, files, "sdxl", "SDXL")
    assert "taesdxl_decoder.pth" in refused.value.message and "VAE-approx" in refused.value.message


def test_a_file_that_is_no_taesd_is_refused_naming_the_field(tmp_path):
    junk = tmp_path / "taesd_decoder.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RequestError, match="tiny_vae_decode") as refused:
        tiny_decode.prepare(True, [listed(junk)], taesd.TinyAutoencoders(), "sd1")
    assert "taesd_decoder.safetensors" in refused.value.message


def test_while_applied_the_runner_decodes_with_taesd_and_the_vae_is_its_own_afterwards(vae_approx):
    _, vae, _ = make_tiny_sd1(seed=4)
    components = SimpleNamespace(vae=vae, spec=SimpleNamespace(family=SimpleNamespace(name="sd1")))
    tiny = taesd.TinyAutoencoders().get(listed(vae_approx))
    full = decode_latents(vae, LATENTS)[0]
    with tiny_decode.applied([components, components], tiny):  # the same VAE twice: patched once
        fast = decode_latents(vae, LATENTS)[0]
    expected = taesd.to_images(tiny_autoencoder(seed=2).decode(LATENTS).sample)[0]
    assert np.abs(pixels(fast) - pixels(expected)).max() <= 1  # the same decode, up to float rounding
    assert not np.array_equal(pixels(fast), pixels(full))
    assert "decode" not in vae.__dict__
    assert np.array_equal(pixels(decode_latents(vae, LATENTS)[0]), pixels(full))


def test_a_family_the_tiny_decoder_does_not_fit_keeps_its_vae(vae_approx):
    _, vae, _ = make_tiny_sd1(seed=4)
    refiner = SimpleNamespace(vae=vae, spec=SimpleNamespace(family=SimpleNamespace(name="sdxl_refiner")))
    with tiny_decode.applied([refiner], taesd.TinyAutoencoders().get(listed(vae_approx))):
        assert "decode" not in vae.__dict__


# --- through the engine (the request field, the Generator's wiring, the infotext) --------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory, vae_approx):
    models = vae_approx.parent.parent
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", seed=0)
    return make_engine(models, tmp_path_factory.mktemp("tiny_decode_engine"))


def request(**fields):
    from pipelines.core.request import GenerationRequest

    base = dict(prompt="a red circle", steps=2, width=64, height=64, seed=11, sampler="Euler", save_images=False,
                checkpoint="tiny.safetensors", cfg_scale=1.0)
    return GenerationRequest(**{**base, **fields})


def test_a_job_decodes_its_final_latents_with_taesd(engine, monkeypatch):
    seen = []
    decode_samples = taesd.TinyAutoencoder.decode_samples

    def recording(self, latents):
        seen.append(latents.clone())
        return decode_samples(self, latents)

    monkeypatch.setattr(taesd.TinyAutoencoder, "decode_samples", recording)
    fast = engine.generate(request(tiny_vae_decode=True))
    full = engine.generate(request())
    assert len(seen) == 1  # the final decode, once; the plain job never used it
    expected = taesd.to_images(tiny_autoencoder(seed=2).decode(seen[0]).sample)[0]
    assert np.abs(pixels(fast.images[0]) - pixels(expected)).max() <= 1
    assert not np.array_equal(pixels(fast.images[0]), pixels(full.images[0]))


def test_the_infotext_says_so_and_a_paste_asks_for_it_again(engine):
    from pipelines.core.infotext import request_fields_from_infotext

    fast = engine.generate(request(tiny_vae_decode=True)).infotexts[0]
    full = engine.generate(request()).infotexts[0]
    assert "VAE decoder: TAESD" in fast and "VAE decoder" not in full
    assert request_fields_from_infotext(fast)["tiny_vae_decode"] is True
    assert request_fields_from_infotext(full)["tiny_vae_decode"] is False


def test_a_checkpoint_without_a_fitting_taesd_is_refused_by_field(tmp_path):
    models = tmp_path / "models"
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", seed=0)
    write(models / "VAE-approx" / "taesdxl_decoder.safetensors", original_layout(tiny_autoencoder()), "safetensors")
    with pytest.raises(RequestError, match="tiny_vae_decode") as refused:
        make_engine(models, tmp_path).generate(request(tiny_vae_decode=True))
    assert "taesd_decoder.pth" in refused.value.message


def test_the_api_takes_the_field_and_names_it_when_refused(engine):
    from fastapi.testclient import TestClient

    from webui.api import create_app

    client = TestClient(create_app(engine))
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 11, "cfg_scale": 1,
            "sampler_name": "Euler", "tiny_vae_decode": True}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200 and "VAE decoder: TAESD" in answer.json()["info"]
    refused = client.post("/sdapi/v1/txt2img", json={**body, "tiny_vae_decode": "sometimes"})
    assert refused.status_code == 422 and "tiny_vae_decode" in refused.text


def test_sd_upscale_decodes_its_tiles_with_taesd_too(engine, monkeypatch):
    from PIL import Image

    calls = []
    decode_samples = taesd.TinyAutoencoder.decode_samples
    monkeypatch.setattr(taesd.TinyAutoencoder, "decode_samples",
                        lambda self, latents: calls.append(latents.shape) or decode_samples(self, latents))
    picture = Image.new("RGB", (48, 48), (200, 40, 40))
    result = engine.sd_upscale(request(mode="img2img", init_image=picture, tiny_vae_decode=True), upscaler="Lanczos",
                               scale=2.0, overlap=16)
    assert calls and "VAE decoder: TAESD" in result.infotexts[0]
