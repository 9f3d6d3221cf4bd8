"""txt2img / img2img / inpaint / upscale through the engine, on tiny real-layout checkpoints."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import make_engine
from PIL import Image, ImageDraw

from pipelines.core.infotext import request_fields_from_infotext
from pipelines.core.outputs import read_infotext
from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest, RequestError, UpscaleRequest
from pipelines.generate.images import prepare_mask

INPAINT_CKPT = "inpaint/tiny-inpainting.safetensors"


def req(**fields) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", negative_prompt="blurry", steps=3,
                width=64, height=64, seed=1234, sampler="Euler", save_images=False,
                checkpoint="tiny.safetensors")
    return GenerationRequest(**{**base, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_same_seed_gives_identical_pixels(engine):
    a = engine.generate(req()).images[0]
    b = engine.generate(req()).images[0]
    assert np.array_equal(pixels(a), pixels(b))
    c = engine.generate(req(seed=1235)).images[0]
    assert not np.array_equal(pixels(a), pixels(c))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM"])
def test_batch_image_i_equals_single_run_with_seed_plus_i(engine, sampler):
    batch = engine.generate(req(sampler=sampler, batch_size=3, seed=100))
    assert batch.seeds == [100, 101, 102]
    for i, image in enumerate(batch.images):
        single = engine.generate(req(sampler=sampler, seed=100 + i)).images[0]
        assert np.abs(pixels(image) - pixels(single)).max() <= 1, f"image {i} differs from seed {100 + i}"


def test_batch_count_continues_the_seeds_and_reports_progress(engine):
    seen = []
    result = engine.generate(req(batch_size=2, batch_count=2, seed=7), on_progress=seen.append)
    assert result.seeds == [7, 8, 9, 10]
    assert len(result.images) == 4
    assert [(p.batch_index, p.step) for p in seen] == [(b, s) for b in range(2) for s in (1, 2, 3)]
    assert seen[-1].fraction == 1.0 and seen[-1].eta == pytest.approx(0.0, abs=1e-6)
    assert "Batch 2/2, Step 3/3" in seen[-1].describe()


def test_random_seed_is_reported_and_written(engine):
    result = engine.generate(req(seed=-1))
    seed = result.seeds[0]
    assert 0 <= seed < 2**32
    assert f"Seed: {seed}," in result.infotexts[0]
    again = engine.generate(req(seed=seed)).images[0]
    assert np.array_equal(pixels(again), pixels(result.images[0]))


def test_txt2img_and_img2img_work_with_an_inpainting_checkpoint(engine):
    result = engine.generate(req(checkpoint=INPAINT_CKPT))
    assert result.images[0].size == (64, 64) and "Model: tiny-inpainting" in result.infotexts[0]
    result = engine.generate(req(checkpoint=INPAINT_CKPT, mode="img2img", init_image=gradient_image()))
    assert result.images[0].size == (64, 64)


def test_default_size_is_the_checkpoints_native_resolution(engine):
    assert engine.native_resolution("tiny.safetensors") == 512
    result = engine.generate(req(width=None, height=None, steps=1))
    assert result.images[0].size == (512, 512)
    assert "Size: 512x512" in result.infotexts[0]


def test_saved_png_carries_the_a1111_parameters(models_dir, tmp_path):
    engine = make_engine(models_dir, tmp_path)
    result = engine.generate(req(seed=42, batch_size=2, save_images=True))
    assert len(result.paths) == 2
    for path, seed in zip(result.paths, (42, 43)):
        assert re.search(rf"txt2img-images/\d{{4}}-\d\d-\d\d/\d{{5}}-{seed}\.png$", path), path
        text = Image.open(path).info["parameters"]
        assert text.startswith("a red circle on a blue background\nNegative prompt: blurry\n")
        assert f"Seed: {seed}," in text and "Steps: 3," in text and "Sampler: Euler," in text
        assert "Size: 64x64" in text and "Model: tiny" in text
        assert re.search(r"Model hash: [0-9a-f]{10}", text)
    numbers = sorted(int(p.rsplit("/", 1)[1].split("-")[0]) for p in result.paths)
    assert numbers == [0, 1]


def test_long_prompts_are_not_truncated(engine):
    words = " ".join(["red"] * 70 + ["blue"] * 20)  # 90 tokens: two chunks
    short = engine.generate(req(prompt=" ".join(["red"] * 70))).images[0]
    long = engine.generate(req(prompt=words)).images[0]
    assert not np.array_equal(pixels(short), pixels(long)), "tokens past 75 were dropped"


def test_clip_skip_changes_the_conditioning(engine):
    a = engine.generate(req(clip_skip=1)).images[0]
    b = engine.generate(req(clip_skip=2)).images[0]
    assert not np.array_equal(pixels(a), pixels(b))
    assert "Clip skip: 2" in engine.generate(req(clip_skip=2)).infotexts[0]


def gradient_image(w=64, h=64) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    return Image.fromarray(np.stack([x + 0 * y, y + 0 * x, 255 - (x + y) / 2], -1).astype(np.uint8))


def test_img2img_strength_controls_how_far_it_moves(engine):
    init = gradient_image()
    # strength 0 runs no step: the input through the VAE (the tiny random VAE is a poor copier)
    kept = engine.generate(req(mode="img2img", init_image=init, denoising_strength=0.0, steps=10)).images[0]
    low = engine.generate(req(mode="img2img", init_image=init, denoising_strength=0.2, steps=10)).images[0]
    high = engine.generate(req(mode="img2img", init_image=init, denoising_strength=1.0, steps=10)).images[0]
    assert low.size == (64, 64)
    assert np.abs(pixels(low) - pixels(kept)).mean() < np.abs(pixels(high) - pixels(kept)).mean()


def test_img2img_resizes_the_input_to_the_requested_size(engine):
    init = gradient_image(96, 48)
    for mode in ("just resize", "crop and resize", "resize and fill"):
        result = engine.generate(req(mode="img2img", init_image=init, resize_mode=mode, width=64, height=64))
        assert result.images[0].size == (64, 64)
        assert "Denoising strength: 0.75" in result.infotexts[0]


def square_mask(w=64, h=64, box=(16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def assert_unmasked_unchanged(result_image, init, overlay_mask):
    outside = np.asarray(overlay_mask) == 0
    assert outside.sum() > 1000, "the test mask should leave a large area untouched"
    assert np.array_equal(pixels(result_image)[outside], pixels(init)[outside])


@pytest.mark.parametrize("checkpoint", ["tiny.safetensors", INPAINT_CKPT])
@pytest.mark.parametrize("fill", ["original", "fill", "latent noise", "latent nothing"])
def test_inpaint_keeps_everything_outside_the_mask(engine, checkpoint, fill):
    init, mask = gradient_image(), square_mask()
    result = engine.generate(req(mode="inpaint", init_image=init, mask=mask, checkpoint=checkpoint,
                                 inpainting_fill=fill, denoising_strength=1.0, mask_blur=4))
    overlay = prepare_mask(mask, 64, 64, blur=4, invert=False, resize_mode="just resize")
    assert_unmasked_unchanged(result.images[0], init, overlay)
    inside = np.asarray(mask) == 255
    assert not np.array_equal(pixels(result.images[0])[inside], pixels(init)[inside]), "nothing was repainted"


def test_inpaint_not_masked_and_only_masked(engine):
    init, mask = gradient_image(), square_mask(box=(24, 24, 40, 40))
    inverted = engine.generate(req(mode="inpaint", init_image=init, mask=mask, inpainting_mask_invert=True,
                                   mask_blur=0, denoising_strength=1.0)).images[0]
    inside = np.asarray(mask) == 255
    assert np.array_equal(pixels(inverted)[inside], pixels(init)[inside])  # the painted part is kept

    only = engine.generate(req(mode="inpaint", init_image=init, mask=mask, inpaint_full_res=True,
                               inpaint_full_res_padding=8, mask_blur=2, denoising_strength=1.0))
    overlay = prepare_mask(mask, 64, 64, blur=2, invert=False, resize_mode="just resize")
    assert_unmasked_unchanged(only.images[0], init, overlay)
    assert "Inpaint area: Only masked" in only.infotexts[0]


def test_interrupt_stops_within_a_step(engine):
    control = JobControl()
    steps_seen = []

    def on_progress(p):
        steps_seen.append(p.step)
        if p.step == 2:
            control.interrupt()

    result = engine.generate(req(steps=10, batch_count=3), on_progress=on_progress, control=control)
    assert result.interrupted and result.images == []
    assert steps_seen == [1, 2]


def test_skip_ends_the_current_batch_and_goes_on(engine):
    control = JobControl()

    def on_progress(p):
        if p.batch_index == 0 and p.step == 1:
            control.skip()

    result = engine.generate(req(steps=3, batch_count=3, seed=10), on_progress=on_progress, control=control)
    assert not result.interrupted
    assert result.seeds == [11, 12]


@pytest.mark.parametrize("fields, field", [
    (dict(width=65), "width"),
    (dict(steps=0), "steps"),
    (dict(cfg_scale="high"), "cfg_scale"),
    (dict(sampler="Euler b"), "sampler"),
    (dict(sampler="LCM", schedule_type="Karras"), "schedule_type"),
    (dict(mode="img2img"), "init_image"),
    (dict(mode="inpaint", init_image=Image.new("RGB", (8, 8))), "mask"),
    (dict(seed=-5), "seed"),
    (dict(batch_size=100), "batch_size"),
])
def test_bad_requests_name_the_field(fields, field):
    with pytest.raises(RequestError) as err:
        req(**fields)
    assert err.value.field == field and field in str(err.value)


def test_unknown_checkpoint_names_the_field_and_lists_choices(engine):
    with pytest.raises(RequestError) as err:
        engine.generate(req(checkpoint="../../etc/passwd"))
    assert err.value.field == "checkpoint"
    assert "tiny.safetensors" in err.value.message


def test_upscale_by_factor_and_to_size(models_dir, tmp_path):
    engine = make_engine(models_dir, tmp_path)
    image = gradient_image(40, 30)
    result = engine.upscale(UpscaleRequest(image=image, upscaler="Lanczos", scale=2))
    assert result.images[0].size == (80, 60)
    assert "extras-images" in result.paths[0]
    assert "Postprocess upscaler: Lanczos" in Image.open(result.paths[0]).info["parameters"]
    exact = engine.upscale(UpscaleRequest(image=image, upscaler="Nearest", target_width=100, target_height=50,
                                          save_images=False))
    assert exact.images[0].size == (100, 50) and exact.paths == [""]
    with pytest.raises(ValueError, match="upscaler"):
        engine.upscale(UpscaleRequest(image=image, upscaler="Magic"))


def test_round_trip_from_the_saved_png_gives_identical_pixels(models_dir, tmp_path):
    engine = make_engine(models_dir, tmp_path)
    first = engine.generate(req(prompt="a (red:1.3) circle [on:under:2] a box", negative_prompt="blurry, [dark]",
                                sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=6.5, clip_skip=2,
                                seed=-1, save_images=True))
    fields = request_fields_from_infotext(read_infotext(first.paths[0]))
    hints = {k: fields.pop(k) for k in ("model_name", "model_hash") if k in fields}
    assert hints["model_name"] == "tiny"
    again = engine.generate(GenerationRequest(**fields, checkpoint=hints["model_name"], save_images=False))
    assert again.seeds == first.seeds
    assert np.array_equal(pixels(again.images[0]), pixels(first.images[0]))
