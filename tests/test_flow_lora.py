"""LoRA on SD 3 / 3.5 and Flux.1: files in the layouts trainers write (diffusers/peft, kohya, BFL/ComfyUI)
give, through the engine, the image diffusers' pipelines give with `load_lora_weights` on the same file;
weights, the infotext, a LoRA of another family, and the cached model unchanged afterwards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_engine
from lora_files import assert_same_state, model_state, state_without_lora
from safetensors.torch import save_file
from test_flux import reference as flux_reference
from test_sd3 import reference as sd3_reference
from tiny_flux import make_tiny_flux, write_tiny_flux
from tiny_lora_flow import (
    RANK,
    clip_linears,
    diffusers_attention,
    kohya_lora,
    original_linears,
    peft_lora,
    sd3_kohya_from_peft,
    shared_qkv_down,
)
from tiny_sd3 import make_tiny_sd3, transformer_to_sai, write_tiny_sd3

from pipelines.core.infotext import parse_infotext
from pipelines.core.request import GenerationRequest
from pipelines.generate import lora
from pipelines.generate.flow_lora import sd3_kohya_to_peft
from pipelines.models.flux_build import load_flux_components
from pipelines.models.sd3_build import load_sd3_components

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a photo of a red cat", "blue sky", 1234, 3, 64  # as test_flux / test_sd3
FLUX_FILE, SD3_FILE = "flux_aio.safetensors", "sd3_all.safetensors"


def flux_files(models) -> dict[str, dict[str, torch.Tensor]]:
    transformer, clip = models.transformer, models.clip_l
    bfl = original_linears(transformer, "flux")
    # diffusers' kohya converter splits single blocks' linear1 at Flux.1's real widths (3072...): not this model's
    blocks = {p: s for p, s in bfl.items() if p.startswith(("double_blocks", "single_blocks")) and "linear1" not in p}
    outer = {p: s for p, s in bfl.items() if p.startswith(("txt_in", "final_layer.linear", "time_in"))}
    t5 = {"lora_te2_encoder_block_0_layer_0_SelfAttention_q" + suffix: t for suffix, t in
          ((".lora_down.weight", torch.randn(RANK, 64)), (".lora_up.weight", torch.randn(64, RANK)))}
    return {
        "flux_peft": {**peft_lora(diffusers_attention(transformer), "transformer."),
                      **peft_lora(clip_linears(clip), "text_encoder.", seed=1)},
        "flux_kohya": {**kohya_lora(blocks, "lora_unet_", seed=2),
                       **kohya_lora(clip_linears(clip), "lora_te1_", seed=3)},
        # the same layers in BFL/ComfyUI's names and in kohya's (alpha = rank: the same delta)
        "flux_comfy": peft_lora(blocks, "diffusion_model.", seed=4),
        "flux_kohya_same": kohya_lora(blocks, "lora_unet_", seed=4, alpha=float(RANK)),
        "flux_outer": {**kohya_lora(outer, "lora_unet_", seed=5, scale=0.6), **t5},
    }


def sd3_files(models) -> dict[str, dict[str, torch.Tensor]]:
    transformer = shared_qkv_down(peft_lora(diffusers_attention(models.transformer), "transformer.", seed=6))
    clip_l, clip_g = clip_linears(models.clip_l), clip_linears(models.clip_g)
    return {
        "sd3_peft": {**transformer, **peft_lora(clip_l, "text_encoder.", seed=7),
                     **peft_lora(clip_g, "text_encoder_2.", seed=8)},
        "sd3_kohya": {**sd3_kohya_from_peft(transformer, models.transformer),
                      **kohya_lora(clip_l, "lora_te1_", seed=7, alpha=float(RANK)),
                      **kohya_lora(clip_g, "lora_te2_", seed=8, alpha=float(RANK))},
    }


def sd15_lora() -> dict[str, torch.Tensor]:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {name + ".lora_down.weight": torch.randn(RANK, 32), name + ".lora_up.weight": torch.randn(32, RANK),
            name + ".alpha": torch.tensor(1.0)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, work = tmp_path_factory.mktemp("flow-lora-models"), tmp_path_factory.mktemp("flow-lora-files")
    flux, sd3 = make_tiny_flux(seed=3), make_tiny_sd3(seed=3, qk_norm="rms_norm", dual_attention_layers=(0,))
    flux_written, sd3_written = write_tiny_flux(work / "flux", flux), write_tiny_sd3(work / "sd3", sd3)
    checkpoints, loras = root / "Stable-diffusion", root / "Lora"
    checkpoints.mkdir()
    loras.mkdir()
    shutil.copy(flux_written.all_in_one, checkpoints / FLUX_FILE)
    shutil.copy(sd3_written.all_in_one, checkpoints / SD3_FILE)
    shutil.copytree(flux_written.all_in_one.parent / "t5_tokenizer", checkpoints / "t5_tokenizer")
    for name, state in {**flux_files(flux), **sd3_files(sd3), "sd15": sd15_lora()}.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(loras / f"{name}.safetensors"))
    engine = make_engine(root, tmp_path_factory.mktemp("flow-lora-engine"))
    return engine, flux_written, sd3_written


def generate(engine, checkpoint: str, tags: str = "", **fields):
    flux = checkpoint == FLUX_FILE
    base = dict(prompt=PROMPT + tags, negative_prompt=NEGATIVE, seed=SEED, subseed=0, steps=STEPS,
                cfg_scale=1.0 if flux else 4.5, sampler="Euler", width=SIZE, height=SIZE, save_images=False,
                checkpoint=checkpoint)
    result = engine.generate(GenerationRequest(**{**base, **fields}))
    return np.asarray(result.images[0], dtype=np.float64), result


_made: dict = {}


def made(engine, checkpoint: str, tags: str = ""):
    """`generate` once per (checkpoint, tags) in this module: the requests are deterministic."""
    if (checkpoint, tags) not in _made:
        _made[checkpoint, tags] = generate(engine, checkpoint, tags)
    return _made[checkpoint, tags]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def lora_path(engine, name: str) -> str:
    return str(engine.paths.folder("lora") / f"{name}.safetensors")


def diffusers_flux_with(components, path: str) -> np.ndarray:
    """diffusers' FluxPipeline with `pipe.load_lora_weights(path)` on separately loaded modules."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
    pipe = FluxPipeline(transformer=components.unet, vae=components.vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.load_lora_weights(path)
    try:
        return flux_reference(components)
    finally:
        pipe.unload_lora_weights()


def diffusers_sd3_with(components, path: str) -> np.ndarray:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    encoders, tokenizers = components.text_encoders, components.tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=components.unet, vae=components.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=encoders[2], tokenizer_3=tokenizers[2])
    pipe.load_lora_weights(path)
    try:
        return sd3_reference(components, t5=True)
    finally:
        pipe.unload_lora_weights()


