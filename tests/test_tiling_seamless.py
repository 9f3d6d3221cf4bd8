"""Seamless tiling (A1111's `tiling`) through the engine, the API and the infotext, on the tiny SD 1.x checkpoint.

The tiny model's random weights draw noise-like pictures, in which neighbouring columns differ
about as much as any two columns; a seam statistic alone cannot tell a tile from a non-tile.
What it can tell: a tiling picture has no edges. Its convolutions wrap around, so the same
noise rolled by half the picture gives the same picture rolled by half (the U-Net and the VAE
only see the torus). The old left/right (top/bottom) edges then meet in the middle of the
rolled picture: the wrap seam of one is an interior seam of the other. Without tiling the
zero padding makes the edges special, and the rolled noise draws another picture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from test_api import serve

from pipelines.core.infotext import parse_infotext, request_fields_from_infotext
from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest, RequestError
from pipelines.generate import runner, seamless
from webui import convert
from webui.api import ApiOptions, create_app


def req(**fields) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=3, width=64, height=64, seed=77,
                sampler="Euler", save_images=False, checkpoint="tiny.safetensors", tiling=True)
    return GenerationRequest(**{**base, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def roll_half(array: np.ndarray) -> np.ndarray:
    return np.roll(array, (array.shape[0] // 2, array.shape[1] // 2), axis=(0, 1))


@pytest.fixture
def rolled_noise(monkeypatch):
    """Every latent noise the engine draws, rolled by half its height and width."""
    draw = runner.noise_for_seed

    def rolled(*args, **kwargs):
        noise, generator = draw(*args, **kwargs)
        return torch.roll(noise, (noise.shape[-2] // 2, noise.shape[-1] // 2), dims=(-2, -1)), generator

    def use():
        monkeypatch.setattr(runner, "noise_for_seed", rolled)

    return use


def components(engine):
    return engine.manager.loaded("tiny.safetensors").components


def padding_modes(engine) -> set[str]:
    parts = components(engine)
    return {layer.padding_mode for module in (parts.unet, parts.vae) for layer in seamless.padded_convolutions(module)}


def seam_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two pictures."""
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("fields", [{}, {"enable_hr": True, "hr_denoising_strength": 0.5}],
                         ids=["txt2img", "hires-fix"])
def test_a_tiling_picture_has_no_edges(engine, rolled_noise, fields):
    plain = pixels(engine.generate(req(tiling=False, **fields)).images[0])
    tiled = pixels(engine.generate(req(**fields)).images[0])
    assert seam_gap(plain, tiled) > 5  # tiling changes the picture
    rolled_noise()
    plain_rolled = pixels(engine.generate(req(tiling=False, **fields)).images[0])
    tiled_rolled = pixels(engine.generate(req(**fields)).images[0])

    # with tiling: the rolled noise draws the rolled picture (float rounding aside) ...
    assert seam_gap(tiled_rolled, roll_half(tiled)) < 0.5
    # ... so the wrap seams (last column -> first, last row -> first) continue each other exactly as
    # the interior seams in the middle of the rolled picture do
    h, w = tiled.shape[:2]
    wrap_x, inner_x = seam_gap(tiled[:, -1], tiled[:, 0]), seam_gap(tiled_rolled[:, w // 2 - 1], tiled_rolled[:, w // 2])
    wrap_y, inner_y = seam_gap(tiled[-1], tiled[0]), seam_gap(tiled_rolled[h // 2 - 1], tiled_rolled[h // 2])
    assert abs(wrap_x - inner_x) < 1 and abs(wrap_y - inner_y) < 1
    # without it, the edges are edges: the rolled noise draws another picture
    assert seam_gap(plain_rolled, roll_half(plain)) > 5


def test_the_cached_model_keeps_zero_padding(engine, monkeypatch):
    engine.generate(req(tiling=False))  # loaded
    assert padding_modes(engine) == {"zeros"}
    seen = []
    decode = runner.decode_latents

    def watch(vae, latents, control=None):
        seen.append(padding_modes(engine))
        return decode(vae, latents, control)

    monkeypatch.setattr(runner, "decode_latents", watch)
    result = engine.generate(req())
    assert seen == [{"circular"}]  # the U-Net and the VAE wrap during the job
    assert padding_modes(engine) == {"zeros"}  # and not after it
    assert "Tiling: True" in result.infotexts[0] and result.warnings == []


def test_zero_padding_comes_back_after_a_failure_and_an_interrupt(engine, monkeypatch):
    engine.generate(req(tiling=False))

    def fail(*args, **kwargs):
        assert padding_modes(engine) == {"circular"}
        raise RuntimeError("the decoder broke")

    monkeypatch.setattr(runner, "decode_latents", fail)
    with pytest.raises(RuntimeError, match="the decoder broke"):
        engine.generate(req())
    assert padding_modes(engine) == {"zeros"}
    monkeypatch.undo()

    control = JobControl()

    def on_progress(progress):
        if progress is not None and progress.step == 1:
            control.interrupt()

    result = engine.generate(req(steps=6), on_progress=on_progress, control=control)
    assert result.interrupted and result.images == []
    assert padding_modes(engine) == {"zeros"}


def test_img2img_and_inpaint_tile_too(engine):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 64, 32))
    for fields in ({"mode": "img2img", "init_image": image},
                   {"mode": "inpaint", "init_image": image, "mask": mask}):
        plain = engine.generate(req(tiling=False, **fields))
        tiled = engine.generate(req(**fields))
        assert seam_gap(pixels(plain.images[0]), pixels(tiled.images[0])) > 1
        assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in plain.infotexts[0]
    assert padding_modes(engine) == {"zeros"}


def test_sd_upscale_wraps_its_tiles_around_the_edges(engine, monkeypatch):
    """SD upscale's tiles are crops: they are not padded circularly; with tiling they wrap around
    the picture's edges and the seam across the wrap is feathered like the others. Each tile here
    comes back brighter by its index, so every seam between tiles is a step to be blended."""
    calls = []

    def brighter_tiles(components, device, request, inputs, control, report, on_step=None):
        calls.append(padding_modes(engine))
        array = pixels(inputs.plan.image) + 20 * len(calls)
        return [Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))]

    monkeypatch.setattr(runner, "run_batch", brighter_tiles)
    x = np.arange(96)
    wave = (100 + 40 * np.sin(2 * np.pi * x / 96)).astype(np.uint8)  # repeats every 96 px
    source = Image.fromarray(np.stack([np.tile(wave, (96, 1))] * 3, axis=-1))

    def upscale(tiling: bool) -> np.ndarray:
        calls.clear()
        request = req(mode="img2img", init_image=source, width=64, height=64, tiling=tiling)
        result = engine.sd_upscale(request, upscaler="Lanczos", scale=1.0, overlap=16)
        assert {"zeros"} == set().union(*calls)  # crops keep their zero padding
        return pixels(result.images[0]), result.infotexts[0]

    plain, plain_text = upscale(False)
    tiled, tiled_text = upscale(True)
    assert plain.shape == tiled.shape == (96, 96, 3)
    assert "Tiling: True" in tiled_text and "Tiling" not in plain_text

    def steps(picture: np.ndarray, axis: int) -> tuple[float, float]:
        """(largest jump between neighbours inside, jump across the wrap) along `axis`."""
        inner = np.abs(np.diff(picture, axis=axis)).mean(axis=1 - axis).max()
        wrap = np.abs(np.take(picture, 0, axis=axis) - np.take(picture, -1, axis=axis)).mean()
        return float(inner), float(wrap)

    for axis in (0, 1):
        inner, wrap = steps(tiled, axis)
        assert wrap <= inner + 1  # the wrap is as smooth as any seam inside
        inner, wrap = steps(plain, axis)
        assert wrap > inner + 10  # without tiling: the first and the last tile meet unblended


