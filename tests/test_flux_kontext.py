"""Flux.1 Kontext (the edit model): recognised by its name and listed as such, and img2img /
Inpaint with the input image as its reference equal to diffusers' FluxKontextPipeline and
FluxKontextInpaintPipeline on the same modules, seed, image, size and steps; txt2img runs as dev
and says where Kontext acts."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.infotext import build_infotext, parse_infotext, request_fields_from_infotext
from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest
from pipelines.generate import flow_runner, flux_kontext
from pipelines.generate.images import resize_image
from pipelines.generate.inpaint import plan_pixels
from pipelines.models.checkpoint_file import read_header
from pipelines.models.families import FLUX_DEV_SCHEDULE
from pipelines.models.few_step import distilled_settings
from pipelines.models.flux_build import load_checkpoint_components
from pipelines.models.inspection import describe_checkpoint, inspect_checkpoint

try:
    from tiny_flux import make_tiny_flux, picture_and_mask, write_tiny_flux
except ImportError:
    from tests.tiny_flux import make_tiny_flux, picture_and_mask, write_tiny_flux

SIZE, STEPS, SEED, GUIDANCE = 64, 3, 91, 2.5
PROMPT = "make the apple green"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("kontext"), make_tiny_flux(seed=6), stem="flux1_kontext_tiny")


@pytest.fixture(scope="module")
def kontext(files):
    return load_checkpoint_components(files.all_in_one)


@pytest.fixture(scope="module")
def picture():
    """A smooth picture with structure (a gradient and a disc), and a mask over its left part."""
    # the mask on the 16-pixel token grid: a hard mask both sides cut alike
    return picture_and_mask(SIZE, (250, 40, 20), (slice(16, 48), slice(0, 32)))


def request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, negative_prompt="", seed=SEED, subseed=0, steps=STEPS, cfg_scale=1.0,
                sampler="Euler", width=SIZE, height=SIZE)
    return GenerationRequest(**{**base, **fields})


def ours(components, **fields) -> tuple[np.ndarray, list[str]]:
    control = JobControl()
    (out,) = list(flow_runner.run(components, torch.device("cpu"), request(**fields), control=control))
    return np.asarray(out.images[0], dtype=np.float64), control.notes


def pipe_parts(components) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
    return dict(transformer=components.unet, vae=components.vae, text_encoder=clip, tokenizer=clip_tokenizer,
                text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULE))


def reference(components, image: Image.Image, width: int = SIZE, height: int = SIZE, steps: int = STEPS) -> np.ndarray:
    """diffusers' FluxKontextPipeline on the same modules: the reference given at the size this app
    chose (its own auto-resize off), the output at our size (max_area: its rescaling to 1 MP off);
    its generator draws the same noise as this app's seed."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**pipe_parts(components))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=image, prompt=PROMPT, height=height, width=width, max_area=width * height,
               _auto_resize=False, num_inference_steps=steps, guidance_scale=GUIDANCE,
               generator=torch.Generator().manual_seed(SEED))
    return np.asarray(out.images[0], dtype=np.float64)


