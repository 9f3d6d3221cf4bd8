"""Every checkpoint family, in its real single-file layout (tiny widths): detected, loaded
exactly, conditioned the family's way, and generating finite images through the engine."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_engine
from tiny import TINY_FAMILIES, make_tiny, tiny_single_file_state_dict, write_tiny_checkpoint

from pipelines.core.prediction_types import V_PREDICTION
from pipelines.core.request import GenerationRequest
from pipelines.models.architecture import open_clip_to_hf
from pipelines.models.build import load_components
from pipelines.models.checkpoint_file import CheckpointError, read_header
from pipelines.models.inspection import inspect_checkpoint

# name in models/Stable-diffusion -> (family, inpainting, expected description, resolution)
CASES = {
    "sd1.safetensors": ("sd1", False, "SD 1.x", 512),
    "sd1-inpainting.safetensors": ("sd1", True, "SD 1.x inpainting", 512),
    "sd2-512-base.safetensors": ("sd2", False, "SD 2.x", 512),
    "sd2-768-v.safetensors": ("sd2", False, "SD 2.x", 768),
    "sd2-inpainting.safetensors": ("sd2", True, "SD 2.x inpainting", 512),
    "sdxl.safetensors": ("sdxl", False, "SDXL", 1024),
    "sdxl-inpainting.safetensors": ("sdxl", True, "SDXL inpainting", 1024),
    "sdxl-refiner.safetensors": ("sdxl_refiner", False, "SDXL refiner", 1024),
}
SEEDS = {name: i + 10 for i, name in enumerate(CASES)}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-models")
    folder = root / "Stable-diffusion"
    for name, (family, inpainting, _, _) in CASES.items():
        # fp32 so the weights can be compared exactly after loading
        write_tiny_checkpoint(folder / name, family=family, seed=SEEDS[name], inpainting=inpainting, dtype=None)
    return root


@pytest.fixture(scope="module")
def family_engine(family_models, tmp_path_factory):
    return make_engine(family_models, tmp_path_factory.mktemp("family-engine"))


def path_of(models, name):
    return models / "Stable-diffusion" / name


@pytest.mark.parametrize("name", list(CASES))
def test_family_is_detected_and_weights_arrive_exactly(family_models, name):
    family, inpainting, description, _ = CASES[name]
    path = path_of(family_models, name)
    spec = inspect_checkpoint(read_header(path))
    assert spec.description == description
    assert spec.family.name == family and spec.inpainting == inpainting
    components = load_components(path, probe=False)
    unet, vae, encoders = make_tiny(family, seed=SEEDS[name], inpainting=inpainting)
    pairs = [(unet, components.unet), (vae, components.vae), *zip(encoders, components.text_encoders)]
    assert len(components.text_encoders) == len(encoders) == len(TINY_FAMILIES[family][2])
    for expected, loaded in pairs:
        want, got = expected.state_dict(), loaded.state_dict()
        assert set(want) == set(got), type(expected).__name__
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}: {key}"
    assert not any(p.is_meta for m in components.modules() for p in m.parameters())
    assert components.vae.config.scaling_factor == (0.13025 if family.startswith("sdxl") else 0.18215)


def test_sdxl_architecture_is_read_from_shapes(family_models):
    base = inspect_checkpoint(read_header(path_of(family_models, "sdxl.safetensors"))).unet_config
    assert base["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert base["transformer_layers_per_block"][1:] == [1, 2]  # depth per level
    assert base["cross_attention_dim"] == 128  # CLIP-L + bigG widths, concatenated
    assert base["attention_head_dim"][1:] == [1, 2]  # head width 64
    assert base["addition_embed_type"] == "text_time"
    assert base["addition_time_embed_dim"] == 32 and base["projection_class_embeddings_input_dim"] == 64 + 6 * 32
    refiner = inspect_checkpoint(read_header(path_of(family_models, "sdxl-refiner.safetensors"))).unet_config
    assert refiner["transformer_layers_per_block"] == [2, 2, 2]  # the middle block's depth too
    assert refiner["projection_class_embeddings_input_dim"] == 64 + 5 * 32


def test_prediction_type_rules(family_models, tmp_path):
    models = family_models / "Stable-diffusion"
    # SD 2.x file names from Stability: 768(-v) -> v, 512/base -> epsilon
    v = inspect_checkpoint(read_header(models / "sd2-768-v.safetensors"))
    assert (v.prediction_type, v.prediction_source, v.native_resolution) == (V_PREDICTION, "file name", 768)
    eps = inspect_checkpoint(read_header(models / "sd2-512-base.safetensors"))
    assert (eps.prediction_type, eps.native_resolution) == ("epsilon", 512)
    # a .yaml beside the file wins (A1111's convention)
    copy = tmp_path / "my-finetune.safetensors"
    shutil.copy(models / "sd2-512-base.safetensors", copy)
    assert inspect_checkpoint(read_header(copy)).prediction_source == "probe"  # nothing says: probed on load
    copy.with_suffix(".yaml").write_text('model:\n  target: x\n  params:\n    parameterization: "v"\n')
    spec = inspect_checkpoint(read_header(copy))
    assert (spec.prediction_type, spec.prediction_source, spec.native_resolution) == (
        V_PREDICTION, "my-finetune.yaml", 768)
    components = load_components(copy)
    assert components.scheduler_config["prediction_type"] == V_PREDICTION
    copy.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")  # LDM default: eps
    assert inspect_checkpoint(read_header(copy)).prediction_type == "epsilon"
    # safetensors metadata
    meta = write_tiny_checkpoint(tmp_path / "meta.safetensors", family="sd2",
                                 metadata={"modelspec.prediction_type": "v"})
    spec = inspect_checkpoint(read_header(meta))
    assert (spec.prediction_type, spec.prediction_source) == (V_PREDICTION, "file metadata")
    # inpainting and SD 1.x / SDXL: epsilon without asking
    for name in ("sd2-inpainting.safetensors", "sd1.safetensors", "sdxl.safetensors"):
        assert inspect_checkpoint(read_header(models / name)).prediction_type == "epsilon"
    # SDXL v-prediction fine-tunes say so in their metadata
    vxl = write_tiny_checkpoint(tmp_path / "vxl.safetensors", family="sdxl",
                                metadata={"modelspec.prediction_type": "v"})
    assert inspect_checkpoint(read_header(vxl)).prediction_type == V_PREDICTION


def test_probe_decides_unlabelled_sd2_files(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "finetune.safetensors", family="sd2", seed=4)
    components = load_components(path)
    assert components.spec.prediction_source == "probe"
    assert components.spec.prediction_type in ("epsilon", V_PREDICTION)
    assert components.spec.native_resolution == (768 if components.spec.prediction_type == V_PREDICTION else 512)


def test_user_override_persists_and_reaches_the_listing(family_models, tmp_path):
    engine = make_engine(family_models, tmp_path)
    engine.registry.set_prediction_type("sd2-512-base.safetensors", "v")
    listed = {f.name: f for f in engine.list_checkpoints()}
    details = listed["sd2-512-base.safetensors"].details
    assert (details["prediction"], details["prediction_source"], details["resolution"]) == (
        V_PREDICTION, "user override", 768)
    restarted = make_engine(family_models, tmp_path)  # same data dir
    assert restarted.registry.prediction_override("sd2-512-base.safetensors") == V_PREDICTION
    restarted.registry.set_prediction_type("sd2-512-base.safetensors", None)
    assert restarted.registry.prediction_override("sd2-512-base.safetensors") is None
    with pytest.raises(ValueError):
        restarted.registry.set_prediction_type("sd2-512-base.safetensors", "x0")


def test_ema_weights_are_loaded_from_full_checkpoints(tmp_path):
    ema_unet, _, _ = make_tiny("sd1", seed=99)
    from pipelines.models.families import UNET_PREFIX
    from pipelines.models.ldm_layout import unet_to_ldm

    ema = {"model_ema." + ("diffusion_model." + k).replace(".", ""): v
           for k, v in unet_to_ldm(ema_unet.state_dict(), ema_unet.config).items()}
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    assert len(ema) > 100
    path = write_tiny_checkpoint(tmp_path / "full.safetensors", seed=1, dtype=None, extra=ema)
    spec = inspect_checkpoint(read_header(path))
    assert spec.ema
    loaded = load_components(path)
    want = ema_unet.state_dict()
    assert all(torch.equal(want[k], v) for k, v in loaded.unet.state_dict().items())
    # the training weights are in the file too (seed 1), and were not taken
    assert (UNET_PREFIX + "out.2.weight") in read_header(path).shapes


def test_open_clip_layout_matches_open_clip_itself():
    """Our open_clip -> transformers conversion computes what open_clip computes."""
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    _, _, (bigg,) = make_tiny("sdxl_refiner", seed=5)
    from pipelines.models.ldm_layout import clip_to_open_clip

    state = clip_to_open_clip(bigg.state_dict())
    state.pop("logit_scale")
    tower = open_clip_transformer.TextTransformer(context_length=77, vocab_size=49408, width=64, heads=1, layers=3,
                                                  mlp_ratio=2.0, output_dim=64, act_layer=torch.nn.GELU)
    tower.load_state_dict(state, strict=False)
    missing = set(tower.state_dict()) - set(state)
    assert not missing - {"attn_mask"}, missing
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    with torch.no_grad():
        theirs = tower.eval()(ids)
        ours = bigg(ids).text_embeds
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # and diffusers' own converter agrees with ours, tensor by tensor
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefixed = {"te." + k: v for k, v in clip_to_open_clip(bigg.state_dict()).items()}
    theirs = convert_open_clip_checkpoint(bigg, prefixed, prefix="te.")
    ours = open_clip_to_hf(prefixed, "te.", pooled=True)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def req(name: str, **fields) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=2, width=64, height=64, seed=7,
                sampler="Euler", save_images=False, checkpoint=name)
    return GenerationRequest(**{**base, **fields})


@pytest.mark.parametrize("name", list(CASES))
def test_every_family_generates_finite_images(family_engine, name):
    result = family_engine.generate(req(name, batch_size=2))
    assert len(result.images) == 2
    for image in result.images:
        array = np.asarray(image)
        assert image.size == (64, 64) and np.isfinite(array).all() and array.std() > 0


def test_sdxl_conditioning(family_engine):
    from pipelines.generate.prompts import encode_prompts
    from pipelines.generate.runner import added_conditioning

    model = family_engine.manager.get("sdxl.safetensors", path_of(family_engine.paths.models_dir, "sdxl.safetensors"))
    components = model.components
    cond = encode_prompts(components, "a cat", "", 1, "cpu")
    assert cond.cond.shape == (1, 77, 128) and cond.pooled_cond.shape == (1, 64)
    # both encoders' penultimate hidden states, no final norm, concatenated
    parts = []
    for encoder, tokenizer in zip(components.text_encoders, components.tokenizers):
        ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        parts.append(out.hidden_states[-2])
    torch.testing.assert_close(cond.cond, torch.cat(parts, -1))
    torch.testing.assert_close(cond.pooled_cond, out.text_embeds)
    assert components.tokenizers[1].pad_token == "!" and components.tokenizers[0].pad_token == "<|endoftext|>"
    # an empty negative prompt is zeros (A1111 and diffusers)
    assert not cond.uncond.any() and not cond.pooled_uncond.any()
    added = added_conditioning(components, cond.pooled_cond, cond.pooled_uncond, 96, 64, True, 2, "cpu")
    assert added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 4
    assert added["text_embeds"].shape == (4, 64)

    refiner = family_engine.manager.get(
        "sdxl-refiner.safetensors", path_of(family_engine.paths.models_dir, "sdxl-refiner.safetensors")).components
    cond = encode_prompts(refiner, "a cat", "ugly", 1, "cpu")
    assert cond.cond.shape == (1, 77, 64) and cond.uncond.any()
    added = added_conditioning(refiner, cond.pooled_cond, cond.pooled_uncond, 64, 64, True, 1, "cpu")
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 2.5], [64, 64, 0, 0, 6.0]]


def test_sd2_uses_the_penultimate_layer_whatever_the_clip_skip(family_engine):
    a = family_engine.generate(req("sd2-512-base.safetensors", clip_skip=1)).images[0]
    b = family_engine.generate(req("sd2-512-base.safetensors", clip_skip=3)).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    from pipelines.generate.prompts import encode_prompts

    model = family_engine.manager.get("sd2-512-base.safetensors",
                                      path_of(family_engine.paths.models_dir, "sd2-512-base.safetensors"))
    components = model.components
    encoder, tokenizer = components.text_encoders[0], components.tokenizers[0]
    assert tokenizer.pad_token == "!"
    cond = encode_prompts(components, "a cat", "", 1, "cpu").cond
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[-1] == 0  # padded with "!"
    hidden = encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]
    body = getattr(encoder, "text_model", encoder)
    torch.testing.assert_close(cond, body.final_layer_norm(hidden))


def test_v_prediction_reaches_the_scheduler(family_engine):
    model = family_engine.manager.get("sd2-768-v.safetensors",
                                      path_of(family_engine.paths.models_dir, "sd2-768-v.safetensors"))
    assert model.components.scheduler_config["prediction_type"] == V_PREDICTION
    assert family_engine.native_resolution("sd2-768-v.safetensors") == 768
    from pipelines.generate import schedulers

    for sampler in ("Euler", "DPM++ 2M", "DDIM"):
        scheduler = schedulers.make_scheduler(sampler, "Automatic", model.components.scheduler_config)
        assert scheduler.config.prediction_type == V_PREDICTION


def test_diffusers_folders_are_listed_and_loaded(family_models, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from pipelines.models.clip_tokenizer import TOKENIZER_DIR
    from pipelines.models.families import SD_SCHEDULE

    root = tmp_path / "models"
    shutil.copytree(family_models, root)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k not in ("clip_sample", "set_alpha_to_one")})
    unet, vae, (te,) = make_tiny("sd1", seed=3)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(root / "Stable-diffusion" / "folders" / "tiny-sd1-diffusers")
    unet, vae, (te1, te2) = make_tiny("sdxl", seed=4)
    tok2 = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="!")
    StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                              tokenizer_2=tok2, scheduler=scheduler
                              ).save_pretrained(root / "Stable-diffusion" / "tiny-sdxl-diffusers")
    engine = make_engine(root, tmp_path)
    listed = {f.name: f for f in engine.list_checkpoints()}
    assert listed["folders/tiny-sd1-diffusers"].details["family"] == "SD 1.x"
    assert listed["tiny-sdxl-diffusers"].details["family"] == "SDXL"
    assert not any(name.startswith("tiny-sdxl-diffusers/") for name in listed)  # not descended into
    for name in ("folders/tiny-sd1-diffusers", "tiny-sdxl-diffusers"):
        result = engine.generate(req(name))
        assert np.isfinite(np.asarray(result.images[0])).all()
        assert "Model hash: " in result.infotexts[0]
    loaded = engine.manager.get("tiny-sdxl-diffusers", root / "Stable-diffusion" / "tiny-sdxl-diffusers").components
    assert torch.equal(loaded.unet.conv_in.weight, unet.conv_in.weight)
    assert loaded.tokenizers[1].pad_token == "!"


def test_every_family_loads_with_the_network_blocked(family_models, no_network):
    for name in CASES:
        components = load_components(path_of(family_models, name))
        assert all(t("a cat").input_ids[:2] == [49406, 320] for t in components.tokenizers)


def test_unknown_and_partial_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, lora)
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        inspect_checkpoint(read_header(lora))
    unet, vae, encoders = make_tiny("sdxl", seed=1)
    state = tiny_single_file_state_dict("sdxl", unet, vae, encoders)
    del state["conditioner.embedders.1.model.text_projection"]
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, partial)
    with pytest.raises(CheckpointError, match="incomplete SDXL"):
        inspect_checkpoint(read_header(partial))


def test_user_override_changes_what_is_generated(family_models, tmp_path):
    engine = make_engine(family_models, tmp_path)
    name = "sd2-512-base.safetensors"
    before = engine.generate(req(name)).images[0]
    engine.registry.set_prediction_type(name, "v_prediction")
    after = engine.generate(req(name)).images[0]
    assert not np.array_equal(np.asarray(before), np.asarray(after))
    assert engine.loaded_checkpoints() == [name]  # the schedule changed, the model was not reloaded
    assert engine.native_resolution(name) == 768


def test_a_probed_prediction_type_reaches_the_listing(tmp_path):
    models = tmp_path / "models"
    write_tiny_checkpoint(models / "Stable-diffusion" / "finetune.safetensors", family="sd2", seed=4)
    engine = make_engine(models, tmp_path)
    assert engine.list_checkpoints()[0].details["prediction_source"] == "probe"
    engine.generate(req("finetune.safetensors", steps=1))
    probed = load_components(models / "Stable-diffusion" / "finetune.safetensors").spec
    details = engine.list_checkpoints()[0].details
    assert (details["prediction"], details["prediction_source"], details["resolution"]) == (
        probed.prediction_type, "probed when loaded", probed.native_resolution)
