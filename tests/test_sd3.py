"""SD 3 / 3.5: files recognised, loaded offline in their real layouts, and images equal to
diffusers' StableDiffusion3Pipeline on the same modules, seed, steps and scheduler."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest
from pipelines.generate import flow_runner
from pipelines.generate.noise import noise_for_seed
from pipelines.models.checkpoint_file import CheckpointError, read_header
from pipelines.models.families import SD3
from pipelines.models.inspection import describe_checkpoint, inspect_checkpoint
from pipelines.models.sd3_build import load_sd3_components
from pipelines.models.sd3_files import sd3_variant

try:
    from tiny_sd3 import make_tiny_sd3, write_tiny_sd3
except ImportError:
    from tests.tiny_sd3 import make_tiny_sd3, write_tiny_sd3

SIZE, STEPS, SEED = 64, 3, 1234
PROMPT, NEGATIVE = "a photo of a red cat", "blue sky"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    models = make_tiny_sd3(seed=3, qk_norm="rms_norm", dual_attention_layers=(0,))  # SD 3.5 medium's shape
    return models, write_tiny_sd3(tmp_path_factory.mktemp("sd3"), models)


@pytest.fixture(scope="module")
def components(tiny):
    return load_sd3_components(tiny[1].all_in_one)


def request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, subseed=0, steps=STEPS, cfg_scale=4.5,
                sampler="Euler", width=SIZE, height=SIZE)
    return GenerationRequest(**{**base, **fields})


def ours(components, **fields) -> tuple[list, list[str]]:
    control = JobControl()
    outputs = list(flow_runner.run(components, torch.device("cpu"), request(**fields), control=control))
    return [np.asarray(image, dtype=np.float64) for out in outputs for image in out.images], control.notes


def reference(components, t5: bool, seed: int = SEED, cfg: float = 4.5, shift: float = 3.0) -> np.ndarray:
    """diffusers' SD3Pipeline on the same modules, fed our initial noise for the seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    encoders, tokenizers = components.text_encoders, components.tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=components.unet, vae=components.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=encoders[2] if t5 else None, tokenizer_3=tokenizers[2] if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    latents = noise_for_seed(seed, 0, 0.0, (1, 16, SIZE // 8, SIZE // 8))[0]
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=cfg,
                 height=SIZE, width=SIZE, latents=latents, output_type="pil").images[0]
    return np.asarray(image, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_all_in_one_file_is_recognised_as_sd3_by_the_checkpoint_listing(tiny):
    path = tiny[1].all_in_one
    spec = inspect_checkpoint(read_header(path))
    assert spec.family is SD3
    details = describe_checkpoint(path)
    assert details["family_id"] == "sd3" and details["variant"] == "SD 3.5 medium"
    assert details["resolution"] == SIZE  # the file's declared size; real files: 1024


def test_variant_is_read_from_the_transformer_shapes(tmp_path):
    plain = write_tiny_sd3(tmp_path, make_tiny_sd3(seed=0))
    config = inspect_checkpoint(read_header(plain.all_in_one)).unet_config
    assert sd3_variant(config) == "SD 3 medium"
    assert sd3_variant({**config, "num_layers": 38, "qk_norm": "rms_norm"}) == "SD 3.5 large"


def test_loaded_modules_hold_exactly_the_weights_written(tiny, components):
    models = tiny[0]
    pairs = [(components.unet, models.transformer), (components.vae, models.vae),
             (components.text_encoders[0], models.clip_l), (components.text_encoders[1], models.clip_g),
             (components.text_encoders[2], models.t5)]
    for loaded, original in pairs:
        theirs = original.state_dict()
        assert set(loaded.state_dict()) == set(theirs)
        assert all(torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items()), type(loaded).__name__


@pytest.mark.parametrize("t5", [True, False])
def test_txt2img_matches_diffusers_sd3_pipeline(components, t5):
    model = components if t5 else type(components)(components.spec, components.unet, components.vae,
                                                   components.text_encoders[:2], components.tokenizers[:2])
    images, notes = ours(model)
    expected = reference(model, t5)
    assert psnr(images[0], expected) >= 40
    assert images[0].std() > 1  # a real image, not a flat field that would match anything flat
    assert any("T5" in n for n in notes) != t5  # running without T5 is said


def test_seed_cfg_and_batch_change_the_image_as_in_a1111(components):
    (first,), _ = ours(components)
    (other_seed,), _ = ours(components, seed=SEED + 1)
    assert psnr(first, other_seed) < 30
    batch, _ = ours(components, batch_size=2)
    assert psnr(batch[0], first) >= 40  # image i of a batch is the single run with seed + i
    assert psnr(batch[1], other_seed) >= 40
    (no_cfg,), _ = ours(components, cfg_scale=1.0)
    assert psnr(no_cfg, reference(components, True, cfg=1.0)) >= 40


def test_transformer_only_file_takes_its_encoders_from_the_text_encoder_folder(tiny, components):
    files = tiny[1]
    split = load_sd3_components(files.transformer_only, text_encoder_dir=files.text_encoder_dir)
    assert len(split.text_encoders) == 3
    assert psnr(ours(split)[0][0], ours(components)[0][0]) >= 40


def test_transformer_only_file_without_encoders_names_the_file_and_what_is_missing(tiny, tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_sd3_components(tiny[1].transformer_only, text_encoder_dir=tmp_path)
    message = str(error.value)
    assert tiny[1].transformer_only.name in message
    assert "clip_l" in message and "clip_g" in message and "t5xxl" in message
    assert str(tmp_path) in message


def test_without_a_t5_tokenizer_sd3_runs_without_t5_and_says_so(tiny, tmp_path):
    alone = tmp_path / "sd3.safetensors"
    shutil.copy(tiny[1].all_in_one, alone)  # no t5_tokenizer/ beside it
    components = load_sd3_components(alone)
    assert len(components.text_encoders) == 2
    images, notes = ours(components)
    assert psnr(images[0], reference(components, False)) >= 40
    assert any("tokenizer.json" in n and "t5_tokenizer" in n for n in notes)


def test_img2img_keeps_the_input_at_low_strength_and_interrupt_stops(components):
    from PIL import Image

    source = Image.fromarray(np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))).convert("RGB")
    (low,), _ = ours(components, mode="img2img", init_image=source, denoising_strength=0.3, steps=4)
    (high,), _ = ours(components, mode="img2img", init_image=source, denoising_strength=1.0, steps=4)
    (plain,), _ = ours(components, steps=4)
    assert psnr(high, plain) >= 40  # strength 1 starts from pure noise: txt2img
    assert psnr(low, plain) < 30
    control = JobControl()
    control.interrupt()
    assert list(flow_runner.run(components, torch.device("cpu"), request(), control=control)) == []