def inpaint_reference(components, image: Image.Image, mask: Image.Image, strength: float, steps: int) -> np.ndarray:
    """diffusers' FluxKontextInpaintPipeline: the image is the start, the reference and the canvas."""
    from diffusers import FluxKontextInpaintPipeline

    pipe = FluxKontextInpaintPipeline(**pipe_parts(components))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=image, mask_image=mask, prompt=PROMPT, height=SIZE, width=SIZE, max_area=SIZE * SIZE,
               _auto_resize=False, strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
               generator=torch.Generator().manual_seed(SEED))
    return np.asarray(out.images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_kontext_is_known_by_its_name_and_listed_as_an_edit_model_with_its_settings(files, tmp_path):
    for path in (files.all_in_one, files.bare):  # ComfyUI's all-in-one file, BFL's flux1-kontext-dev
        details = describe_checkpoint(path)
        assert details["variant"] == "Flux.1 Kontext" and details["edit_model"] is True
        assert details["recommended"] == {"sampler": "Euler", "cfg_scale": 1.0, "steps": 28,
                                          "distilled_cfg_scale": 2.5, "denoising_strength": 1.0}
    why = distilled_settings(describe_checkpoint(files.all_in_one))["why"]
    assert "Flux.1 Kontext" in why and "Distilled CFG Scale 2.5" in why and "img2img" in why
    # the same tensors under a plain name are dev's: the shapes do not tell Kontext apart
    plain = shutil.copy(files.bare, tmp_path / "flux1-dev.safetensors")
    details = describe_checkpoint(plain)
    assert details["variant"] == "Flux.1 dev" and "edit_model" not in details
    # a renamed file whose metadata title says Kontext is still Kontext
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "my_edit_model.safetensors"
    save_file(load_file(files.bare), str(renamed), metadata={"modelspec.title": "FLUX.1 Kontext [dev]"})
    assert describe_checkpoint(renamed)["variant"] == "Flux.1 Kontext"


def final_latents(components, **fields) -> torch.Tensor:
    """Our last latents before decoding (one batch of `request(**fields)`): a random tiny model's
    velocity is small next to the noise, so the reference's effect is measured here, where the
    VAE's rounding to 8-bit pixels does not hide it."""
    job = request(**fields)
    device = torch.device("cpu")
    conditioning = flow_runner.encode_prompts(components, job.prompt, job.negative_prompt, device, job)
    plan = plan_pixels(job, SIZE, SIZE)
    batch = flow_runner.FlowBatch(conditioning, [SEED], [0], SIZE, SIZE, None, plan, decode=False,
                                  reference=flux_kontext.reference_picture(components, job, plan))
    return flow_runner.run_batch(components, device, job, batch, JobControl(), lambda *args, **kwargs: None)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_img2img_edits_from_noise_with_the_input_as_reference_as_flux_kontext_pipeline(kontext, picture):
    image, _ = picture
    edited, notes = ours(kontext, mode="img2img", init_image=image, denoising_strength=1.0)
    assert psnr(edited, reference(kontext, image)) >= 40
    assert edited.std() > 1 and notes == []
    assert flow_runner.infotext_params(kontext) == {"Distilled CFG Scale": 2.5}  # Kontext's own default
    assert flux_kontext.infotext_params(kontext, request(mode="img2img", init_image=image)) == {
        "Kontext reference": "64x64"}


def test_the_reference_reaches_the_model_as_flux_kontext_pipeline_gives_it(kontext, picture):
    """At strength 1 the start is noise: only the reference carries the input picture."""
    from diffusers import FluxKontextPipeline

    image, _ = picture
    latents = final_latents(kontext, mode="img2img", init_image=image, denoising_strength=1.0)
    pipe = FluxKontextPipeline(**pipe_parts(kontext))
    pipe.set_progress_bar_config(disable=True)
    packed = pipe(image=image, prompt=PROMPT, height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
                  output_type="latent").images
    theirs = flow_runner.unpack(packed, SIZE // 8, SIZE // 8)
    other = final_latents(kontext, mode="img2img", init_image=Image.fromarray(255 - np.asarray(image)),
                          denoising_strength=1.0)
    none = final_latents(kontext)  # txt2img: no reference
    error = relative_error(latents, theirs)
    assert error < 1e-5
    assert relative_error(other, theirs) > 100 * error and relative_error(none, theirs) > 100 * error


def test_the_reference_goes_in_at_kontexts_resolution_for_the_aspect_not_the_outputs_size(kontext, picture):
    image, _ = picture
    wide = image.resize((96, 64))
    job = dict(mode="img2img", init_image=wide, denoising_strength=1.0, width=96, height=64)
    # aspect 3:2 -> the trained 1248x832, scaled to the tiny file's native 64 px: 80x48 (multiples of 16)
    assert flux_kontext.infotext_params(kontext, request(**job)) == {"Kontext reference": "80x48"}
    edited, _ = ours(kontext, **job)
    assert edited.shape == (64, 96, 3)
    expected = reference(kontext, resize_image(wide, 80, 48, "just resize"), width=96, height=64)
    assert psnr(edited, expected) >= 40


def test_reference_sizes_are_diffusers_auto_resize_choices_on_a_1024_model():
    assert flux_kontext.reference_size(1024, 1024) == (1024, 1024)
    assert flux_kontext.reference_size(1920, 1080) == (1392, 752)
    assert flux_kontext.reference_size(768, 1024) == (880, 1184)
    assert flux_kontext.reference_size(512, 512, native_resolution=64) == (64, 64)


def test_denoising_strength_below_1_starts_from_the_input_as_flux_kontext_inpaint_does(kontext, picture):
    image, _ = picture
    white = Image.new("L", (SIZE, SIZE), 255)
    # 4 steps at 0.5: 2 steps by diffusers' rounding and by A1111's
    edited, _ = ours(kontext, mode="img2img", init_image=image, denoising_strength=0.5, steps=4)
    assert psnr(edited, inpaint_reference(kontext, image, white, strength=0.5, steps=4)) >= 40
    full, _ = ours(kontext, mode="img2img", init_image=image, denoising_strength=1.0, steps=4)
    assert psnr(edited, full) < 35
    assert psnr(edited, np.asarray(image, dtype=np.float64)) > psnr(full, np.asarray(image, dtype=np.float64))


def test_inpaint_repaints_the_mask_as_flux_kontext_inpaint_pipeline_and_keeps_the_rest(kontext, picture):
    image, mask = picture
    painted, notes = ours(kontext, mode="inpaint", init_image=image, mask=mask, mask_blur=0, denoising_strength=1.0)
    expected = inpaint_reference(kontext, image, mask, strength=1.0, steps=STEPS)
    inside = np.asarray(mask) > 127
    assert psnr(painted[inside], expected[inside]) >= 40
    assert np.array_equal(painted[~inside], np.asarray(image, dtype=np.float64)[~inside])  # composited back
    assert psnr(painted[inside], np.asarray(image, dtype=np.float64)[inside]) < 25  # really repainted
    assert notes == []


def test_txt2img_runs_kontext_as_dev_and_says_it_wants_a_picture_in_img2img(kontext):
    from diffusers import FluxPipeline

    made, notes = ours(kontext)
    pipe = FluxPipeline(**pipe_parts(kontext))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED)).images[0]
    assert psnr(made, np.asarray(expected, dtype=np.float64)) >= 40
    assert any("Flux.1 Kontext is an edit model" in note and "img2img" in note for note in notes)
    assert flux_kontext.infotext_params(kontext, request()) == {}


