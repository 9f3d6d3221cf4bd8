"""Flux.1 Fill (the inpainting Flux): recognised and listed as such, loaded from its real layouts,
and inpainting / outpainting / txt2img images equal to diffusers' FluxFillPipeline on the same
modules, seed, image, mask and steps. Flux.1 Depth stays refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest
from pipelines.generate import flow_runner
from pipelines.generate.outpaint import as_inpaint
from pipelines.models.checkpoint_file import CheckpointError
from pipelines.models.families import FLUX_DEV_SCHEDULE
from pipelines.models.few_step import distilled_settings
from pipelines.models.flux_build import load_checkpoint_components
from pipelines.models.inspection import describe_checkpoint

try:
    from tiny_flux import TINY_FLUX_FILL_INPUT, make_tiny_flux, picture_and_mask, write_tiny_flux
except ImportError:
    from tests.tiny_flux import TINY_FLUX_FILL_INPUT, make_tiny_flux, picture_and_mask, write_tiny_flux

SIZE, STEPS, SEED = 64, 3, 77
PROMPT = "a red apple on a table"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("fill"), make_tiny_flux(seed=4, in_channels=TINY_FLUX_FILL_INPUT))


@pytest.fixture(scope="module")
def fill(files):
    return load_checkpoint_components(files.all_in_one)


@pytest.fixture(scope="module")
def picture():
    """A smooth picture with structure (a gradient and a disc), and a mask over its left part."""
    return picture_and_mask(SIZE, (250, 240, 20), (slice(8, 56), slice(4, 36)))


@pytest.fixture
def exact_encodes(monkeypatch):
    """FluxFillPipeline samples the VAE's latent distribution; this app takes its mean (as A1111
    does). The reference is told to take the mean too, so the two see the same latents."""
    from diffusers.pipelines.flux import pipeline_flux_fill

    original = pipeline_flux_fill.retrieve_latents
    monkeypatch.setattr(pipeline_flux_fill, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": original(output, generator, "argmax"))


def request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, negative_prompt="", seed=SEED, subseed=0, steps=STEPS, cfg_scale=1.0,
                sampler="Euler", width=SIZE, height=SIZE)
    return GenerationRequest(**{**base, **fields})


def ours(components, guidance=None, **fields) -> tuple[np.ndarray, list[str]]:
    control = JobControl()
    (out,) = list(flow_runner.run(components, torch.device("cpu"), request(**fields), control=control,
                                  guidance=guidance))
    return np.asarray(out.images[0], dtype=np.float64), control.notes


def reference(components, image: Image.Image, mask: Image.Image, strength: float = 1.0, steps: int = STEPS,
              **call) -> np.ndarray:
    """diffusers' FluxFillPipeline on the same modules; its generator draws the same noise as
    this app's seed (one CPU generator, the unpacked latent shape)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
    pipe = FluxFillPipeline(transformer=components.unet, vae=components.vae,
                            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULE), text_encoder=clip,
                            tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, image=image, mask_image=mask, height=image.height, width=image.width, strength=strength,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED), **call)
    return np.asarray(out.images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_fill_is_listed_as_flux_fill_an_inpainting_model_with_its_own_settings(files):
    details = describe_checkpoint(files.all_in_one)
    assert details["variant"] == "Flux.1 Fill" and details["inpainting"] is True
    assert details["recommended"] == {"sampler": "Euler", "cfg_scale": 1.0, "steps": 20, "distilled_cfg_scale": 30.0,
                                      "denoising_strength": 1.0}
    why = distilled_settings(details)["why"]
    assert "Flux.1 Fill" in why and "Distilled CFG Scale 30" in why and "Inpaint tab" in why
    assert describe_checkpoint(files.bare)["variant"] == "Flux.1 Fill"  # BFL's flux1-fill-dev.safetensors


def test_inpainting_matches_flux_fill_pipeline_in_the_mask_and_keeps_the_rest(fill, picture, exact_encodes):
    image, mask = picture
    painted, notes = ours(fill, mode="inpaint", init_image=image, mask=mask, mask_blur=0, denoising_strength=1.0)
    expected = reference(fill, image, mask)
    inside = np.asarray(mask) > 127
    assert psnr(painted[inside], expected[inside]) >= 40
    assert np.array_equal(painted[~inside], np.asarray(image, dtype=np.float64)[~inside])  # composited back
    assert psnr(painted[inside], np.asarray(image, dtype=np.float64)[inside]) < 25  # really repainted
    assert notes == []
    assert flow_runner.infotext_params(fill) == {"Distilled CFG Scale": 30.0}  # Fill's own default


def test_the_masked_image_and_distilled_guidance_reach_the_model(fill, picture, exact_encodes):
    image, mask = picture
    inside = np.asarray(mask) > 127
    painted, _ = ours(fill, mode="inpaint", init_image=image, mask=mask, mask_blur=0, denoising_strength=1.0)
    other = Image.fromarray(255 - np.asarray(image))  # the same mask over another picture
    elsewhere, _ = ours(fill, mode="inpaint", init_image=other, mask=mask, mask_blur=0, denoising_strength=1.0)
    assert psnr(painted[inside], elsewhere[inside]) < 40  # the model saw what is around the hole
    weaker, _ = ours(fill, guidance=3.5, mode="inpaint", init_image=image, mask=mask, mask_blur=0,
                     denoising_strength=1.0)
    assert psnr(weaker[inside], reference(fill, image, mask, guidance_scale=3.5)[inside]) >= 40
    assert psnr(weaker[inside], painted[inside]) < 45


def test_partial_denoising_strength_starts_from_the_image_as_flux_fill_does(fill, picture, exact_encodes):
    image, mask = picture
    inside = np.asarray(mask) > 127
    # 4 steps at 0.5: 2 steps by diffusers' rounding and by A1111's (they differ at fractional counts)
    painted, _ = ours(fill, mode="inpaint", init_image=image, mask=mask, mask_blur=0, denoising_strength=0.5, steps=4)
    assert psnr(painted[inside], reference(fill, image, mask, strength=0.5, steps=4)[inside]) >= 40
    full, _ = ours(fill, mode="inpaint", init_image=image, mask=mask, mask_blur=0, denoising_strength=1.0, steps=4)
    assert psnr(painted[inside], full[inside]) < 35


def test_txt2img_runs_fill_with_everything_masked_and_says_so(fill, exact_encodes):
    made, notes = ours(fill)
    white = Image.new("L", (SIZE, SIZE), 255)
    anything = Image.new("RGB", (SIZE, SIZE), (10, 200, 30))  # erased by the all-white mask
    assert psnr(made, reference(fill, anything, white)) >= 40
    assert made.std() > 1
    assert any("Flux.1 Fill is an inpainting model: txt2img" in note and "Inpaint tab" in note for note in notes)


def test_outpainting_grows_the_canvas_and_paints_the_new_area_as_flux_fill(fill, picture, exact_encodes):
    image, _ = picture
    grown, outpainted = as_inpaint(request(mode="img2img", init_image=image, outpaint_right=32, mask_blur=0,
                                           denoising_strength=1.0))
    assert outpainted == {"Outpaint": "right 32"}
    control = JobControl()
    (out,) = list(flow_runner.run(fill, torch.device("cpu"), grown, control=control))
    made = np.asarray(out.images[0], dtype=np.float64)
    assert made.shape == (SIZE, SIZE + 32, 3) and control.notes == []
    assert np.array_equal(made[:, :SIZE], np.asarray(image, dtype=np.float64))  # the old picture kept
    expected = reference(fill, grown.init_image, grown.mask)
    assert psnr(made[:, SIZE:], expected[:, SIZE:]) >= 40


def test_depth_models_are_still_refused_by_name(files, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(files.all_in_one)
    key = "model.diffusion_model.img_in.weight"
    state[key] = torch.zeros(state[key].shape[0], 128)
    depth = tmp_path / "flux_depth.safetensors"
    save_file(state, str(depth))
    assert describe_checkpoint(depth)["variant"] == "Flux.1 Depth"
    with pytest.raises(CheckpointError, match="flux_depth.safetensors: Flux.1 Depth models are not supported"):
        load_checkpoint_components(depth)


def test_the_engine_outpaints_with_a_fill_file_and_writes_its_guidance(files, picture, tmp_path):
    """The page's and the API's path: the listing, the model cache, outpainting turned into inpainting."""
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    engine = Engine(Paths(models_dir=files.all_in_one.parent.parent, data_dir=tmp_path / "data",
                          outdir=tmp_path / "out"), EngineSettings(device="cpu", precision="full"))
    image, _ = picture
    result = engine.generate(request(mode="img2img", init_image=image, outpaint_down=16, mask_blur=4,
                                     denoising_strength=1.0, checkpoint=files.all_in_one.name, save_images=False))
    made = np.asarray(result.images[0], dtype=np.float64)
    assert made.shape == (SIZE + 16, SIZE, 3) and made[SIZE:].std() > 1
    kept = SIZE - 4 * 4  # above the seam band and its blur
    assert np.array_equal(made[:kept], np.asarray(image, dtype=np.float64)[:kept])
    assert "Distilled CFG Scale: 30" in result.infotexts[0] and "Outpaint: down 16" in result.infotexts[0]
