"""LoRA: kohya-layout files for the tiny SD 1.x checkpoint, applied per request and removed."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_engine
from lora_files import assert_same_state, kohya_targets, lora_file, model_state
from safetensors.torch import save_file
from tiny import write_tiny_sd1_checkpoint

from pipelines.core.infotext import parse_infotext
from pipelines.core.request import GenerationRequest
from pipelines.generate import lora
from pipelines.models.build import load_components


def kohya_lora(components, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA in kohya's layout for every attention projection of the U-Net and the text encoder."""
    return lora_file([(k, m) for k, m in kohya_targets(components) if "attn" in k], seed=seed)


TAGS = json.dumps({"10_red": {"red circle": 5, "shiny": 2}, "5_blue": {"red circle": 1, "blue": 3}})


@pytest.fixture(scope="module")
def lora_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-models")
    ckpt = write_tiny_sd1_checkpoint(root / "Stable-diffusion" / "tiny.safetensors", seed=0)
    components = load_components(Path(ckpt))
    (root / "Lora" / "styles").mkdir(parents=True)
    save_file(kohya_lora(components), str(root / "Lora" / "red.safetensors"),
              metadata={"ss_tag_frequency": TAGS, "ss_output_name": "red"})
    save_file(kohya_lora(components, seed=1), str(root / "Lora" / "styles" / "blue.safetensors"))
    return make_engine(root, tmp_path_factory.mktemp("lora-engine"))


def generate(engine, prompt: str, **fields):
    base = dict(negative_prompt="", steps=3, width=64, height=64, seed=11, sampler="Euler",
                save_images=False, checkpoint="tiny.safetensors")
    return engine.generate(GenerationRequest(prompt=prompt, **{**base, **fields}))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0])


def cached_state(engine):
    file = engine.resolve_checkpoint("tiny.safetensors")
    return model_state(engine.manager.get(file.name, file.path).components)


def test_lora_applies_and_is_removed_cleanly(lora_engine):
    before = generate(lora_engine, "a red circle")
    state = cached_state(lora_engine)
    with_lora = generate(lora_engine, "a red circle <lora:red:1>")
    assert not np.array_equal(pixels(before), pixels(with_lora))
    assert with_lora.warnings == []
    after = generate(lora_engine, "a red circle")
    assert np.array_equal(pixels(before), pixels(after))  # nothing left in the cached model
    assert_same_state(state, cached_state(lora_engine))


def test_lora_infotext_hashes_and_weights(lora_engine):
    result = generate(lora_engine, "a red circle <lora:red:0.8>, <lora:blue:0.5:1>")
    info = parse_infotext(result.infotexts[0])
    path = Path(lora_engine.paths.folder("lora")) / "red.safetensors"
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    red_hash = hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    assert info["Lora hashes"].startswith(f"red: {red_hash}, blue: ")
    assert 'Lora hashes: "red: ' in result.infotexts[0]
    assert result.infotexts[0].splitlines()[0] == "a red circle <lora:red:0.8>, <lora:blue:0.5:1>"
    # the tags stay in the prompt, so pasting the infotext restores them
    # weights: te and unet separately; 0 everywhere is the plain model
    plain = generate(lora_engine, "a red circle")
    zero = generate(lora_engine, "a red circle <lora:red:0:0>")
    assert np.array_equal(pixels(plain), pixels(zero))
    te_only = generate(lora_engine, "a red circle <lora:red:1:0>")
    unet_only = generate(lora_engine, "a red circle <lora:red:0:1>")
    for r in (te_only, unet_only):
        assert not np.array_equal(pixels(plain), pixels(r))
    assert not np.array_equal(pixels(te_only), pixels(unet_only))


def test_lora_hashes_names_drop_separators_as_a1111_does(lora_engine):
    path = Path(lora_engine.paths.folder("lora")) / "red.safetensors"
    uses = [lora.LoraUse("red", path, 1, 1), lora.LoraUse("a, b:c", path, 1, 1)]
    short = lora.short_hash(path)
    assert lora.infotext_params(uses) == {"Lora hashes": f"red: {short}, a bc: {short}"}
    assert lora.infotext_params([]) == {}


def test_unknown_lora_warns_and_generates(lora_engine):
    plain = generate(lora_engine, "a red circle ")
    result = generate(lora_engine, "a red circle <lora:nope:1>")
    assert len(result.images) == 1
    assert any("nope" in w for w in result.warnings)
    assert np.array_equal(pixels(plain), pixels(result))
    assert "Lora hashes" not in result.infotexts[0]


def test_trigger_words_and_metadata(lora_engine):
    path = Path(lora_engine.paths.folder("lora")) / "red.safetensors"
    meta = lora.read_metadata(path)
    assert meta["ss_output_name"] == "red"
    assert lora.trigger_words(meta) == ["red circle", "blue", "shiny"]
    assert lora.trigger_words({}) == []
    assert lora.trigger_words({"ss_tag_frequency": "not json"}) == []