def test_the_api_field_works_and_is_no_longer_ignored(engine):
    body = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 77,
            "sampler_name": "Euler", "tiling": True}
    with serve(create_app(engine, options=ApiOptions(sd_model_checkpoint="tiny.safetensors"))) as url:
        answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        plain = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "tiling": False}, timeout=120)
        bad = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "tiling": "sideways"}, timeout=30)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert parse_infotext(info["infotexts"][0])["Tiling"] == "True"
    assert not any("tiling" in warning.casefold() for warning in info["warnings"])
    assert answer.json()["parameters"]["tiling"] is True
    assert "Tiling" not in json.loads(plain.json()["info"])["infotexts"][0]
    assert answer.json()["images"][0] != plain.json()["images"][0]
    assert bad.status_code == 422 and "tiling" in bad.text


def test_infotext_round_trip_and_validation():
    text = ("cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, RNG: CPU, Tiling: True, "
            "Version: sdui")
    assert request_fields_from_infotext(text)["tiling"] is True
    assert request_fields_from_infotext(text.replace(", Tiling: True", ""))["tiling"] is False
    assert "tiling" not in request_fields_from_infotext("just a prompt")
    assert convert.ui_values_from_infotext(text)["tiling"] is True
    assert GenerationRequest(tiling=1).tiling is True
    with pytest.raises(RequestError) as info:
        GenerationRequest(tiling="yes")
    assert info.value.field == "tiling"


def test_a_vae_decoding_in_tiles_keeps_its_padding_and_the_job_says_so(engine):
    """Low-memory mode decodes in tiles; wrapping each tile onto itself would spoil it."""
    engine.generate(req(tiling=False))
    parts = components(engine)
    parts.vae.enable_tiling()
    try:
        warnings: list[str] = []
        with seamless.applied(parts, True, warnings) as switched:
            assert switched == len(seamless.padded_convolutions(parts.unet))
            assert {layer.padding_mode for layer in seamless.padded_convolutions(parts.vae)} == {"zeros"}
            assert {layer.padding_mode for layer in seamless.padded_convolutions(parts.unet)} == {"circular"}
        assert warnings == [seamless.VAE_TILED_NOTE]
    finally:
        parts.vae.disable_tiling()
    assert padding_modes(engine) == {"zeros"}
