"""ControlNet and T2I-Adapter files: each layout people have is recognised (family, type) from
its header, loads into the diffusers module with exactly the written weights, and full-size
configs come out as diffusers' published ones; other files are refused naming the file;
the listing carries the details; the model cache keeps a loaded control until its file changes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter
from tiny import make_tiny, write_tiny_checkpoint
from tiny_control import (
    controlnet_original_state_dict,
    make_tiny_controlnet,
    make_tiny_t2i_adapter,
    save_state,
    write_tiny_controlnet,
    write_tiny_t2i_adapter,
)

from pipelines.core.settings import MODEL_KINDS, EngineSettings
from pipelines.models.build import empty_modules
from pipelines.models.checkpoint_file import CheckpointError
from pipelines.models.control_files import (
    convert_original_controlnet,
    describe_control_file,
    inspect_control,
    load_control_model,
)
from pipelines.models.device import choose_placement
from pipelines.models.manager import ModelManager
from pipelines.models.registry import ModelRegistry
from pipelines.models.stores import HashCache

TINY_SDXL_TIME_IDS = 32  # tests/tiny.py's SDXL U-Net: addition_time_embed_dim


def assert_same_weights(loaded, reference) -> None:
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("family,layout,suffix", [
    ("sd1", "original", ".safetensors"), ("sd1", "diffusers", ".safetensors"), ("sd1", "original", ".pth"),
    ("sd2", "original", ".safetensors"), ("sdxl", "original", ".safetensors"), ("sdxl", "diffusers", ".safetensors"),
])
def test_controlnet_layouts_are_recognised_and_load_the_written_weights(tmp_path, family, layout, suffix):
    path = write_tiny_controlnet(tmp_path / f"control{suffix}", family=family, layout=layout, seed=3)
    details = describe_control_file(path)
    assert details["family"] == family and details["control_type"] == "controlnet"
    assert details["layout"] == layout and details["conditioning_channels"] == 3
    module = load_control_model(path, details, time_ids_width=TINY_SDXL_TIME_IDS if family == "sdxl" else None)
    assert isinstance(module, ControlNetModel)
    assert_same_weights(module, make_tiny_controlnet(family, seed=3))


def test_original_controlnet_without_the_control_model_prefix(tmp_path):
    path = write_tiny_controlnet(tmp_path / "bare.safetensors", layout="original", prefix="")
    assert describe_control_file(path)["layout"] == "original"
    assert_same_weights(load_control_model(path), make_tiny_controlnet("sd1"))


@pytest.mark.parametrize("family,layout,light", [
    ("sd1", "original", False), ("sd1", "diffusers", False), ("sdxl", "original", False),
    ("sdxl", "diffusers", False), ("sd1", "original", True),
])
def test_t2i_adapter_layouts_are_recognised_and_load_the_written_weights(tmp_path, family, layout, light):
    suffix = ".pth" if layout == "original" else ".safetensors"  # TencentARC ships .pth
    path = write_tiny_t2i_adapter(tmp_path / f"adapter{suffix}", family, layout, seed=5, light=light)
    details = describe_control_file(path)
    assert (details["family"], details["control_type"], details["layout"]) == (family, "t2i_adapter", layout)
    kind = "light_adapter" if light else "full_adapter_xl" if family == "sdxl" else "full_adapter"
    assert details["adapter_type"] == kind
    module = load_control_model(path, details)
    assert isinstance(module, T2IAdapter)
    assert_same_weights(module, make_tiny_t2i_adapter(family, seed=5, light=light))


def test_weights_are_cast_to_the_run_dtype(tmp_path):
    path = write_tiny_controlnet(tmp_path / "half.safetensors", dtype=torch.float16)
    module = load_control_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


@torch.no_grad()
def test_a_tiny_control_changes_the_unet_output():
    unet = make_tiny("sd1")[0]
    control, adapter = make_tiny_controlnet("sd1"), make_tiny_t2i_adapter("sd1")
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 2, unet.config.cross_attention_dim)
    image, t = torch.rand(1, 3, 64, 64), torch.tensor([500])
    plain = unet(latents, t, encoder_hidden_states=context).sample
    down, mid = control(latents, t, encoder_hidden_states=context, controlnet_cond=image, return_dict=False)
    controlled = unet(latents, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample
    adapted = unet(latents, t, encoder_hidden_states=context,
                   down_intrablock_additional_residuals=adapter(image)).sample
    for changed in (controlled, adapted):
        assert torch.isfinite(changed).all()
        assert (changed - plain).abs().mean() > 1e-2 * plain.abs().mean()


def test_the_shuffle_controlnet_pools_its_conditions_by_name_or_by_its_yaml(tmp_path):
    by_name = write_tiny_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors")
    assert describe_control_file(by_name)["global_pool"] is True
    assert load_control_model(by_name).config.global_pool_conditions is True
    plain = write_tiny_controlnet(tmp_path / "control_v11p_sd15_canny.safetensors")
    assert load_control_model(plain).config.global_pool_conditions is False
    renamed = write_tiny_controlnet(tmp_path / "my_control.safetensors")
    (tmp_path / "my_control.yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n        global_average_pooling: True\n")
    assert load_control_model(renamed).config.global_pool_conditions is True


def test_an_sdxl_controlnet_needs_the_unets_time_id_width_when_the_file_cannot_tell(tmp_path):
    path = write_tiny_controlnet(tmp_path / "xl.safetensors", family="sdxl", layout="diffusers")
    with pytest.raises(CheckpointError, match="xl.safetensors: .*addition_time_embed_dim"):
        load_control_model(path)


# --- full-size configs, from shapes alone (meta tensors: nothing allocated) ---------------------

# diffusers' published configs (config.json of the named repositories)
SD15_CANNY = {  # lllyasviel/control_v11p_sd15_canny
    "in_channels": 4, "conditioning_channels": 3, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "transformer_layers_per_block": 1,
}
SDXL_CANNY = {  # diffusers/controlnet-canny-sdxl-1.0
    "in_channels": 4, "conditioning_channels": 3, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "layers_per_block": 2, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True, "transformer_layers_per_block": [1, 2, 10],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "conditioning_embedding_out_channels": [16, 32, 96, 256],
}
ADAPTERS = {  # TencentARC/t2iadapter_canny_sd15v2, t2i-adapter-canny-sdxl-1.0, t2iadapter_color_sd14v1
    "sd1": {"in_channels": 1, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, "downscale_factor": 8,
            "adapter_type": "full_adapter"},
    "sdxl": {"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, "downscale_factor": 16,
             "adapter_type": "full_adapter_xl"},
    "light": {"in_channels": 3, "channels": [320, 640, 1280], "num_res_blocks": 4, "downscale_factor": 8,
              "adapter_type": "light_adapter"},
}


def shapes_of(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


@pytest.mark.parametrize("published,family", [(SD15_CANNY, "sd1"), (SDXL_CANNY, "sdxl")])
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_full_size_controlnet_configs_come_out_as_diffusers_publishes_them(published, family, layout):
    with empty_modules():
        reference = ControlNetModel(**published)
    state = controlnet_original_state_dict(reference) if layout == "original" else reference.state_dict()
    spec = inspect_control(shapes_of(state))  # no time-id width given: SDXL's own
    assert (spec.family.name, spec.control_type, spec.layout) == (family, "controlnet", layout)
    with empty_modules():
        ours = ControlNetModel(**spec.config)
    assert shapes_of(ours.state_dict()) == shapes_of(reference.state_dict())
    if layout == "original":  # diffusers' converter takes every full-size weight to its place
        bare = {k.removeprefix(spec.prefix): v for k, v in state.items()}
        converted = convert_original_controlnet(bare, dict(ours.config), Path("full.safetensors"))
        assert shapes_of(converted) == shapes_of(reference.state_dict())
    levels = len(published["block_out_channels"])
    attends = ["Attn" in t for t in published["down_block_types"]]
    for key, value in published.items():
        mine = spec.config[key]
        if key == "attention_head_dim":  # heads: not in the shapes, the family's rule
            assert per_level(mine, levels) == per_level(value, levels)
        elif key == "transformer_layers_per_block":  # depth of a level without attention means nothing
            pairs = zip(per_level(mine, levels), per_level(value, levels), attends)
            assert all(m == v for m, v, a in pairs if a)
        else:
            assert mine == value, key


@pytest.mark.parametrize("name", ["sd1", "sdxl", "light"])
def test_full_size_t2i_adapter_configs_come_out_as_published(name):
    with empty_modules():
        reference = T2IAdapter(**ADAPTERS[name])
    spec = inspect_control(shapes_of(reference.state_dict()))
    assert spec.config == ADAPTERS[name]
    assert spec.family.name == ("sdxl" if name == "sdxl" else "sd1")


# --- files that are not control models -----------------------------------------------------------

class Payload:
    """Any class: a pickle that holds one is code, not weights."""


def lora_state() -> dict:
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize("kind,reason", [
    ("checkpoint", "Stable Diffusion checkpoint"), ("lora", "a LoRA"), ("control_lora", "Control-LoRA"),
    ("garbage", "not a safetensors or PyTorch"), ("pickle", "refused to load"), ("other", "no input_hint_block"),
])
def test_other_files_are_refused_naming_the_file_and_why(tmp_path, kind, reason):
    path = tmp_path / f"{kind}_file.safetensors"
    if kind == "checkpoint":
        write_tiny_checkpoint(path, family="sd1")
    elif kind == "lora":
        save_state(path, lora_state())
    elif kind == "control_lora":
        save_state(path, {"lora_controlnet": torch.zeros(0), **controlnet_original_state_dict(
            make_tiny_controlnet("sd1"), prefix="")})
    elif kind == "garbage":
        path.write_bytes(os.urandom(300))
    elif kind == "pickle":  # arbitrary Python objects: torch.load(weights_only=True) refuses them
        path = tmp_path / "pickle_file.pth"
        path.write_bytes(pickle.dumps({"weight": Payload()}, protocol=2))
    else:
        save_state(path, {"some.weight": torch.ones(3)})
    details = describe_control_file(path)
    assert details.keys() == {"error"}
    assert details["error"].startswith(path.name) and reason in details["error"]
    with pytest.raises(CheckpointError, match=path.name):
        load_control_model(path)


def test_a_missing_or_an_unknown_weight_is_an_error_naming_the_file(tmp_path):
    state = controlnet_original_state_dict(make_tiny_controlnet("sd1"))
    missing = dict(state)
    del missing["control_model.zero_convs.1.0.weight"]
    save_state(tmp_path / "missing.safetensors", missing)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: .*missing 1 weights"):
        load_control_model(tmp_path / "missing.safetensors")
    save_state(tmp_path / "extra.safetensors", {**state, "control_model.input_blocks.1.9.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: .*input_blocks\.1\.9\.weight"):
        load_control_model(tmp_path / "extra.safetensors")
    adapter = make_tiny_t2i_adapter("sd1").state_dict()
    save_state(tmp_path / "adapter.safetensors", {**adapter, "adapter.body.0.extra.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: .*unexpected.*adapter\.body\.0\.extra"):
        load_control_model(tmp_path / "adapter.safetensors")


# --- listing and cache ---------------------------------------------------------------------------

def test_the_listing_carries_each_files_details(tmp_path):
    folders = {kind: tmp_path / "models" / MODEL_KINDS[kind].folder for kind in MODEL_KINDS}
    folder = folders["controlnet"]
    folder.mkdir(parents=True)
    write_tiny_controlnet(folder / "control_sd1_canny.pth", family="sd1")
    write_tiny_t2i_adapter(folder / "adapter_xl.safetensors", family="sdxl", layout="diffusers")
    (folder / "broken.safetensors").write_bytes(b"not a model")
    registry = ModelRegistry(folders, HashCache(tmp_path / "data" / "hashes.json"))
    listed = {f.name: f for f in registry.list("controlnet")}
    assert listed["control_sd1_canny.pth"].family == "sd1"
    assert listed["control_sd1_canny.pth"].details["control_type"] == "controlnet"
    assert (listed["adapter_xl.safetensors"].family, listed["adapter_xl.safetensors"].details["control_type"]) \
        == ("sdxl", "t2i_adapter")
    assert listed["broken.safetensors"].details["error"].startswith("broken.safetensors")


def test_the_cache_keeps_a_control_model_until_its_file_changes(tmp_path):
    manager = ModelManager(choose_placement(EngineSettings(device="cpu", precision="full")), budget_bytes=1 << 40)
    path = write_tiny_controlnet(tmp_path / "control.safetensors", seed=1)
    first = manager.get_control(path)
    assert manager.get_control(path) is first
    assert manager.memory()["control_models"][0]["name"] == "control.safetensors"
    write_tiny_controlnet(path, seed=2)
    os.utime(path, (1, 1))  # a new mtime even on a coarse clock
    reloaded = manager.get_control(path)
    assert reloaded is not first
    assert_same_weights(reloaded, make_tiny_controlnet("sd1", seed=2))
    manager.unload_all()
    assert manager.cached_bytes() == 0


def test_control_models_share_the_budget_and_go_before_the_checkpoint(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "model.safetensors", family="sd1")
    a = write_tiny_controlnet(tmp_path / "a.safetensors", seed=1)
    b = write_tiny_controlnet(tmp_path / "b.safetensors", seed=2)
    placement = choose_placement(EngineSettings(device="cpu", precision="full"))
    sizing = ModelManager(placement, budget_bytes=1 << 40)
    sizing.get("model", checkpoint)
    sizing.get_control(a)
    manager = ModelManager(placement, budget_bytes=sizing.cached_bytes() + 1)  # a checkpoint and one control
    manager.get("model", checkpoint)
    manager.get_control(a)
    manager.get_control(b)  # no room for both controls: a goes, the checkpoint stays
    assert [c["name"] for c in manager.memory()["control_models"]] == ["b.safetensors"]
    assert manager.loaded_names() == ["model"]
    assert manager.cached_bytes() <= manager.budget_bytes


def test_a_file_that_cannot_load_leaves_the_cache_as_it_was(tmp_path):
    manager = ModelManager(choose_placement(EngineSettings(device="cpu", precision="full")), budget_bytes=1 << 40)
    good = manager.get_control(write_tiny_controlnet(tmp_path / "good.safetensors"))
    bad = tmp_path / "bad.safetensors"
    save_state(bad, lora_state())
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        manager.get_control(bad)
    assert manager.get_control(tmp_path / "good.safetensors") is good
