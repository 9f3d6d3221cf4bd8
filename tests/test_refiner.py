"""The refiner (A1111 1.6's refiner_checkpoint / refiner_switch_at) and hires fix's own checkpoint
(hr_checkpoint_name): the steps after the switch run on the other checkpoint, with its own text
encoders, from the same latents and scheduler state; both are written into the infotext and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
from conftest import make_engine
from lora_files import kohya_targets, lora_file
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import save_file
from test_api import serve
from tiny import write_tiny_checkpoint

from pipelines.core import infotext
from pipelines.core.request import HR_SAME_CHECKPOINT, GenerationRequest, RequestError
from pipelines.generate import lora_merge, schedulers
from pipelines.generate.prompts import encode_prompts
from pipelines.generate.runner import decode_latents
from pipelines.models.build import load_components
from webui import convert
from webui.api import ApiOptions, create_app

BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=7, steps=6, sampler="Euler", cfg_scale=1.0,
            width=64, height=64, save_images=False, checkpoint="base.safetensors")


@pytest.fixture(scope="module")
def refiner_engine(tmp_path_factory):
    """SD 1.x base and a second SD 1.x checkpoint (other weights), a tiny SDXL base and refiner; an SD 1.x LoRA."""
    root = tmp_path_factory.mktemp("refiner-models")
    folder = root / "Stable-diffusion"
    base = write_tiny_checkpoint(folder / "base.safetensors", family="sd1", seed=0, dtype=None)
    (root / "Lora").mkdir()
    save_file(lora_file(kohya_targets(load_components(base))), str(root / "Lora" / "red.safetensors"))
    write_tiny_checkpoint(folder / "other.safetensors", family="sd1", seed=3, dtype=None)
    write_tiny_checkpoint(folder / "xl.safetensors", family="sdxl", seed=4, dtype=None)
    write_tiny_checkpoint(folder / "xl-refiner.safetensors", family="sdxl_refiner", seed=5, dtype=None)
    return make_engine(root, tmp_path_factory.mktemp("refiner-engine"))


def generate(engine, **changes):
    result = engine.generate(GenerationRequest(**{**BASE, **changes}))
    assert result.images, result.warnings
    return result


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def test_a_switch_at_1_is_the_base_image_exactly(refiner_engine):
    plain = generate(refiner_engine)
    never = generate(refiner_engine, refiner_checkpoint="other.safetensors", refiner_switch_at=1.0)
    assert np.array_equal(pixels(plain), pixels(never))
    assert "Refiner" not in infotext.parse_infotext(never.infotexts[0])  # as A1111: no step ran on it


def manual_reference(engine, switch_step: int) -> np.ndarray:
    """The base for the first `switch_step` Euler steps and the other checkpoint for the rest,
    with diffusers' scheduler and each model's own prompt encoding (no CFG)."""
    base = engine.manager.get("base.safetensors", engine.resolve_checkpoint("base.safetensors").path).components
    other = engine.manager.get("other.safetensors", engine.resolve_checkpoint("other.safetensors").path).components
    scheduler = schedulers.make_scheduler("Euler", "Automatic", base.scheduler_config)
    scheduler.set_timesteps(BASE["steps"])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(BASE["seed"]), dtype=torch.float32)
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model = base if i < switch_step else other
            cond = encode_prompts(model, BASE["prompt"], BASE["negative_prompt"], 1, "cpu").at(i, BASE["steps"]).cond
            prediction = model.unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=cond).sample
            latents = scheduler.step(prediction, t, latents).prev_sample
        image = decode_latents(other.vae, latents)[0]
    return np.asarray(image, dtype=np.int16)


def test_a_switch_at_half_runs_the_rest_on_the_refiner(refiner_engine):
    plain = generate(refiner_engine)
    refined = generate(refiner_engine, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)
    assert np.abs(pixels(refined) - pixels(plain)).mean() > 1  # the last three steps ran on other weights
    assert np.abs(pixels(refined) - manual_reference(refiner_engine, 3)).max() <= 1
    other = refiner_engine.resolve_checkpoint("other.safetensors")
    fields = infotext.parse_infotext(refined.infotexts[0])
    assert fields["Refiner"] == f"other [{other.short_hash}]" and fields["Refiner switch at"] == "0.5"
    assert fields["Model"] == "base"
    assert not any("refiner" in w.lower() for w in refined.warnings)


def test_the_sdxl_refiner_takes_over_with_its_own_conditioning(refiner_engine):
    xl = dict(checkpoint="xl.safetensors", cfg_scale=5.0)
    plain = generate(refiner_engine, **xl)
    refined = generate(refiner_engine, **xl, refiner_checkpoint="xl-refiner", refiner_switch_at=0.5)
    assert np.isfinite(pixels(refined)).all()
    assert np.abs(pixels(refined) - pixels(plain)).mean() > 1
    fields = infotext.parse_infotext(refined.infotexts[0])
    refiner = refiner_engine.resolve_checkpoint("xl-refiner.safetensors")
    assert fields["Refiner"] == f"xl-refiner [{refiner.short_hash}]"


def test_a_refiner_of_other_latents_or_an_unknown_one_is_refused_naming_the_field(refiner_engine):
    with pytest.raises(RequestError) as unknown:
        generate(refiner_engine, refiner_checkpoint="nope.safetensors", refiner_switch_at=0.5)
    assert unknown.value.field == "refiner_checkpoint"
    with pytest.raises(RequestError) as other_latents:
        generate(refiner_engine, refiner_checkpoint="xl-refiner.safetensors", refiner_switch_at=0.5)
    assert other_latents.value.field == "refiner_checkpoint" and "SDXL refiner" in other_latents.value.message
    with pytest.raises(RequestError) as bad_switch:
        GenerationRequest(refiner_checkpoint="other", refiner_switch_at=1.5)
    assert bad_switch.value.field == "refiner_switch_at"
    assert GenerationRequest(refiner_checkpoint="None").refiner_checkpoint is None
    assert GenerationRequest(hr_checkpoint_name=HR_SAME_CHECKPOINT).hr_checkpoint_name is None


def test_the_hires_checkpoint_runs_the_second_pass(refiner_engine):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_denoising_strength=0.6, steps=4)
    same = generate(refiner_engine, **hires)
    other = generate(refiner_engine, **hires, hr_checkpoint_name="other.safetensors")
    assert same.images[0].size == other.images[0].size == (96, 96)
    assert np.abs(pixels(other) - pixels(same)).mean() > 1
    fields = infotext.parse_infotext(other.infotexts[0])
    file = refiner_engine.resolve_checkpoint("other.safetensors")
    assert fields["Hires checkpoint"] == f"other [{file.short_hash}]"
    assert "Hires checkpoint" not in infotext.parse_infotext(same.infotexts[0])
    pixel = generate(refiner_engine, **{**hires, "hr_upscaler": "Lanczos"}, hr_checkpoint_name="other")
    assert pixel.images[0].size == (96, 96)


def test_the_infotext_is_read_back_into_the_fields(refiner_engine):
    refined = generate(refiner_engine, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5,
                       enable_hr=True, hr_scale=1.5, steps=2, hr_checkpoint_name="other.safetensors")
    values = convert.ui_values_from_infotext(refined.infotexts[0], find_checkpoint=refiner_engine.find_checkpoint)
    assert values["refiner_checkpoint"] == "other.safetensors" and values["refiner_switch_at"] == 0.5
    assert values["hr_checkpoint_name"] == "other.safetensors"
    plain = convert.ui_values_from_infotext(generate(refiner_engine, steps=2).infotexts[0],
                                            find_checkpoint=refiner_engine.find_checkpoint)
    assert plain["refiner_checkpoint"] == "None"
    fields = infotext.request_fields_from_infotext(refined.infotexts[0])
    assert GenerationRequest(**{k: v for k, v in fields.items() if not k.startswith(("model_", "vae_"))}
                             ).refiner_switch_at == 0.5


@pytest.fixture(scope="module")
def api_url(refiner_engine):
    with serve(create_app(refiner_engine, options=ApiOptions(sd_model_checkpoint="base.safetensors"))) as url:
        yield url


def test_the_api_fields_work_without_an_ignored_warning(api_url, refiner_engine):
    body = {"prompt": "a red circle", "seed": 7, "steps": 4, "sampler_name": "Euler", "width": 64, "height": 64,
            "refiner_checkpoint": "other", "refiner_switch_at": 0.5, "enable_hr": True, "hr_scale": 1.5,
            "hr_checkpoint_name": "other.safetensors"}
    response = requests.post(f"{api_url}/sdapi/v1/txt2img", json=body, timeout=300)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert not any("refiner" in w or "hr_checkpoint" in w for w in info["warnings"]), info["warnings"]
    fields = infotext.parse_infotext(info["infotexts"][0])
    file = refiner_engine.resolve_checkpoint("other.safetensors")
    assert fields["Refiner"] == f"other [{file.short_hash}]" and fields["Hires checkpoint"] == fields["Refiner"]
    bad = requests.post(f"{api_url}/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "nope"}, timeout=60)
    assert bad.status_code == 422 and "refiner_checkpoint" in bad.text
    bad = requests.post(f"{api_url}/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": "nope"}, timeout=60)
    assert bad.status_code == 422 and "hr_checkpoint_name" in bad.text


def test_when_both_do_not_fit_the_budget_the_evicted_base_stays_safe_until_the_job_ends(refiner_engine, tmp_path):
    expected = generate(refiner_engine, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)
    engine = make_engine(refiner_engine.paths.models_dir, tmp_path)
    engine.load_checkpoint("base.safetensors")
    engine.manager.budget_bytes = int(engine.manager.cached_bytes() * 1.5)  # room for one of the two
    result = generate(engine, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)
    assert np.abs(pixels(result) - pixels(expected)).max() <= 1
    assert any("do not fit the model memory budget" in w and "base.safetensors left the model cache" in w
               for w in result.warnings), result.warnings
    assert engine.loaded_checkpoints() == ["other.safetensors"]


def test_seamless_tiling_applies_to_the_refiner_too_and_leaves_both_models_as_they_were(refiner_engine):
    generate(refiner_engine, steps=1, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)  # loads it
    refiner_unet = refiner_engine.manager.loaded("other.safetensors").components.unet
    modes = []
    hook = refiner_unet.conv_in.register_forward_hook(lambda conv, args, out: modes.append(conv.padding_mode))
    try:
        result = generate(refiner_engine, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5, tiling=True)
    finally:
        hook.remove()
    assert modes and set(modes) == {"circular"}  # the refiner's steps ran with circular padding
    assert "Tiling: True" in result.infotexts[0] and "Refiner: other" in result.infotexts[0]
    for name in ("base.safetensors", "other.safetensors"):
        unet = refiner_engine.manager.loaded(name).components.unet
        assert {conv.padding_mode for conv in unet.modules() if isinstance(conv, torch.nn.Conv2d)} == {"zeros"}


def test_a_lora_applies_to_a_refiner_of_the_same_family_too(refiner_engine):
    generate(refiner_engine, steps=1, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)  # loads it
    components = refiner_engine.manager.loaded("other.safetensors").components
    tuned = []
    hook = components.unet.register_forward_pre_hook(
        lambda module, args: tuned.append(lora_merge.merged_bytes(components) > 0))
    try:
        result = generate(refiner_engine, prompt="a red circle <lora:red:1>", refiner_checkpoint="other.safetensors",
                          refiner_switch_at=0.5)
    finally:
        hook.remove()
    assert tuned and all(tuned)  # the refiner's steps ran with the LoRA merged in
    assert not any(isinstance(m, BaseTunerLayer) for m in components.unet.modules())  # no peft layers left
    assert "Lora hashes" in result.infotexts[0] and not any("LoRA" in w for w in result.warnings)
    generate(refiner_engine, steps=1, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)
    assert lora_merge.merged_bytes(components) == 0  # a job without it: the refiner's own weights


def test_img2img_and_inpaint_switch_to_the_refiner_too(refiner_engine):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for mode, extra in (("img2img", {}), ("inpaint", {"mask": mask, "mask_blur": 0})):
        fields = dict(mode=mode, init_image=init, denoising_strength=0.8, **extra)
        plain = generate(refiner_engine, **fields)
        refined = generate(refiner_engine, **fields, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)
        assert np.abs(pixels(refined) - pixels(plain)).mean() > 0.5, mode
        assert "Refiner: other" in refined.infotexts[0]
    outside = np.asarray(mask) == 0
    assert np.abs(pixels(refined)[outside] - pixels(plain)[outside]).mean() < 3  # the unmasked part stays


def test_sd_upscale_says_it_did_not_use_the_refiner(refiner_engine):
    """SD upscale runs every tile on one model: a refiner in its request is reported, not dropped."""
    request = GenerationRequest(**{**BASE, "mode": "img2img", "init_image": Image.new("RGB", (48, 48), "teal"),
                                   "denoising_strength": 0.3, "steps": 2, "refiner_checkpoint": "other.safetensors",
                                   "refiner_switch_at": 0.5})
    result = refiner_engine.sd_upscale(request, upscaler="Lanczos", scale=1.0, overlap=8)
    assert result.images
    assert any("refiner_checkpoint" in w and "not used" in w for w in result.warnings), result.warnings
    assert "Refiner" not in result.infotexts[0]
