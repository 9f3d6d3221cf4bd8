"""bench/speed.py --preset fast (issue 21's target case): its request is what 'Use recommended
settings' gives for an LCM LoRA, and it runs through the engine as the bench times it (at 64x64
here, with the bench's own LoRA and TAESD writers); no timing is asserted."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_engine
from tiny import write_tiny_sd1_checkpoint

from pipelines.core.infotext import parse_infotext
from pipelines.models.build import load_components

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import speed  # noqa: E402  (bench/speed.py: the preset's files and request)

# a TAESD decoder of TAESD's shape (4 levels, blocks 3, 3, 3, 1), 8 wide instead of 64
TINY_TAESD = {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
              "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (3, 3, 3, 1)}


@pytest.fixture(scope="module")
def fast_engine(tmp_path_factory):
    models = tmp_path_factory.mktemp("fast-models")
    checkpoint = write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", seed=0)
    unet = load_components(Path(checkpoint)).unet
    speed.write_lcm_lora(unet, models / "Lora" / speed.LCM_LORA_FILE, rank=4)
    speed.write_taesd(models / "VAE-approx" / speed.TAESD_FILE, TINY_TAESD)
    return make_engine(models, tmp_path_factory.mktemp("fast-engine"))


def test_the_fast_preset_asks_for_what_use_recommended_settings_gives_an_lcm_lora(fast_engine):
    request = speed.fast_request(fast_engine, "tiny.safetensors", Path(speed.LCM_LORA_FILE).stem, size=64)
    assert (request.sampler, request.steps, request.cfg_scale) == ("LCM", 4, 1.0)
    assert request.tiny_vae_decode and f"<lora:{Path(speed.LCM_LORA_FILE).stem}:1>" in request.prompt


def test_the_fast_preset_runs_with_its_lora_and_the_tiny_decoder(fast_engine):
    request = speed.fast_request(fast_engine, "tiny.safetensors", Path(speed.LCM_LORA_FILE).stem, size=64)
    result = fast_engine.generate(request)
    assert result.images[0].size == (64, 64) and not result.warnings
    info = parse_infotext(result.infotexts[0])
    assert info["Sampler"] == "LCM" and info["Steps"] == "4" and "Lora hashes" in info
    assert "TAESD" in result.infotexts[0]
    without_lora = fast_engine.generate(replace(request, prompt=speed.PROMPT))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(without_lora.images[0]))


def test_the_bench_lora_covers_every_layer_kind_lcm_lora_trains():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**speed.load.SD15_UNET)
    layers = {key.split(".")[0] for key in speed.lcm_lora_state(unet, rank=1)}
    for layer in speed.LCM_LORA_LAYERS:
        assert any(name.endswith("_" + layer.replace(".", "_")) for name in layers), layer


def test_compiled_artefacts_go_to_the_data_folder_unless_the_user_named_a_folder(tmp_path):
    from pipelines.models import device

    environ: dict[str, str] = {}
    folder = device.use_compile_cache(tmp_path / "data", environ)
    assert folder == tmp_path / "data" / device.COMPILE_CACHE and folder.is_dir()
    assert environ[device.COMPILE_CACHE_VARIABLE] == str(folder)
    mine = {device.COMPILE_CACHE_VARIABLE: str(tmp_path / "mine")}
    assert device.use_compile_cache(tmp_path / "data", mine) == tmp_path / "mine"
    assert mine[device.COMPILE_CACHE_VARIABLE] == str(tmp_path / "mine")