def test_a_diffusers_kontext_folder_and_a_kontext_gguf_are_recognised(kontext, files, tmp_path):
    from diffusers import FluxKontextPipeline

    folder = tmp_path / "FLUX.1-edit-diffusers"  # no "kontext" in the name: model_index.json says it
    FluxKontextPipeline(**pipe_parts(kontext)).save_pretrained(folder)
    assert describe_checkpoint(folder)["variant"] == "Flux.1 Kontext"
    assert flux_kontext.is_kontext_model(load_checkpoint_components(folder))

    from diffusers import FluxTransformer2DModel

    from pipelines.models.flux_build import to_diffusers
    from pipelines.models.quantized import load_gguf_transformer

    try:
        from tiny_flux import flux_state_dicts
        from tiny_quant import write_gguf
    except ImportError:
        from tests.tiny_flux import flux_state_dicts
        from tests.tiny_quant import write_gguf

    models = make_tiny_flux(seed=6)
    path = write_gguf(tmp_path / "flux1-kontext-dev-Q8_0.gguf", flux_state_dicts(models)["transformer"], "Q8_0",
                      arch="flux")
    config = inspect_checkpoint(read_header(path)).unet_config
    assert describe_checkpoint(path)["variant"] == "Flux.1 Kontext"
    transformer = load_gguf_transformer(read_header(path), FluxTransformer2DModel, config, torch.float32,
                                        convert=lambda raw: to_diffusers(raw, config))  # the marked config builds
    assert transformer.config.in_channels == 64


def test_the_reference_key_reads_back_in_png_info_without_changing_the_pasted_fields():
    params = {"Steps": 3, "Sampler": "Euler", "CFG scale": 1, "Seed": 5, "Size": "96x64",
              "Distilled CFG Scale": 2.5, "Denoising strength": 1, "Kontext reference": "80x48"}
    text = build_infotext(PROMPT, "", params)
    assert parse_infotext(text)["Kontext reference"] == "80x48"
    fields = request_fields_from_infotext(text)
    assert (fields["width"], fields["height"], fields["steps"]) == (96, 64, 3)
    assert fields == request_fields_from_infotext(build_infotext(PROMPT, "", {k: v for k, v in params.items()
                                                                               if k != "Kontext reference"}))


def test_the_engine_edits_with_a_kontext_file_and_writes_the_reference_in_the_infotext(files, picture, tmp_path):
    """The page's and the API's path: the listing, the model cache, the infotext."""
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    engine = Engine(Paths(models_dir=files.all_in_one.parent.parent, data_dir=tmp_path / "data",
                          outdir=tmp_path / "out"), EngineSettings(device="cpu", precision="full"))
    image, _ = picture
    result = engine.generate(request(mode="img2img", init_image=image, denoising_strength=1.0,
                                     checkpoint=files.all_in_one.name, save_images=False))
    assert np.asarray(result.images[0]).std() > 1
    assert "Kontext reference: 64x64" in result.infotexts[0] and "Distilled CFG Scale: 2.5" in result.infotexts[0]
    plain = engine.generate(request(checkpoint=files.all_in_one.name, save_images=False))
    assert "Kontext reference" not in plain.infotexts[0]
    assert any("Flux.1 Kontext is an edit model" in warning for warning in plain.warnings)


def test_the_memory_plan_counts_the_reference_images_tokens(kontext):
    import dataclasses

    from pipelines.models import memory
    from pipelines.models.flux_files import KONTEXT_KEY

    as_dev = dataclasses.replace(kontext, spec=dataclasses.replace(
        kontext.spec, unet_config={k: v for k, v in kontext.spec.unet_config.items() if k != KONTEXT_KEY}))
    args = (512, 512, 1, False, torch.float32, torch.float32)
    assert memory.estimate_working_bytes(kontext, *args) > memory.estimate_working_bytes(as_dev, *args)
