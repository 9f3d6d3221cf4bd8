"""The demo model's training code (pipelines/training) on tiny settings: data, determinism, resume, export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_engine

from pipelines.core.request import GenerationRequest
from pipelines.generate.prompts import chunk_ids, tokenize_chunks
from pipelines.models.build import load_components
from pipelines.models.checkpoint_file import read_header
from pipelines.training import data, models, train
from pipelines.training.__main__ import main
from pipelines.training.export import build_modules
from pipelines.training.state import Log

# --- data ---------------------------------------------------------------------------------------

def test_scenes_are_a_pure_function_of_seed_split_and_index():
    a, sa = data.sample(3, "train", 17)
    b, sb = data.sample(3, "train", 17)
    assert sa == sb and np.array_equal(a, b)
    c, _ = data.sample(3, "train", 18)
    d, _ = data.sample(4, "train", 17)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_match_the_drawn_pixels(split):
    for i in range(150):
        image, scene = data.sample(0, split, i)
        j = data.judge(image)
        assert (j.colour, j.shape, j.background) == (scene.colour, scene.shape, scene.background), (i, scene)
        x0, y0, x1, y1 = j.bbox
        side = max(x1 - x0, y1 - y0) + 1
        lo, hi = data.SIZES[scene.size]
        assert lo - 3 <= side <= hi + 3, (i, scene, side)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if scene.position == "center":
            assert abs(cx - 32) <= 5 and abs(cy - 32) <= 5
        else:
            vertical, horizontal = scene.position.split()
            assert (cy < 32) == (vertical == "top") and (cx < 32) == (horizontal == "left"), (i, scene)
        full = scene.caption()
        assert scene.colour in full and scene.shape in full and f"{scene.background} background" in full
        assert scene.size in full and (scene.position in full)


def test_held_out_combinations_never_appear_in_training_data():
    held = set(data.HELD_OUT)
    assert 15 <= len(held) <= 40 and not held & set(data.TRAIN_TRIPLES)
    seen = {(s.colour, s.shape, s.background) for s in (data.make_scene(0, "train", i) for i in range(3000))}
    assert not seen & held
    assert seen == set(data.TRAIN_TRIPLES)  # and all the others do
    assert {(s.colour, s.shape, s.background) for s in (data.make_scene(0, "heldout", i) for i in range(300))} == held
    # every part of a held-out triple was seen in training, in other company
    for c, s, b in held:
        assert any(t[0] == c and t[2] == b for t in data.TRAIN_TRIPLES)
        assert any(t[0] == c and t[1] == s for t in data.TRAIN_TRIPLES)
        assert any(t[1] == s and t[2] == b for t in data.TRAIN_TRIPLES)


def test_judge_scores_flat_and_wrong_images():
    flat = np.full((64, 64, 3), data.COLOURS["blue"], dtype=np.uint8)
    j = data.judge(flat)
    assert j.background == "blue" and j.colour is None and j.shape is None
    image, scene = data.sample(0, "heldout", 0)
    right = (scene.colour, scene.shape, scene.background)
    assert data.score([image], [right])["all"] == 1.0
    wrong = ("black" if scene.colour != "black" else "white", scene.shape, scene.background)
    assert data.score([image], [wrong]) == {"colour": 0.0, "background": 1.0, "shape": 1.0, "all": 0.0}


def test_token_ids_match_the_engines_prompt_encoding():
    tok = train.tokenizer()
    text = "a small red circle in the top left on a blue background"
    ids = train.token_ids(tok, [text, ""])
    assert ids[0].tolist() == chunk_ids(tok, tokenize_chunks(tok, text)[0])
    assert ids[1].tolist() == [49406] + [49407] * 76


# --- training -------------------------------------------------------------------------------------

TINY = train.PRESETS["tiny"]


def test_vae_normalisation_keeps_reconstructions_and_sets_latent_scale():
    vae = models.build_vae("tiny", 0).eval()
    x = data.to_model_range(data.batch_pixels(0, "train", range(8)))
    before = train.reconstruct(vae, x)
    mean = train.posterior(vae, x)[0]
    models.normalise_vae_latents(vae, mean.std().item())
    after = train.reconstruct(vae, x)
    assert torch.allclose(before, after, atol=1e-4)
    scaled = train.posterior(vae, x)[0] * models.SD1_SCALING_FACTOR
    assert abs(scaled.std().item() - 1.0) < 1e-3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A complete tiny training run through the command line entry point."""
    state = tmp_path_factory.mktemp("state")
    out = tmp_path_factory.mktemp("out") / "Stable-diffusion" / "demo-tiny.safetensors"
    assert main(["--preset", "tiny", "--state", str(state), "--out", str(out), "--quiet"]) == 0
    return state, out


