"""Few-step samplers (LCM, TCD) against diffusers' own loop, and recognising few-step models.

The fidelity tests run a tiny U-Net (tests/tiny.py) through our sampling loop (the runner's:
`noise.noise_for_seed` per image, `schedulers.make_scheduler` from the checkpoint's schedule,
`schedulers.step` with one generator per image) and through diffusers' StableDiffusionPipeline
with diffusers' scheduler class on the same latents and generators; then the whole engine
against the pipeline on the same loaded checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import make_tiny_sd1

from pipelines.core import samplers
from pipelines.core.request import GenerationRequest
from pipelines.generate import schedulers
from pipelines.generate.noise import noise_for_seed
from pipelines.models.families import SD_SCHEDULE
from pipelines.models.few_step import recommended_settings

FEW_STEP = {"LCM": "LCMScheduler", "TCD": "TCDScheduler"}
TCD_GAMMA = 0.3  # TCD's recommended gamma: diffusers' step default, but its pipelines pass eta=0 unless told


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def draw_noise(seeds, shape=(1, 4, 8, 8)):
    draws = [noise_for_seed(seed, seed, 0.0, shape) for seed in seeds]
    return torch.cat([n for n, _ in draws]), [g for _, g in draws]


def diffusers_pipeline(unet, vae, text_encoder, sampler, tokenizer=None):
    import diffusers

    scheduler = getattr(diffusers, FEW_STEP[sampler]).from_config(SD_SCHEDULE)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def our_loop(unet, sampler, cond, uncond, cfg_scale, seeds, steps):
    """The runner's steps 1-4 for txt2img: per-image noise, the table's scheduler, CFG, our step."""
    noise, generators = draw_noise(seeds)
    scheduler = schedulers.make_scheduler(sampler, "Automatic", SD_SCHEDULE)
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    use_cfg = cfg_scale != 1.0
    context = torch.cat([uncond, cond]) if use_cfg else cond
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        model_in = torch.cat([model_in, model_in]) if use_cfg else model_in
        prediction = unet(model_in, t, encoder_hidden_states=context).sample
        if use_cfg:
            pred_uncond, pred_cond = prediction.chunk(2)
            prediction = pred_uncond + cfg_scale * (pred_cond - pred_uncond)
        latents = schedulers.step(scheduler, prediction, t, latents, generators)
    return latents


@pytest.fixture(scope="module")
def tiny_sd1():
    return make_tiny_sd1(seed=2)


@pytest.mark.parametrize("sampler,cfg_scale", [("LCM", 1.0), ("LCM", 1.5), ("TCD", 1.0), ("TCD", 2.0)])
def test_sampling_loop_matches_diffusers_scheduler_loop(tiny_sd1, sampler, cfg_scale):
    unet, vae, text_encoder = tiny_sd1
    gen = torch.Generator().manual_seed(9)
    cond, uncond = torch.randn(2, 77, 64, generator=gen), torch.randn(2, 77, 64, generator=gen)
    ours = our_loop(unet, sampler, cond, uncond, cfg_scale, seeds=[5, 6], steps=4)

    noise, generators = draw_noise([5, 6])
    extra = {"eta": TCD_GAMMA} if sampler == "TCD" else {}
    theirs = diffusers_pipeline(unet, vae, text_encoder, sampler)(
        prompt_embeds=cond, negative_prompt_embeds=uncond if cfg_scale > 1 else None, num_inference_steps=4,
        guidance_scale=cfg_scale, latents=noise, generator=generators, height=64, width=64,
        output_type="latent", **extra).images
    peak = float(theirs.abs().max())
    assert psnr(ours.numpy(), theirs.numpy(), peak) >= 40.0
    # the step noise is drawn: other generators give another result
    assert samplers.is_stochastic(sampler)
    other = our_loop(unet, sampler, cond, uncond, cfg_scale, seeds=[7, 8], steps=4)
    assert not torch.allclose(other, ours)


def test_tcd_and_lcm_take_their_timesteps_from_the_distillation_grid():
    for sampler in FEW_STEP:
        scheduler = schedulers.make_scheduler(sampler, "Automatic", SD_SCHEDULE)
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
        assert samplers.allowed_schedule_types(sampler) == ("Automatic", "Uniform")
    assert samplers.parse_sampler_name("tcd") == ("TCD", "Automatic")


def test_engine_generates_what_diffusers_generates_with_tcd(engine):
    """The whole job (prompt encoding, per-image noise, TCD, decode) equals diffusers'
    StableDiffusionPipeline on the same loaded checkpoint, image for image (>= 40 dB)."""
    request = GenerationRequest(prompt="a red circle", steps=4, cfg_scale=1.0, sampler="TCD", seed=21,
                                batch_size=2, width=64, height=64, save_images=False, checkpoint="tiny.safetensors")
    result = engine.generate(request)
    components = engine.manager.loaded("tiny.safetensors").components
    pipe = diffusers_pipeline(components.unet, components.vae, components.text_encoders[0], "TCD",
                              tokenizer=components.tokenizers[0])
    generators = [torch.Generator().manual_seed(s) for s in (21, 22)]  # the pipeline draws the noise itself
    theirs = pipe(prompt="a red circle", num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                  num_images_per_prompt=2, generator=generators, eta=TCD_GAMMA, output_type="np").images
    for ours, reference in zip(result.images, theirs):
        assert psnr(np.asarray(ours.convert("RGB")), reference * 255.0, 255.0) >= 40.0


# -- recognising few-step files --------------------------------------------------------------

NAMED = [
    ("lcm-lora-sdv1-5.safetensors", None, ("LCM", "Automatic", 4, 1.0)),
    ("LCM_Dreamshaper_v7.safetensors", None, ("LCM", "Automatic", 4, 1.0)),
    ("TCD-SDXL-LoRA.safetensors", None, ("TCD", "Automatic", 4, 1.0)),
    ("Hyper-SD15-4steps-lora.safetensors", None, ("DDIM", "SGM Uniform", 4, 1.0)),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", None, ("DDIM", "SGM Uniform", 8, 5.0)),
    ("Hyper-SDXL-1step-lora.safetensors", None, ("TCD", "Automatic", 1, 1.0)),
    ("Hyper-SDXL-1step-Unet.safetensors", None, ("LCM", "Automatic", 1, 1.0)),
    ("sdxl_lightning_2step_lora.safetensors", None, ("Euler", "SGM Uniform", 2, 1.0)),
    ("sdxl_lightning_8step.safetensors", None, ("Euler", "SGM Uniform", 8, 1.0)),
    ("dreamshaperXL_lightningDPMSDE.safetensors", None, ("DPM++ SDE", "Karras", 4, 1.0)),
    ("sd_turbo.safetensors", None, ("Euler a", "SGM Uniform", 1, 1.0)),
    ("sdxl_turbo_1.0_fp16.safetensors", None, ("Euler a", "SGM Uniform", 1, 1.0)),
    ("turbovisionXL_v431.safetensors", None, ("Euler a", "SGM Uniform", 4, 1.0)),
    # renamed files: the metadata names them
    ("pytorch_lora_weights.safetensors", {"ss_output_name": "lcm_lora_sdxl"}, ("LCM", "Automatic", 4, 1.0)),
    ("my-fast-model.safetensors", {"modelspec.title": "SDXL-Lightning 4-step"}, ("Euler", "SGM Uniform", 4, 1.0)),
]


@pytest.mark.parametrize("name,metadata,expected", NAMED)
def test_few_step_files_are_recognised_with_their_recommended_settings(name, metadata, expected):
    settings = recommended_settings(name, metadata)
    assert settings is not None, name
    assert (settings["sampler"], settings["schedule_type"], settings["steps"], settings["cfg_scale"]) == expected
    assert settings["why"]
    # one click: the settings are a valid request as they are
    fields = {k: v for k, v in settings.items() if k != "why"}
    assert GenerationRequest(**fields).sampler == settings["sampler"]


@pytest.mark.parametrize("name,metadata", [
    ("v1-5-pruned-emaonly.safetensors", None),
    ("calcmodel_v2.safetensors", None),  # "lcm" inside a word is not LCM
    ("Lora/lcm/add_detail.safetensors", None),  # a folder's name says nothing about the file
    ("detail_tweaker.safetensors", {"ss_sd_model_name": "sdxl_lightning_4step.safetensors"}),  # trained on one
    ("taesd_decoder.pth", {}),
])
def test_other_files_get_no_recommendation(name, metadata):
    assert recommended_settings(name, metadata) is None


def test_a_kohya_lora_is_called_a_lora():
    settings = recommended_settings("hyper_sd15_8steps.safetensors", {"ss_network_module": "networks.lora"})
    assert settings["steps"] == 8 and "LoRA" in settings["why"]


def test_trailing_schedules_start_at_the_last_training_timestep():
    """Lightning, Hyper-SD and Turbo were distilled on trailing timesteps (999, 749, ... for 4)."""
    for sampler in ("Euler", "DDIM", "Euler a"):
        scheduler = schedulers.make_scheduler(sampler, "SGM Uniform", SD_SCHEDULE)
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.round().tolist() == [999, 749, 499, 249], sampler
