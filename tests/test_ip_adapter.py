"""Image prompts (IP-Adapter) through the control units: files found where users keep them, checked
before loading, and our denoising loop against diffusers' pipelines with the same tiny U-Net, adapter
and image encoder (full precision, same prompt embeddings and noise): >= 40 dB; a unit at weight 0
leaves the image exactly as without it, and the cached U-Net is the same afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny import write_tiny_checkpoint
from tiny_ip_adapter import (
    TINY_ENCODER_CONFIG,
    make_tiny_image_encoder,
    nested,
    tiny_ip_adapter_state,
    write_tiny_image_encoder,
    write_tiny_ip_adapter,
)

from pipelines.core.checks import RequestError
from pipelines.core.control import ControlUnit
from pipelines.core.request import GenerationRequest
from pipelines.core.settings import MODEL_KINDS
from pipelines.generate import ip_adapter, runner, schedulers
from pipelines.generate.prompts import encode_prompts
from pipelines.models.build import load_components
from pipelines.models.ip_adapter_files import encoder_config
from pipelines.models.registry import ModelRegistry
from pipelines.models.stores import HashCache

SIZE = 64
BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=11, steps=4, sampler="Euler", cfg_scale=5.0,
            width=SIZE, height=SIZE, save_images=False)
ADAPTER_SEED = {"base": 1, "plus": 2}


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i.convert("RGB"), dtype=np.float64) for i in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def prompt_image() -> Image.Image:
    image = Image.new("RGB", (48, 40), (20, 60, 200))
    ImageDraw.Draw(image).ellipse((8, 6, 40, 34), fill=(240, 200, 30))
    return image


def make_registry(root, unet, family: str) -> ModelRegistry:
    """models/ with tiny adapters in ComfyUI's folder (and a .bin in A1111's ControlNet folder) and the encoder."""
    folders = {kind: root / MODEL_KINDS[kind].folder for kind in MODEL_KINDS}
    for variant, seed in ADAPTER_SEED.items():
        write_tiny_ip_adapter(folders["ipadapter"] / f"ip-adapter-{variant}_{family}.safetensors", unet, variant, seed)
    write_tiny_ip_adapter(folders["controlnet"] / f"ip-adapter_{family}.bin", unet, "base", ADAPTER_SEED["base"])
    write_tiny_image_encoder(folders["clip_vision"] / "CLIP-ViT-tiny.safetensors")
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return ModelRegistry(folders, HashCache(root / "hashes.json"))


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"ipa_{family}")
    components = load_components(write_tiny_checkpoint(root / "model.safetensors", family=family, seed=0, dtype=None))
    return family, components, make_registry(root / "models", components.unet, family)


def ours(components, registry, units, **changes) -> Image.Image:
    request = GenerationRequest(**{**BASE, **changes}, control_units=tuple(units)).with_resolved_seeds()
    _, prompt_units = ip_adapter.split_units(request.control_units, registry)
    job = ip_adapter.prepare_image_prompts(request, prompt_units, registry=registry, unet=components.unet,
                                           device="cpu")
    with ip_adapter.applied(components.unet, job.prompts) as steps:
        return list(runner.run(components, "cpu", request, image_prompts=steps))[0].images[0]


def reference(components, variant: str, weight: float, acting: set[int] | None = None) -> Image.Image:
    """diffusers' pipeline with the adapter loaded by diffusers from the same tensors; `acting`: the
    steps (0-based) on which the adapter's scale is `weight`, 0 on the others (a callback sets it)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor

    size = TINY_ENCODER_CONFIG["image_size"]
    extractor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    cond = encode_prompts(components, BASE["prompt"], BASE["negative_prompt"], 1, "cpu").at(0, BASE["steps"])
    scheduler = schedulers.make_scheduler(BASE["sampler"], "Automatic", components.scheduler_config)
    shape = (1, components.unet.config.out_channels, SIZE // 8, SIZE // 8)
    from pipelines.generate.noise import noise_for_seed

    common = dict(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, ip_adapter_image=prompt_image(),
                  latents=noise_for_seed(BASE["seed"], BASE["seed"], 0.0, shape, (0, 0))[0],
                  num_inference_steps=BASE["steps"], guidance_scale=BASE["cfg_scale"], height=SIZE, width=SIZE)
    parts = dict(vae=components.vae, unet=components.unet, scheduler=scheduler, image_encoder=make_tiny_image_encoder(),
                 feature_extractor=extractor)
    if cond.pooled_cond is not None:
        pipe = StableDiffusionXLPipeline(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                         force_zeros_for_empty_prompt=False, **parts)
        common.update(pooled_prompt_embeds=cond.pooled_cond, negative_pooled_prompt_embeds=cond.pooled_uncond)
    else:
        pipe = StableDiffusionPipeline(text_encoder=None, tokenizer=None, safety_checker=None,
                                       requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    components.unet._load_ip_adapter_weights([nested(tiny_ip_adapter_state(components.unet, variant,
                                                                           ADAPTER_SEED[variant]))])
    try:
        acting = set(range(BASE["steps"])) if acting is None else acting
        pipe.set_ip_adapter_scale(weight if 0 in acting else 0.0)

        def after_step(pipeline, step, timestep, kwargs):
            pipeline.set_ip_adapter_scale(weight if step + 1 in acting else 0.0)
            return kwargs
        common["callback_on_step_end"] = after_step
        return pipe(**common).images[0]
    finally:
        pipe.unload_ip_adapter()


def unit(family: str, variant: str = "base", **changes) -> ControlUnit:
    module = "ip-adapter_clip_sd15" if family == "sd1" else "ip-adapter_clip_sdxl_plus_vith"
    fields = dict(module=module, model=f"ip-adapter-{variant}_{family}", image=prompt_image())
    return ControlUnit(**{**fields, **changes})


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_an_image_prompt_matches_diffusers_pipeline(setup, variant):
    family, components, registry = setup
    got = ours(components, registry, [unit(family, variant, weight=0.8)])
    want = reference(components, variant, 0.8)
    assert psnr(got, want) >= 40
    assert psnr(want, ours(components, registry, [])) < 35  # the image prompt steers far beyond the tolerance


def test_start_and_end_set_the_adapters_scale_per_step(setup):
    family, components, registry = setup
    got = ours(components, registry, [unit(family, guidance_start=0.5)])  # steps 3 and 4 of 4
    assert psnr(got, reference(components, "base", 1.0, acting={2, 3})) >= 40
    assert psnr(got, reference(components, "base", 1.0)) < 40  # the start changes the image
    got = ours(components, registry, [unit(family, guidance_end=0.5)])  # steps 1 and 2 of 4
    assert psnr(got, reference(components, "base", 1.0, acting={0, 1})) >= 40


def test_weight_zero_gives_the_image_without_it_pixel_for_pixel(setup):
    family, components, registry = setup
    plain = np.asarray(ours(components, registry, []))
    assert np.array_equal(np.asarray(ours(components, registry, [unit(family, weight=0.0)])), plain)


def test_the_cached_unet_is_unchanged_after_the_job_even_a_failed_one(setup):
    family, components, registry = setup
    unet = components.unet
    processors, weights = dict(unet.attn_processors), {k: v.clone() for k, v in unet.state_dict().items()}
    plain = np.asarray(ours(components, registry, []))
    ours(components, registry, [unit(family, "plus"), unit(family, "base", weight=0.5)])  # two adapters at once
    request = GenerationRequest(**BASE, control_units=(unit(family),))
    job = ip_adapter.prepare_image_prompts(request, [(0, request.control_units[0])], registry=registry, unet=unet,
                                           device="cpu")
    with pytest.raises(KeyboardInterrupt), ip_adapter.applied(unet, job.prompts):
        raise KeyboardInterrupt  # an interrupted job
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert {k: id(v) for k, v in unet.attn_processors.items()} == {k: id(v) for k, v in processors.items()}
    state = unet.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert np.array_equal(np.asarray(ours(components, registry, [])), plain)


def test_units_split_into_control_and_image_prompts(setup):
    family, _, registry = setup
    units = [ControlUnit(module="canny", model="control_sd15_canny"),
             ControlUnit(module="none", model=f"ip-adapter_{family}.bin"),  # an IP-Adapter in models/ControlNet
             unit(family, weight=0.0),  # inactive: neither
             unit(family, "plus")]
    control, prompts = ip_adapter.split_units(units, registry)
    assert [i for i, _ in control] == [0] and [i for i, _ in prompts] == [1, 3]


def test_the_control_model_list_offers_the_adapters_of_both_folders_as_usable(setup):
    family, _, registry = setup
    listed = {f.name: f.details for f in ip_adapter.control_model_list(registry)}
    assert {f"ip-adapter_{family}.bin", f"ip-adapter-base_{family}.safetensors",
            f"ip-adapter-plus_{family}.safetensors"} <= set(listed)
    assert listed[f"ip-adapter_{family}.bin"]["control_type"] == "ip_adapter"
    assert listed[f"ip-adapter-plus_{family}.safetensors"]["variant"] == "plus"
    assert not any("error" in details for details in listed.values())
    assert "error" in {f.name: f for f in registry.list("controlnet")}[f"ip-adapter_{family}.bin"].details


def test_an_adapter_from_the_controlnet_folder_as_a_bin_file_gives_the_same_image(setup):
    family, components, registry = setup
    from_comfy_folder = ours(components, registry, [unit(family)])
    from_a1111_folder = ours(components, registry, [unit(family).replace(model=f"ip-adapter_{family}")])
    assert np.array_equal(np.asarray(from_comfy_folder), np.asarray(from_a1111_folder))


def test_a_missing_image_encoder_names_the_unit_and_where_the_file_goes(setup, tmp_path):
    family, components, _ = setup
    registry = make_registry(tmp_path / "models", components.unet, family)
    (tmp_path / "models" / "clip_vision" / "CLIP-ViT-tiny.safetensors").unlink()
    write_tiny_image_encoder(tmp_path / "models" / "clip_vision" / "other.safetensors", hidden_size=128,
                             projection_dim=48)  # fits neither adapter
    request = GenerationRequest(**BASE, control_units=(ControlUnit(module="none", model="canny"), unit(family)))
    _, prompts = ip_adapter.split_units(request.control_units, registry)
    with pytest.raises(RequestError) as caught:
        ip_adapter.prepare_image_prompts(request, prompts, registry=registry, unet=components.unet, device="cpu")
    assert caught.value.field == "control_units[1].model"
    for words in (request.control_units[1].module, f"ip-adapter-base_{family}", "projection width 32",
                  "models/clip_vision", "other.safetensors"):
        assert words in caught.value.message


@pytest.mark.parametrize("changes, field, words", [
    (dict(model="ip-adapter-nothing"), "model", "Available: ip-adapter-base"),
    (dict(image=None), "image", "needs an image"),
])
def test_bad_units_are_request_errors_naming_the_field(setup, changes, field, words):
    family, components, registry = setup
    request = GenerationRequest(**BASE, control_units=(unit(family, **changes),))
    _, prompts = ip_adapter.split_units(request.control_units, registry)
    with pytest.raises(RequestError) as caught:
        ip_adapter.prepare_image_prompts(request, prompts, registry=registry, unet=components.unet, device="cpu")
    assert caught.value.field == f"control_units[0].{field}" and words in caught.value.message


def test_an_adapter_for_another_family_is_refused_before_loading(setup, tmp_path):
    family, components, registry = setup
    other = "sdxl" if family == "sd1" else "sd1"
    other_unet = load_components(write_tiny_checkpoint(tmp_path / "o.safetensors", family=other, dtype=None)).unet
    write_tiny_ip_adapter(registry.listings["ipadapter"].root / "other.safetensors", other_unet)  # SDXL <-> SD 1.x
    request = GenerationRequest(**BASE, control_units=(unit(family).replace(model="other"),))
    with pytest.raises(RequestError, match="does not fit the checkpoint") as caught:
        ip_adapter.prepare_image_prompts(request, [(0, request.control_units[0])], registry=registry,
                                         unet=components.unet, device="cpu")
    assert caught.value.field == "control_units[0].model"


def test_the_encoder_config_of_a_real_vit_h_file_from_its_shapes():
    """OpenCLIP ViT-H/14 as ComfyUI ships it (shapes of the real file): 16 heads of 80, GELU, 224 px."""
    p = "vision_model."
    shapes = {p + "embeddings.patch_embedding.weight": (1280, 3, 14, 14),
              p + "embeddings.position_embedding.weight": (257, 1280),
              p + "encoder.layers.0.mlp.fc1.weight": (5120, 1280), "visual_projection.weight": (1024, 1280),
              **{f"{p}encoder.layers.{i}.layer_norm1.weight": (1280,) for i in range(32)}}
    config = encoder_config(shapes).config
    assert (config["num_attention_heads"], config["hidden_act"], config["image_size"], config["num_hidden_layers"],
            config["projection_dim"]) == (16, "gelu", 224, 32, 1024)


def test_an_image_prompt_unit_through_the_engine(tmp_path):
    """The whole job (needs the wiring in generation.py): the unit steers the image, the infotext names
    it as sd-webui-controlnet does, the next job without it is as before, a missing encoder is a 422."""
    from conftest import make_engine
    from tiny import write_tiny_sd1_checkpoint

    models = tmp_path / "models"
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", seed=0, dtype=None)
    engine = make_engine(models, tmp_path)
    unet = load_components(models / "Stable-diffusion" / "tiny.safetensors").unet  # for the adapter's shapes
    make_registry(models, unet, "sd1")
    request = GenerationRequest(**{**BASE, "steps": 2}, checkpoint="tiny.safetensors")
    plain = engine.generate(request)
    prompted = engine.generate(request.replace(control_units=(unit("sd1", weight=0.8),)))
    assert psnr(prompted.images[0], plain.images[0]) < 35
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter-base_sd1 [' in prompted.infotexts[0]
    assert np.array_equal(np.asarray(engine.generate(request).images[0]), np.asarray(plain.images[0]))
    (models / "clip_vision" / "CLIP-ViT-tiny.safetensors").unlink()
    with pytest.raises(RequestError, match="models/clip_vision") as caught:
        engine.generate(request.replace(control_units=(unit("sd1"),)))
    assert caught.value.field == "control_units[0].model"