def test_a_few_steps_reduce_the_loss(tiny_run, tmp_path):
    state, _ = tiny_run
    settings = dataclasses.replace(TINY, ldm_lr=2e-3, ldm_warmup=1)
    lat = train.load(state / "latents.pt")
    unet, text = models.build_unet_and_text("tiny", 0)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=settings.ldm_lr)
    acp = train.ddpm_alphas_cumprod()

    def held_loss():  # the same batch, timesteps and noise each time
        with torch.no_grad():
            return float(np.mean([train.ldm_loss(unet, text, lat, settings, 10**6 + k, acp).item() for k in range(4)]))

    before = held_loss()
    for step in range(15):
        loss = train.ldm_loss(unet, text, lat, settings, step, acp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < before * 0.9

    vae = models.build_vae("tiny", 0)
    x = data.to_model_range(data.batch_pixels(0, "train", range(4)))
    g = lambda: train.step_generator(0, "test", 0)  # noqa: E731
    with torch.no_grad():
        first = train.vae_loss(vae, x, g(), 1e-6, False)[0].item()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for _ in range(10):
        loss = train.vae_loss(vae, x, g(), 1e-6, False)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert train.vae_loss(vae, x, g(), 1e-6, False)[0].item() < first * 0.9


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_run, tmp_path):
    state, _ = tiny_run
    log = Log(None, quiet=True)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    # the autoencoder stage, interrupted at step 3 of 6, then resumed
    assert train.train_vae(resumed, TINY, log, stop_at=3) is None
    assert train.load(resumed / "vae.pt")["step"] == 3
    train.train_vae(resumed, TINY, log)
    assert _same_state(train.load(resumed / "vae_done.pt")["model"], train.load(state / "vae_done.pt")["model"])
    # the U-Net stage, on the uninterrupted run's latents
    (resumed / "latents.pt").write_bytes((state / "latents.pt").read_bytes())
    assert train.train_ldm(resumed, TINY, log, stop_at=2) is None
    assert train.train_ldm(resumed, TINY, log, stop_at=4) is None
    train.train_ldm(resumed, TINY, log)
    full, again = train.load(state / "ldm.pt"), train.load(resumed / "ldm.pt")
    for part in ("unet", "text", "ema_unet", "ema_text"):
        assert _same_state(full[part], again[part]), part
    assert full["step"] == again["step"] == TINY.ldm_steps


def test_state_folder_refuses_other_settings(tiny_run, tmp_path):
    state, _ = tiny_run
    with pytest.raises(SystemExit, match="other settings"):
        main(["--preset", "tiny", "--seed", "5", "--state", str(state), "--out", str(tmp_path / "x.safetensors"),
              "--quiet", "--stop-after", "vae"])


# --- export ---------------------------------------------------------------------------------------

def test_export_loads_through_the_project_loader_and_generates_at_64(tiny_run, tmp_path):
    state, out = tiny_run
    header = read_header(out)
    meta = header.metadata
    assert meta["sdui.native_resolution"] == "64" and meta["sdui.demo"] == "true"
    assert meta["sdui.vae_scaling_factor"] == "0.18215"
    assert json.loads(meta["sdui.training_settings"])["size"] == "tiny"
    for key in ("modelspec.title", "modelspec.description", "modelspec.license", "sdui.training_command"):
        assert meta[key]
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in header.shapes)

    components = load_components(out)
    assert components.spec.family.name == "sd1" and components.vae.config.scaling_factor == 0.18215
    # the loaded modules compute what the trained ones do (up to the file's fp16)
    unet, vae, text = build_modules(state, "tiny", 0)
    ids = train.token_ids(train.tokenizer(), ["a red circle on a blue background"]).long()
    with torch.no_grad():
        ctx = text(ids).last_hidden_state
        assert torch.allclose(ctx, components.text_encoders[0](ids).last_hidden_state, atol=2e-2)
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        assert torch.allclose(unet(x, t, encoder_hidden_states=ctx).sample,
                              components.unet(x, t, encoder_hidden_states=ctx).sample, atol=2e-2)

    engine = make_engine(out.parent.parent, tmp_path)
    result = engine.generate(GenerationRequest(prompt="a red circle on a blue background", steps=3, width=64,
                                               height=64, seed=1, sampler="Euler", save_images=False,
                                               checkpoint=out.name))
    image = result.images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0
