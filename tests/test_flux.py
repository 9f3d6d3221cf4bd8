"""Flux.1 (dev, schnell): files recognised, loaded offline in their real layouts, and images equal to
diffusers' FluxPipeline on the same modules, seed, steps and scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest
from pipelines.generate import flow_runner
from pipelines.generate.noise import noise_for_seed
from pipelines.models.checkpoint_file import CheckpointError, TensorSource, read_header
from pipelines.models.families import FLUX, FLUX_DEV_SCHEDULE, FLUX_SCHNELL_SCHEDULE
from pipelines.models.flux_build import load_checkpoint_components, load_flux_components, load_flux_vae
from pipelines.models.inspection import describe_checkpoint, inspect_checkpoint

try:
    from tiny_flux import make_tiny_flux, write_tiny_flux
except ImportError:
    from tests.tiny_flux import make_tiny_flux, write_tiny_flux

SIZE, STEPS, SEED = 64, 3, 1234
PROMPT, NEGATIVE = "a photo of a red cat", "blue sky"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    models = make_tiny_flux(seed=3)
    return models, write_tiny_flux(tmp_path_factory.mktemp("flux"), models)


@pytest.fixture(scope="module")
def components(tiny):
    return load_flux_components(tiny[1].all_in_one)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    files = write_tiny_flux(tmp_path_factory.mktemp("schnell"), make_tiny_flux(seed=5, guidance=False))
    return load_flux_components(files.all_in_one)


def request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, subseed=0, steps=STEPS, cfg_scale=1.0,
                sampler="Euler", width=SIZE, height=SIZE)
    return GenerationRequest(**{**base, **fields})


def ours(components, shift=None, guidance=None, **fields) -> tuple[list, list[str]]:
    control = JobControl()
    outputs = list(flow_runner.run(components, torch.device("cpu"), request(**fields), control=control,
                                   shift=shift, guidance=guidance))
    return [np.asarray(image, dtype=np.float64) for out in outputs for image in out.images], control.notes


def reference(components, schedule=FLUX_DEV_SCHEDULE, size=SIZE, **call) -> np.ndarray:
    """diffusers' FluxPipeline on the same modules, fed our initial noise for the seed (packed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
    pipe = FluxPipeline(transformer=components.unet, vae=components.vae,
                        scheduler=FlowMatchEulerDiscreteScheduler(**schedule), text_encoder=clip,
                        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    latents = flow_runner.pack(noise_for_seed(SEED, 0, 0.0, (1, 16, size // 8, size // 8))[0])
    call = {"num_inference_steps": STEPS, "guidance_scale": 3.5, **call}
    image = pipe(PROMPT, height=size, width=size, latents=latents, output_type="pil", **call).images[0]
    return np.asarray(image, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_files_are_recognised_as_flux_dev_or_schnell_by_the_checkpoint_listing(tiny, tmp_path):
    files = tiny[1]
    for path in (files.all_in_one, files.transformer_vae, files.bare):
        assert inspect_checkpoint(read_header(path)).family is FLUX
        details = describe_checkpoint(path)
        assert details["family_id"] == "flux" and details["variant"] == "Flux.1 dev"
        assert details["recommended"] == {"sampler": "Euler", "cfg_scale": 1.0, "steps": 20, "distilled_cfg_scale": 3.5}
    schnell = write_tiny_flux(tmp_path, make_tiny_flux(seed=1, guidance=False))
    details = describe_checkpoint(schnell.bare)
    assert details["variant"] == "Flux.1 schnell" and details["recommended"]["steps"] == 4
    assert "distilled_cfg_scale" not in details["recommended"]


def test_loaded_modules_hold_exactly_the_weights_written(tiny, components):
    models = tiny[0]
    pairs = [(components.unet, models.transformer), (components.vae, models.vae),
             (components.text_encoders[0], models.clip_l), (components.text_encoders[1], models.t5)]
    for loaded, original in pairs:
        theirs = original.state_dict()
        assert set(loaded.state_dict()) == set(theirs)
        assert all(torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items()), type(loaded).__name__


def test_dev_txt2img_matches_diffusers_flux_pipeline_and_distilled_cfg_changes_it(components):
    (image,), notes = ours(components)
    assert psnr(image, reference(components)) >= 40
    assert image.std() > 1 and notes == []  # a real image; nothing to warn about
    (stronger,), _ = ours(components, guidance=6.0)
    assert psnr(stronger, reference(components, guidance_scale=6.0)) >= 40
    assert psnr(stronger, image) < 45  # the guidance input acts (weakly in a random tiny model)


def test_schnell_matches_diffusers_with_its_own_schedule_and_says_distilled_cfg_does_not_apply(schnell):
    (image,), notes = ours(schnell, guidance=5.0)
    assert psnr(image, reference(schnell, FLUX_SCHNELL_SCHEDULE, guidance_scale=5.0)) >= 40
    assert any("Distilled CFG Scale does not apply to Flux.1 schnell" in n for n in notes)
    assert flow_runner.infotext_params(schnell) == {}


def test_real_cfg_runs_only_above_1_as_diffusers_true_cfg_and_is_explained(components):
    (plain,), _ = ours(components)
    (real,), notes = ours(components, cfg_scale=2.5)
    assert psnr(real, reference(components, negative_prompt=NEGATIVE, true_cfg_scale=2.5)) >= 40
    assert psnr(real, plain) < 35
    assert any("real CFG" in n and "2.5" in n for n in notes)


def test_shift_replaces_the_resolution_dependent_shift(components):
    (shifted,), _ = ours(components, shift=12.0)
    fixed = {**FLUX_DEV_SCHEDULE, "shift": 12.0, "use_dynamic_shifting": False}
    assert psnr(shifted, reference(components, fixed)) >= 40
    assert psnr(shifted, ours(components)[0][0]) < 38
    assert flow_runner.infotext_params(components, shift=6.0, guidance=4.0) == {"Distilled CFG Scale": 4.0,
                                                                                "Shift": 6.0}
    assert flow_runner.infotext_params(components) == {"Distilled CFG Scale": 3.5}


def test_split_files_give_the_all_in_one_image(tiny, components):
    files = tiny[1]
    (expected,), _ = ours(components)
    split = load_checkpoint_components(files.transformer_vae, text_encoder_dir=files.text_encoder_dir)
    assert psnr(ours(split)[0][0], expected) >= 40
    with TensorSource(read_header(files.vae)) as source:  # BFL's ae.safetensors, chosen in models/VAE
        vae = load_flux_vae(source, "", torch.float32)
    bare = load_flux_components(files.bare, text_encoder_dir=files.text_encoder_dir, vae=vae)
    assert psnr(ours(bare)[0][0], expected) >= 40


def test_missing_parts_are_named_with_the_file_and_where_they_go(tiny, tmp_path):
    files = tiny[1]
    with pytest.raises(CheckpointError) as error:
        load_flux_components(files.transformer_vae, text_encoder_dir=tmp_path)
    message = str(error.value)
    assert files.transformer_vae.name in message and "clip_l" in message and "t5xxl" in message
    assert str(tmp_path) in message
    with pytest.raises(CheckpointError, match="tiny_flux_bare.safetensors.*VAE.*ae.safetensors.*models/VAE"):
        load_flux_components(files.bare, text_encoder_dir=files.text_encoder_dir)
    no_tokenizer = tmp_path / "encoders"
    no_tokenizer.mkdir()
    for name in ("clip_l.safetensors", "t5xxl_fp16.safetensors"):
        (no_tokenizer / name).write_bytes((files.text_encoder_dir / name).read_bytes())
    with pytest.raises(CheckpointError, match="t5xxl_fp16.safetensors: T5's tokenizer is missing.*tokenizer.json"):
        load_flux_components(files.transformer_vae, text_encoder_dir=no_tokenizer)


def test_diffusers_folder_loads_offline_and_gives_the_same_image(components, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
    folder = tmp_path / "flux-diffusers"
    FluxPipeline(transformer=components.unet, vae=components.vae,
                 scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULE), text_encoder=clip,
                 tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer).save_pretrained(folder)
    assert describe_checkpoint(folder)["variant"] == "Flux.1 dev"
    loaded = load_checkpoint_components(folder)
    assert psnr(ours(loaded)[0][0], ours(components)[0][0]) >= 40


def test_img2img_hires_and_odd_latent_sizes(components):
    from PIL import Image

    source = Image.fromarray(np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))).convert("RGB")
    (full,), _ = ours(components, mode="img2img", init_image=source, denoising_strength=1.0)
    (low,), _ = ours(components, mode="img2img", init_image=source, denoising_strength=0.3)
    (plain,), _ = ours(components)
    assert psnr(full, plain) >= 40 and psnr(low, plain) < 30  # strength 1 is txt2img from the same noise
    control = JobControl()
    hires = request(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_denoising_strength=1.0,
                    hr_second_pass_steps=STEPS)
    (out,) = list(flow_runner.run_hires(components, torch.device("cpu"), hires, lambda image, size: image,
                                        control=control))
    second = np.asarray(out.images[0], dtype=np.float64)
    assert second.shape == (96, 96, 3)
    assert psnr(second, ours(components, width=96, height=96)[0][0]) >= 40
    (odd,), _ = ours(components, width=72, height=88)  # 9 x 11 latents: padded to 2x2 patches, cropped back
    assert odd.shape == (88, 72, 3) and odd.std() > 1


def test_prompt_weights_change_the_image_and_break_is_dropped_with_a_warning(components):
    plain = ours(components)[0][0]
    (weighted,), notes = ours(components, prompt="a photo of a (red:1.4) cat")
    assert not notes and psnr(weighted, plain) < math.inf  # T5 reads "red" louder (tiny model: a small change)
    (spelled_out,), _ = ours(components, prompt="a photo of a (red:1.0) cat")
    assert psnr(spelled_out, plain) == math.inf  # weight 1 is the plain prompt, tokenized as diffusers does
    (broken,), notes = ours(components, prompt="a photo of a red BREAK cat")
    assert any("Flux: BREAK" in n for n in notes)


# diffusers' configs of the released models (transformer/config.json of BFL's Hub folders)
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}


@pytest.mark.parametrize("guidance", [True, False])
def test_full_size_shapes_give_the_released_configs_and_the_memory_advice(guidance):
    """Real-size transformers built on the meta device (no memory), written in BFL's names: the
    config read back from the shapes is the one diffusers ships, 12 billion weights that do not
    fit 24 GB in bf16 with T5, where a GGUF Q4_0 file does."""
    from diffusers import FluxTransformer2DModel

    from pipelines.models.flux_files import transformer_config, transformer_weights, what_would_fit

    try:
        from tiny_flux import transformer_to_bfl
    except ImportError:
        from tests.tiny_flux import transformer_to_bfl

    released = {**FLUX_DEV, "guidance_embeds": guidance}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**released)
    state = transformer_to_bfl(model.state_dict(), model.config)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert transformer_config(shapes, "") == released

    header = type("Header", (), {"shapes": shapes})()
    weights = transformer_weights(header)
    assert 11.8e9 < weights < 12.0e9
    assert what_would_fit(weights, 8 << 30).startswith("a GGUF Q4_0 file of it (about 6.2 GB)")
    assert what_would_fit(weights, 14 << 30).startswith("a GGUF Q8_0 file")
    assert what_would_fit(weights, 4 << 30).startswith("not even")