def test_diffusers_folder_and_fp8_file_load_offline_and_generate(components, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from pipelines.models.flux_build import load_checkpoint_components

    encoders, tokenizers = components.text_encoders, components.tokenizers
    folder = tmp_path / "sd3-diffusers"
    StableDiffusion3Pipeline(
        transformer=components.unet, vae=components.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=encoders[2], tokenizer_3=tokenizers[2]).save_pretrained(folder)
    assert describe_checkpoint(folder)["family_id"] == "sd3"
    loaded = load_checkpoint_components(folder)
    assert len(loaded.text_encoders) == 3 and loaded.spec.native_resolution == 1024  # sample_size 128
    assert psnr(ours(loaded)[0][0], ours(components)[0][0]) >= 40

    fp8 = write_tiny_sd3(tmp_path / "fp8", make_tiny_sd3(seed=3, qk_norm="rms_norm", dual_attention_layers=(0,)),
                         dtype=torch.float8_e4m3fn)
    quantised = load_checkpoint_components(fp8.all_in_one, torch.float32)
    assert quantised.unet.dtype == torch.float32  # stored in fp8, computed in the run dtype
    (image,), _ = ours(quantised)
    assert 15 < psnr(image, ours(components)[0][0]) < 60  # close to the full-precision image, not equal


def test_inpainting_redraws_the_masked_area_only(components):
    from PIL import Image

    source = Image.fromarray(np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))).convert("RGB")
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half
    (out,), _ = ours(components, mode="inpaint", init_image=source, mask=mask, mask_blur=0,
                     denoising_strength=1.0, steps=4)
    original = np.asarray(source, dtype=np.float64)
    assert psnr(out[:, SIZE // 2 + 4:], original[:, SIZE // 2 + 4:]) >= 40
    assert psnr(out[:, :SIZE // 2 - 4], original[:, :SIZE // 2 - 4]) < 25


def test_memory_estimate_grows_with_size_and_is_gigabytes_for_sd35_large_at_1024():
    from pipelines.models.sd3_files import transformer_working_bytes

    large = {"patch_size": 2, "num_attention_heads": 38, "attention_head_dim": 64}
    at_1024 = transformer_working_bytes(large, 1024, 1024, rows=2, itemsize=2)
    assert transformer_working_bytes(large, 512, 512, rows=2, itemsize=2) < at_1024 / 3
    assert 1 << 30 < at_1024 < 16 << 30


def test_shift_setting_acts_as_the_schedulers_shift(components):
    control = JobControl()
    (out,) = list(flow_runner.run(components, torch.device("cpu"), request(), control=control, shift=1.0))
    image = np.asarray(out.images[0], dtype=np.float64)
    assert psnr(image, reference(components, True, shift=1.0)) >= 40
    assert psnr(image, ours(components)[0][0]) < 40  # not the model's own 3.0


def test_infotext_says_the_shift_and_when_t5_was_not_used(components):
    without_t5 = type(components)(components.spec, components.unet, components.vae,
                                  components.text_encoders[:2], components.tokenizers[:2])
    assert flow_runner.infotext_params(components) == {"Shift": 3.0}
    assert flow_runner.infotext_params(without_t5, shift=2.5) == {"Shift": 2.5, "T5": "none"}


# diffusers' configs of the released models (transformer/config.json of each Hub folder)
SD3_MEDIUM = {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536, "pos_embed_max_size": 192,
              "dual_attention_layers": (), "qk_norm": None}
SD35_MEDIUM = {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536, "pos_embed_max_size": 384,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE = {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "pos_embed_max_size": 192,
              "dual_attention_layers": (), "qk_norm": "rms_norm"}


@pytest.mark.parametrize("released, variant", [(SD3_MEDIUM, "SD 3 medium"), (SD35_MEDIUM, "SD 3.5 medium"),
                                               (SD35_LARGE, "SD 3.5 large")])
def test_full_size_sd3_shapes_give_the_released_diffusers_configs(released, variant):
    """Real-size MMDiTs built on the meta device (no memory), written in SAI's names: the config
    read back from the shapes alone is the one diffusers ships for that model."""
    from diffusers import SD3Transformer2DModel

    from pipelines.models.sd3_files import transformer_config

    try:
        from tiny_sd3 import transformer_to_sai
    except ImportError:
        from tests.tiny_sd3 import transformer_to_sai

    full = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "attention_head_dim": 64,
            "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "out_channels": 16, **released}
    with torch.device("meta"):
        model = SD3Transformer2DModel(**full)
    state = transformer_to_sai(model.state_dict(), full["num_layers"])
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in state.items()}
    config = transformer_config(shapes, "model.diffusion_model.")
    assert config == full
    assert sd3_variant(config) == variant


def test_full_size_text_encoder_shapes_give_t5_xxl_and_clip_g_configs():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from pipelines.models.sd3_files import clip_config, t5_config

    xxl = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**xxl, feed_forward_proj="gated-gelu"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280, hidden_act="gelu"))
    prefix = "text_encoders.t5xxl.transformer."
    read = t5_config({prefix + k: tuple(v.shape) for k, v in t5.state_dict().items()}, prefix)
    assert {k: read[k] for k in xxl} == xxl and read["feed_forward_proj"] == "gated-gelu"
    prefix = "text_encoders.clip_g.transformer."
    read = clip_config({prefix + k: tuple(v.shape) for k, v in clip_g.state_dict().items()}, "clip_g", prefix)
    assert (read["hidden_size"], read["num_attention_heads"], read["num_hidden_layers"], read["projection_dim"],
            read["hidden_act"]) == (1280, 20, 32, 1280, "gelu")


def test_transformer_without_its_vae_is_refused_before_loading_with_the_folder_to_use(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipelines.models.sd3_build import check_sd3_parts

    bare = tmp_path / "sd3_unet_only.safetensors"  # ComfyUI's models/unet files: no prefix, no VAE
    prefix = "model.diffusion_model."
    save_file({k[len(prefix):]: v for k, v in load_file(tiny[1].transformer_only).items() if k.startswith(prefix)},
              str(bare))
    assert describe_checkpoint(bare)["family_id"] == "sd3"  # the listing still knows what it is
    with pytest.raises(CheckpointError, match="sd3_unet_only.safetensors.*VAE.*models/VAE"):
        check_sd3_parts(read_header(bare), tiny[1].text_encoder_dir)


def test_hires_fix_second_pass_at_full_strength_is_txt2img_at_the_hires_size(components):
    from PIL import Image

    def pixel_upscale(image, size):
        return image.resize(size, Image.LANCZOS)

    def hires(**fields):
        control = JobControl()
        fields = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": STEPS, **fields}
        out = list(flow_runner.run_hires(components, torch.device("cpu"), request(**fields), pixel_upscale,
                                         control=control))
        return [np.asarray(image, dtype=np.float64) for batch in out for image in batch.images]

    (full,) = hires(hr_upscaler="Latent", hr_denoising_strength=1.0)
    assert full.shape == (96, 96, 3)
    (plain,), _ = ours(components, width=96, height=96)
    assert psnr(full, plain) >= 40  # pure noise again, drawn from the same seed at the hires size
    (kept,) = hires(hr_upscaler="Lanczos", hr_denoising_strength=0.3)
    assert kept.shape == (96, 96, 3) and psnr(kept, plain) < 30
