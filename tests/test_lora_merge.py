"""A job's LoRA set is merged into the weights and kept for the next job with the same set:
the image is diffusers' (its pipeline with `load_lora_weights`, unmerged peft layers) on the
same files, a repeated set is not loaded again, and any other set, an edited file or a job
without LoRA gets what it asks for."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_engine
from lora_files import kohya_targets, loha_file, lora_file
from safetensors.torch import save_file
from test_few_step import TCD_GAMMA, diffusers_pipeline, psnr
from tiny import write_tiny_sd1_checkpoint

from pipelines.core.request import GenerationRequest
from pipelines.generate import lora, lora_merge
from pipelines.models.build import load_components

PROMPT = "a red circle"


def lora_state(components, seed: int) -> dict[str, torch.Tensor]:
    """kohya LoRA on the U-Net's attention layers and resnet convs and on the text encoder."""
    return lora_file(kohya_targets(components, convs=True), seed=seed, scale=0.3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-models")
    ckpt = write_tiny_sd1_checkpoint(root / "Stable-diffusion" / "tiny.safetensors", seed=4)
    components = load_components(Path(ckpt))
    (root / "Lora").mkdir()
    save_file(lora_state(components, seed=1), str(root / "Lora" / "style.safetensors"))
    save_file(lora_state(components, seed=2), str(root / "Lora" / "other.safetensors"))
    stray = [("lora_unet_no_such_layer", torch.nn.Linear(8, 8))]  # a LoHa layer matching nothing: a warning
    extra = {**lora_state(components, seed=3), **loha_file(stray)}
    save_file(extra, str(root / "Lora" / "partial.safetensors"))
    return make_engine(root, tmp_path_factory.mktemp("merge-engine")), Path(ckpt), root / "Lora"


def generate(engine, tags: str = "", **fields):
    request = GenerationRequest(prompt=PROMPT + tags, steps=4, cfg_scale=1.0, sampler="TCD", seed=21, width=64,
                                height=64, save_images=False, checkpoint="tiny.safetensors", **fields)
    return engine.generate(request)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.float64)


def components_of(engine):
    return engine.manager.loaded("tiny.safetensors").components


@pytest.fixture
def reads(monkeypatch):
    """The LoRA files read from disk (a reused merged set reads none)."""
    seen: list[str] = []
    original = lora.read_state_dict

    def counting(path):
        seen.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(lora, "read_state_dict", counting)
    return seen


def test_a_merged_lora_gives_diffusers_image_with_the_lora(setup):
    engine, ckpt, folder = setup
    ours = pixels(generate(engine, " <lora:style:0.8>"))
    fresh = load_components(ckpt)  # diffusers' peft layers go on modules of its own
    pipe = diffusers_pipeline(fresh.unet, fresh.vae, fresh.text_encoders[0], "TCD", tokenizer=fresh.tokenizers[0])
    pipe.load_lora_weights(str(folder), weight_name="style.safetensors", adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    theirs = pipe(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, eta=TCD_GAMMA,
                  generator=torch.Generator().manual_seed(21), output_type="np").images[0]
    assert psnr(ours, theirs * 255.0, 255.0) >= 40.0
    assert lora_merge.merged_bytes(components_of(engine)) > 0  # merged, not peft layers
    assert not lora._has_any_tuner(components_of(engine).unet)


def test_the_same_set_is_reused_and_any_other_set_gets_its_own_image(setup, reads):
    engine = setup[0]
    plain = pixels(generate(engine))
    first = pixels(generate(engine, " <lora:style:0.8>"))
    assert reads == ["style.safetensors"]
    again = pixels(generate(engine, " <lora:style:0.8>"))
    assert reads == ["style.safetensors"] and np.array_equal(first, again)  # kept merged: not read again
    other = generate(engine, " <lora:style:0.8> <lora:other:0.5>")
    assert reads[1:] == ["style.safetensors", "other.safetensors"] and not np.array_equal(pixels(other), first)
    weaker = pixels(generate(engine, " <lora:style:0.4>"))
    assert not np.array_equal(weaker, first)
    assert np.array_equal(pixels(generate(engine, " <lora:style:0.8>")), first)  # from the originals again
    assert np.array_equal(pixels(generate(engine)), plain)
    assert lora_merge.merged_bytes(components_of(engine)) == 0
    assert np.array_equal(pixels(generate(engine, " <lora:style:0>")), plain)  # at 0: the model as it is,
    assert lora_merge.merged_bytes(components_of(engine)) == 0  # and no layer copied for it


def test_a_reused_set_says_its_warnings_again(setup, reads):
    engine = setup[0]
    first = generate(engine, " <lora:partial:1>")
    second = generate(engine, " <lora:partial:1>")
    assert reads == ["partial.safetensors"]
    assert first.warnings and second.warnings == first.warnings
    assert any("no_such_layer" in w for w in second.warnings)


def test_an_edited_lora_file_is_read_again(setup, reads, tmp_path):
    engine, _, folder = setup
    path = folder / "edited.safetensors"
    save_file(lora_state(components_of(engine), seed=5), str(path))
    first = pixels(generate(engine, " <lora:edited:1>"))
    save_file(lora_state(components_of(engine), seed=6), str(path))  # same size, new tensors
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = pixels(generate(engine, " <lora:edited:1>"))
    assert reads == ["edited.safetensors", "edited.safetensors"] and not np.array_equal(first, second)