def cached(engine, checkpoint: str):
    file = engine.resolve_checkpoint(checkpoint)
    return engine.manager.get(file.name, file.path).components


def test_flux_lora_in_diffusers_and_kohya_layouts_matches_diffusers_flux_pipeline(setup):
    engine, files, _ = setup
    reference_modules = load_flux_components(files.all_in_one)
    plain, _ = made(engine, FLUX_FILE)
    assert psnr(plain, flux_reference(reference_modules)) >= 40  # the same model and settings without a LoRA
    for name in ("flux_peft", "flux_kohya"):
        image, result = made(engine, FLUX_FILE, f"<lora:{name}:1>")
        assert result.warnings == [], name
        assert psnr(image, diffusers_flux_with(reference_modules, lora_path(engine, name))) >= 40, name
        assert psnr(image, plain) < 30, name  # the LoRA acts
    comfy, _ = made(engine, FLUX_FILE, "<lora:flux_comfy:1>")
    kohya, _ = made(engine, FLUX_FILE, "<lora:flux_kohya_same:1>")
    assert psnr(comfy, kohya) >= 60 and psnr(comfy, plain) < 30  # BFL/ComfyUI names: the same layers as kohya's


def test_flux_kohya_embedder_layers_apply_and_t5_layers_are_reported(setup):
    engine = setup[0]
    plain, _ = made(engine, FLUX_FILE)
    image, result = made(engine, FLUX_FILE, "<lora:flux_outer:1>")
    # diffusers' converter names txt_in / final_layer / time_in without "transformer.": applied all the same
    assert psnr(image, plain) < 40
    assert result.warnings == ["LoRA flux_outer: its 1 T5 layer(s) are not applied (only the CLIP encoders take LoRA)"]


def test_sd3_lora_matches_diffusers_sd3_pipeline_and_kohyas_layout_gives_the_same_image(setup):
    engine, _, files = setup
    reference_modules = load_sd3_components(files.all_in_one)
    plain, _ = made(engine, SD3_FILE)
    peft, result = made(engine, SD3_FILE, "<lora:sd3_peft:1>")
    assert result.warnings == []
    assert psnr(peft, diffusers_sd3_with(reference_modules, lora_path(engine, "sd3_peft"))) >= 40
    assert psnr(peft, plain) < 30
    # sd-scripts' file of the same LoRA: SAI's fused qkv, lora_te1_ / lora_te2_ CLIP layers
    kohya, result = made(engine, SD3_FILE, "<lora:sd3_kohya:1>")
    assert result.warnings == [] and psnr(kohya, peft) >= 40


