"""Hires fix and SD upscale through the engine, on the tiny SD 1.x checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_upscale_models import write_tiny_esrgan

from pipelines.core.hires_info import fields_from_infotext
from pipelines.core.infotext import parse_infotext
from pipelines.core.request import GenerationRequest, RequestError
from pipelines.core.settings import EngineSettings, Paths
from pipelines.engine import Engine


def req(**fields) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=3, width=64, height=64, seed=1234,
                sampler="Euler", save_images=False, checkpoint="tiny.safetensors", enable_hr=True,
                hr_denoising_strength=0.5)
    return GenerationRequest(**{**base, **fields})


@pytest.fixture(scope="module")
def hr_engine(models_dir, tmp_path_factory) -> Engine:
    tmp = tmp_path_factory.mktemp("hires")
    write_tiny_esrgan(tmp / "ESRGAN" / "4x-Tiny.pth")
    return Engine(Paths(models_dir=models_dir, esrgan_dir=tmp / "ESRGAN", data_dir=tmp / "data",
                        outdir=tmp / "outputs"), EngineSettings(device="cpu"))


def test_latent_hires_doubles_the_size_and_writes_a1111_keys(hr_engine):
    seen = []
    result = hr_engine.generate(req(hr_second_pass_steps=4), on_progress=seen.append)
    assert result.images[0].size == (128, 128)
    text = result.infotexts[0]
    info = parse_infotext(text)
    assert info["Size"] == "64x64"  # A1111 writes the first pass's size
    assert info["Hires upscale"] == "2" and info["Hires upscaler"] == "Latent"
    assert info["Hires steps"] == "4" and info["Denoising strength"] == "0.5"
    line = text.splitlines()[-1]
    assert line.index("Denoising strength") < line.index("Hires upscale") < line.index("Hires steps") \
        < line.index("Hires upscaler") < line.index("Version")
    # 3 first-pass steps, then int(4 * 0.5) = 2 second-pass steps, one progress bar
    assert [p.step for p in seen] == [1, 2, 3, 4, 5] and {p.steps for p in seen} == {5}


def test_hires_is_deterministic_and_differs_from_a_plain_upscale(hr_engine):
    a = hr_engine.generate(req()).images[0]
    b = hr_engine.generate(req()).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    base = hr_engine.generate(req(enable_hr=False)).images[0]
    assert base.size == (64, 64)
    plain = np.asarray(base.resize((128, 128), Image.LANCZOS), dtype=np.int16)
    assert np.abs(np.asarray(a, dtype=np.int16) - plain).mean() > 1


@pytest.mark.parametrize("mode", ["Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                                  "Latent (nearest)", "Latent (nearest-exact)"])
def test_every_latent_mode(hr_engine, mode):
    result = hr_engine.generate(req(hr_upscaler=mode, hr_scale=1.5, steps=2))
    assert result.images[0].size == (96, 96)
    assert f"Hires upscaler: {mode}" in result.infotexts[0]


def test_pixel_upscalers_and_resize_to(hr_engine):
    result = hr_engine.generate(req(hr_upscaler="4x-Tiny", hr_resize_x=128, hr_resize_y=96, steps=2))
    assert result.images[0].size == (128, 96)
    info = parse_infotext(result.infotexts[0])
    assert info["Hires resize"] == "128x96" and info["Hires upscaler"] == "4x-Tiny" and "Hires upscale" not in info
    one_side = hr_engine.generate(req(hr_upscaler="Lanczos", hr_resize_x=96, width=64, height=128, steps=2))
    assert one_side.images[0].size == (96, 192)


def test_second_pass_sampler_and_prompt(hr_engine):
    result = hr_engine.generate(req(hr_sampler="DPM++ 2M", hr_schedule_type="Karras", hr_prompt="a blue square",
                                    steps=2, batch_size=2))
    assert [i.size for i in result.images] == [(128, 128)] * 2 and result.seeds == [1234, 1235]
    info = parse_infotext(result.infotexts[0])
    assert info["Hires sampler"] == "DPM++ 2M" and info["Hires schedule type"] == "Karras"
    assert info["Hires prompt"] == "a blue square" and "Hires negative prompt" not in info
    assert fields_from_infotext(info)["hr_sampler"] == "DPM++ 2M"


def test_hires_fields_round_trip_through_the_infotext(hr_engine):
    request = req(hr_upscaler="Latent (bicubic)", hr_scale=1.5, hr_second_pass_steps=5, steps=2)
    text = hr_engine.generate(request).infotexts[0]
    fields = fields_from_infotext(parse_infotext(text))
    assert fields == {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 5, "hr_denoising_strength": 0.5,
                      "hr_upscaler": "Latent (bicubic)"}


def test_validation():
    with pytest.raises(RequestError) as info:
        GenerationRequest(enable_hr=True, hr_scale=9)
    assert info.value.field == "hr_scale"
    with pytest.raises(RequestError) as info:
        GenerationRequest(enable_hr=True, width=2048, height=2048, hr_scale=4)
    assert info.value.field == "hr_scale" and "8192x8192" in info.value.message
    with pytest.raises(RequestError) as info:
        GenerationRequest(hr_sampler="Nope")
    assert info.value.field == "hr_sampler"
    with pytest.raises(RequestError) as info:
        GenerationRequest(mode="img2img", init_image=Image.new("RGB", (8, 8)), enable_hr=True)
    assert info.value.field == "enable_hr"
    assert GenerationRequest(hr_sampler="Use same sampler").hr_sampler is None
    assert GenerationRequest(hr_upscaler=None).hr_upscaler == "Latent"


def test_unknown_hires_upscaler_fails_before_running(hr_engine):
    with pytest.raises(RequestError) as info:
        hr_engine.generate(req(hr_upscaler="8x-Nothing"))
    assert info.value.field == "hr_upscaler" and "Latent (nearest-exact)" in info.value.message


def test_sd_upscale_tiles_and_blends(hr_engine):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 56, 3), dtype=np.uint8))
    request = GenerationRequest(mode="img2img", init_image=init, prompt="x", steps=2, width=64, height=64,
                                seed=5, sampler="Euler", denoising_strength=0.5, save_images=False,
                                checkpoint="tiny.safetensors")
    seen = []
    result = hr_engine.sd_upscale(request, upscaler="4x-Tiny", scale=2, overlap=16, on_progress=seen.append)
    assert result.images[0].size == (112, 96)
    info = parse_infotext(result.infotexts[0])
    assert info["SD upscale overlap"] == "16" and info["SD upscale upscaler"] == "4x-Tiny"
    assert info["Denoising strength"] == "0.5"
    assert len(seen) == 4 and seen[-1].fraction == 1.0  # 2x2 tiles, int(2 * 0.5) = 1 step each
    with pytest.raises(RequestError):
        hr_engine.sd_upscale(request.replace(mode="txt2img"))


def test_hires_fields_from_a_pasted_a1111_text_never_fail():
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.45, "
            "Hires resize: 1024x768, Hires steps: 15, Hires upscaler: 4x-UltraSharp, Hires sampler: Nope, "
            "Hires upscale: 99")
    fields = fields_from_infotext(parse_infotext(text))
    assert fields == {"enable_hr": True, "hr_resize_x": 1024, "hr_resize_y": 768, "hr_second_pass_steps": 15,
                      "hr_denoising_strength": 0.45, "hr_upscaler": "4x-UltraSharp"}
    GenerationRequest(**fields)
    assert fields_from_infotext(parse_infotext("a cat\nSteps: 20, Seed: 1")) == {}
