"""ControlNet and T2I-Adapter in our denoising loop against diffusers' reference pipelines, on the same
tiny models, prompt embeddings, noise and sampler (full precision): the images must agree (>= 40 dB),
and a unit at weight 0 or ending at step 0 must give the image without it, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.core.control import ControlUnit
from pipelines.core.request import GenerationRequest
from pipelines.generate import runner, schedulers
from pipelines.generate.control import LoadedControl
from pipelines.generate.prompts import encode_prompts
from pipelines.models.build import load_components

SIZE = 64
BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=11, steps=4, sampler="Euler", cfg_scale=5.0,
            width=SIZE, height=SIZE, save_images=False)


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i.convert("RGB"), dtype=np.float64) for i in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def edges_map() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(image).rectangle((16, 12, 48, 52), outline="white", width=3)
    return image


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """The zero-initialised layers (a fresh ControlNet's zero convolutions, which make it a no-op)
    and the hint encoder random, strong enough to steer the image."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, p in module.named_parameters():
            if not p.detach().abs().sum() or "cond_embedding" in name or "controlnet_" in name:
                p.data = torch.randn_like(p) * scale
    return module.eval()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("cn") / "sd1.safetensors", family="sd1", seed=0, dtype=None)
    return load_components(path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("cnxl") / "xl.safetensors", family="sdxl", seed=0,
                                 dtype=None)
    return load_components(path)


def ours(components, controls, **changes) -> Image.Image:
    request = GenerationRequest(**{**BASE, **changes}).with_resolved_seeds()
    batches = list(runner.run(components, "cpu", request, controls=controls))
    return batches[0].images[0]


def noise(components) -> torch.Tensor:
    from pipelines.generate.noise import noise_for_seed

    shape = (1, components.unet.config.out_channels, SIZE // 8, SIZE // 8)
    return noise_for_seed(BASE["seed"], BASE["seed"], 0.0, shape, (0, 0))[0]


def reference_controlnet(components, controlnet, image, **kwargs) -> Image.Image:
    """diffusers' ControlNet pipeline (SD 1.x or SDXL) with our prompt embeddings and noise."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cond = encode_prompts(components, BASE["prompt"], BASE["negative_prompt"], 1, "cpu").at(0, BASE["steps"])
    scheduler = schedulers.make_scheduler(BASE["sampler"], "Automatic", components.scheduler_config)
    common = dict(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, image=image, latents=noise(components),
                  num_inference_steps=BASE["steps"], guidance_scale=BASE["cfg_scale"], output_type="pil",
                  height=SIZE, width=SIZE, **kwargs)
    if cond.pooled_cond is not None:
        pipe = StableDiffusionXLControlNetPipeline(
            vae=components.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=components.unet, controlnet=controlnet, scheduler=scheduler, force_zeros_for_empty_prompt=False)
        common.update(pooled_prompt_embeds=cond.pooled_cond, negative_pooled_prompt_embeds=cond.pooled_uncond)
    else:
        pipe = StableDiffusionControlNetPipeline(
            vae=components.vae, text_encoder=None, tokenizer=None, unet=components.unet, controlnet=controlnet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**common).images[0]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_controlnet_matches_diffusers_pipeline(family, request):
    from diffusers import ControlNetModel

    components = request.getfixturevalue(family)
    controlnet = randomized(ControlNetModel.from_unet(components.unet), seed=3)
    image = edges_map()
    unit = ControlUnit(model="tiny", weight=1.5, guidance_start=0.0, guidance_end=0.75)
    got = ours(components, [LoadedControl(unit, controlnet, image)])
    want = reference_controlnet(components, controlnet, image, controlnet_conditioning_scale=1.5,
                                control_guidance_start=0.0, control_guidance_end=0.75)
    plain = ours(components, [])
    assert psnr(got, want) >= 40
    assert psnr(want, plain) < 35  # the unit steers the image far beyond the tolerance


def test_controlnet_is_more_important_is_diffusers_guess_mode(sd1):
    from diffusers import ControlNetModel

    controlnet = randomized(ControlNetModel.from_unet(sd1.unet), seed=4)
    unit = ControlUnit(model="tiny", control_mode="ControlNet is more important")
    got = ours(sd1, [LoadedControl(unit, controlnet, edges_map())])
    want = reference_controlnet(sd1, controlnet, edges_map(), guess_mode=True)
    assert psnr(got, want) >= 40
    balanced = ours(sd1, [LoadedControl(unit.replace(control_mode="Balanced"), controlnet, edges_map())])
    assert psnr(got, balanced) < 40  # the modes differ


def test_t2i_adapter_matches_diffusers_pipeline(sd1):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)  # the adapter's default initialisation: the same whatever ran before
        adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8,
                             adapter_type="full_adapter")
    adapter = randomized(adapter, seed=5, scale=1.0)
    image = edges_map()
    got = ours(sd1, [LoadedControl(ControlUnit(model="tiny", weight=1.5), adapter, image)])
    cond = encode_prompts(sd1, BASE["prompt"], BASE["negative_prompt"], 1, "cpu").at(0, BASE["steps"])
    pipe = StableDiffusionAdapterPipeline(
        vae=sd1.vae, text_encoder=None, tokenizer=None, unet=sd1.unet, adapter=adapter,
        scheduler=schedulers.make_scheduler(BASE["sampler"], "Automatic", sd1.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, image=image, latents=noise(sd1),
                num_inference_steps=BASE["steps"], guidance_scale=BASE["cfg_scale"], height=SIZE, width=SIZE,
                adapter_conditioning_scale=1.5).images[0]
    assert psnr(got, want) >= 40
    assert psnr(want, ours(sd1, [])) < 38  # far beyond the fidelity tolerance


@pytest.mark.parametrize("changes", [dict(weight=0.0), dict(guidance_start=0.0, guidance_end=0.0)])
def test_a_unit_that_never_acts_leaves_the_image_exactly(sd1, changes):
    from diffusers import ControlNetModel

    controlnet = randomized(ControlNetModel.from_unet(sd1.unet), seed=6)
    unit = ControlUnit(model="tiny", **changes)
    got = ours(sd1, [LoadedControl(unit, controlnet, edges_map())])
    assert np.array_equal(np.asarray(got), np.asarray(ours(sd1, [])))