def test_every_sd3_kohya_layer_lands_on_the_diffusers_modules_that_sais_layer_became():
    """Each SAI layer's delta (up @ down * alpha / rank) equals what the converted layers' deltas make when
    written back in SAI's layout by the tiny model's own writer (fused qkv, swapped final adaLN halves)."""
    transformer = make_tiny_sd3(seed=3, qk_norm="rms_norm", dual_attention_layers=(0,)).transformer
    sai_layers = original_linears(transformer, "sd3")
    kohya = kohya_lora(sai_layers, "lora_unet_", alpha=2.0)
    converted = sd3_kohya_to_peft(kohya, transformer)
    deltas = {key[len("transformer."):-len(".lora_A.weight")] + ".weight":
              converted[key.replace("lora_A", "lora_B")] @ a for key, a in converted.items() if "lora_A" in key}
    assert len(deltas) > len(sai_layers)  # fused layers became several modules
    written = transformer_to_sai({**transformer.state_dict(), **deltas}, transformer.config.num_layers)
    for path in sai_layers:
        name = "lora_unet_" + path.replace(".", "_")
        expected = kohya[name + ".lora_up.weight"] @ kohya[name + ".lora_down.weight"] * (2.0 / RANK)
        torch.testing.assert_close(written[path + ".weight"], expected, msg=path)
    # OneTrainer's names: lora_transformer_ + the diffusers path with underscores
    paths = diffusers_attention(transformer)
    peft = peft_lora(paths, "transformer.")
    onetrainer = {f"lora_transformer_{path.replace('.', '_')}.lora_{kohya}.weight":
                  peft[f"transformer.{path}.lora_{ab}.weight"]
                  for path in paths for kohya, ab in (("down", "A"), ("up", "B"))}
    assert sd3_kohya_to_peft(onetrainer, transformer).keys() == peft.keys()
    assert all(torch.equal(t, peft[k]) for k, t in sd3_kohya_to_peft(onetrainer, transformer).items())


def test_weights_and_text_encoder_multiplier_change_the_image_and_the_infotext_has_the_hash(setup):
    engine = setup[0]
    plain, _ = made(engine, SD3_FILE)
    full, result = made(engine, SD3_FILE, "<lora:sd3_peft:1>")
    half, _ = made(engine, SD3_FILE, "<lora:sd3_peft:0.5>")
    no_te, _ = made(engine, SD3_FILE, "<lora:sd3_peft:0:1>")  # A1111's te:unet multipliers
    assert psnr(half, full) < 40 and psnr(half, plain) < 40
    assert psnr(no_te, full) < 40 and psnr(no_te, plain) < 40  # the CLIP layers act, and only those left out
    info = parse_infotext(result.infotexts[0])
    assert info["Lora hashes"] == f"sd3_peft: {lora.short_hash(engine.paths.folder('lora') / 'sd3_peft.safetensors')}"
    flux_half, result = made(engine, FLUX_FILE, "<lora:flux_kohya:0.5>")
    assert "Lora hashes: \"flux_kohya: " in result.infotexts[0]
    assert psnr(flux_half, made(engine, FLUX_FILE, "<lora:flux_kohya:1>")[0]) < 40


def test_the_cached_model_is_the_same_objects_with_the_same_weights_afterwards(setup):
    engine = setup[0]
    for checkpoint, name in ((FLUX_FILE, "flux_kohya"), (SD3_FILE, "sd3_kohya")):
        before, _ = made(engine, checkpoint)  # made before any LoRA ran, when the tests run in order
        components = cached(engine, checkpoint)
        modules = [components.unet, *components.text_encoders]
        ids = [[id(m) for m in module.modules()] for module in modules]
        state = state_without_lora(components)  # the previous test's set may still be merged
        generate(engine, checkpoint, f"<lora:{name}:1>")
        assert cached(engine, checkpoint) is components
        assert [[id(m) for m in module.modules()] for module in modules] == ids  # merged: no peft layers left
        assert np.array_equal(generate(engine, checkpoint)[0], before)  # the next job without it: the originals
        assert_same_state(state, model_state(components))  # bit-identical


def test_a_lora_of_another_family_is_a_warning_naming_it_and_the_image_is_unchanged(setup):
    engine = setup[0]
    plain, _ = made(engine, FLUX_FILE)
    image, result = made(engine, FLUX_FILE, "<lora:sd15:1>")
    assert np.array_equal(image, plain)
    assert result.warnings == ["LoRA sd15: its layers are for a U-Net model (SD 1.x, SD 2.x or SDXL), not Flux.1; "
                               "ignored"]
    _, result = made(engine, SD3_FILE, "<lora:flux_kohya:1>")
    assert result.warnings == ["LoRA flux_kohya: its layers are for Flux.1, not SD 3; ignored"]
