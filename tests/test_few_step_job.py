""""Use recommended settings" for a job (few_step.recommend_for_job, the engine's
`recommended_settings(checkpoint, prompt)`): the files the job names, found in the real listing,
read by their names and safetensors metadata."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipelines.core.checks import RequestError
from pipelines.core.request import GenerationRequest
from pipelines.core.settings import MODEL_KINDS
from pipelines.models.few_step import recommend_for_job
from pipelines.models.registry import ModelRegistry
from pipelines.models.stores import HashCache


def tensors_file(path, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path), metadata=metadata)
    return path


@pytest.fixture
def registry(tmp_path):
    folders = {kind: tmp_path / "models" / MODEL_KINDS[kind].folder for kind in MODEL_KINDS}
    tensors_file(folders["lora"] / "Hyper-SD15-8steps-lora.safetensors")
    tensors_file(folders["lora"] / "renamed.safetensors",  # kohya's output name says what it is
                 {"ss_output_name": "lcm-lora-sdv1-5", "ss_network_module": "networks.lora"})
    tensors_file(folders["lora"] / "add_detail.safetensors")
    tensors_file(folders["checkpoints"] / "sdxl_lightning_4step.safetensors")
    tensors_file(folders["checkpoints"] / "dreamshaper_8.safetensors")
    return ModelRegistry(folders, HashCache(tmp_path / "data" / "hashes.json"))


def test_a_few_step_lora_in_the_prompt_wins_over_the_checkpoint(registry):
    found = recommend_for_job(registry, "sdxl_lightning_4step.safetensors",
                              "a cat <lora:add_detail:1> <lora:Hyper-SD15-8steps-lora:0.125>")
    assert (found["sampler"], found["schedule_type"], found["steps"], found["cfg_scale"]) == \
        ("DDIM", "SGM Uniform", 8, 1.0)
    assert found["source"] == "Hyper-SD15-8steps-lora.safetensors" and found["source_kind"] == "lora"
    assert found["why"].startswith("Hyper-SD 8-step LoRA:")
    # one click: the values make a valid request as they are
    fields = {name: found[name] for name in ("sampler", "schedule_type", "steps", "cfg_scale")}
    assert GenerationRequest(**fields).steps == 8


def test_a_renamed_lora_is_known_by_its_metadata(registry):
    found = recommend_for_job(registry, "dreamshaper_8.safetensors", "<lora:renamed:1>")
    assert found["sampler"] == "LCM" and found["source"] == "renamed.safetensors"


def test_the_checkpoint_when_the_prompt_names_no_few_step_lora(registry):
    found = recommend_for_job(registry, "sdxl_lightning_4step", "a cat <lora:add_detail:1> <lora:missing:1>")
    assert (found["sampler"], found["steps"], found["source_kind"]) == ("Euler", 4, "checkpoint")


def test_nothing_recognised_is_none_and_an_unknown_checkpoint_is_named(registry):
    assert recommend_for_job(registry, "dreamshaper_8.safetensors", "a cat <lora:add_detail:1>") is None
    assert recommend_for_job(registry, None, "") is None
    with pytest.raises(RequestError, match="checkpoint"):
        recommend_for_job(registry, "nowhere.safetensors", "a cat")
