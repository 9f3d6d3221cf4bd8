"""Textual inversion: A1111 file formats, vectors in place of the name, TI hashes, listing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_engine
from safetensors.torch import save_file
from tiny import write_tiny_checkpoint, write_tiny_sd1_checkpoint

from pipelines.core.infotext import parse_infotext
from pipelines.core.request import GenerationRequest
from pipelines.generate import embeddings, prompts
from pipelines.models.build import load_components

WIDTH = 64  # the tiny CLIP's width


@pytest.fixture(scope="module")
def ti_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti-models")
    write_tiny_sd1_checkpoint(root / "Stable-diffusion" / "tiny.safetensors", seed=0)
    folder = root / "embeddings"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save({"string_to_param": {"*": torch.randn(2, WIDTH, generator=g)}, "name": "other", "step": 100},
               folder / "shiny.pt")
    save_file({"emb_params": torch.randn(1, WIDTH, generator=g)}, str(folder / "glowy.safetensors"))
    save_file({"clip_l": torch.randn(1, WIDTH, generator=g), "clip_g": torch.randn(1, WIDTH, generator=g)},
              str(folder / "xlthing.safetensors"))
    (folder / "broken.pt").write_bytes(b"not a pickle")
    return make_engine(root, tmp_path_factory.mktemp("ti-engine"))


def components_of(engine):
    file = engine.resolve_checkpoint("tiny.safetensors")
    return engine.manager.get(file.name, file.path).components


def test_formats_are_read(ti_engine):
    folder = Path(ti_engine.paths.folder("embeddings"))
    assert embeddings.load(folder / "shiny.pt").tensors["default"].shape == (2, WIDTH)
    assert embeddings.load(folder / "glowy.safetensors").tensors["default"].shape == (1, WIDTH)
    assert set(embeddings.load(folder / "xlthing.safetensors").tensors) == {"clip_l", "clip_g"}
    with pytest.raises(embeddings.EmbeddingError):
        embeddings.load(folder / "broken.pt")


def test_vectors_replace_the_name_and_leave_the_model_alone(ti_engine):
    comp = components_of(ti_engine)
    files = ti_engine.registry.list("embeddings")
    found = embeddings.for_request(files, comp, ["a shiny circle", ""])
    assert [e.name for e in found] == ["shiny"]
    vectors = found[0].vectors(0)
    tokenizer = comp.tokenizers[0]
    chunks, used = prompts.weighted_chunks(tokenizer, "a shiny circle", found)
    assert used == found and len(chunks[0].tokens) == 1 + 2 + 1  # "a", 2 vectors, "circle"
    with_ti = prompts.encode_prompts(comp, "a shiny circle", "", 1, "cpu", embeddings=found).cond
    without = prompts.encode_prompts(comp, "a shiny circle", "", 1, "cpu").cond
    assert not torch.equal(with_ti, without)
    emb = prompts.token_embedding(comp.text_encoders[0])
    assert not emb._forward_hooks  # the hook is gone after encoding
    again = prompts.encode_prompts(comp, "a shiny circle", "", 1, "cpu").cond
    assert torch.equal(again, without)
    # the vectors sit at positions 2 and 3 (BOS, "a", vector, vector): only they differ before
    # the layers mix positions, so the encoder's input there is the file's vectors
    seen = []
    body = getattr(comp.text_encoders[0], "text_model", comp.text_encoders[0]).embeddings
    handle = body.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        prompts.encode_prompts(comp, "a shiny circle", "", 1, "cpu", embeddings=found).cond
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0][0, 2:4], vectors + body.position_embedding.weight[2:4])


def test_generation_uses_it_and_writes_ti_hashes(ti_engine):
    base = dict(negative_prompt="", steps=2, width=64, height=64, seed=5, sampler="Euler",
                save_images=False, checkpoint="tiny.safetensors")
    plain = ti_engine.generate(GenerationRequest(prompt="a circle", **base))
    result = ti_engine.generate(GenerationRequest(prompt="a glowy circle", **base))
    info = parse_infotext(result.infotexts[0])
    path = Path(ti_engine.paths.folder("embeddings")) / "glowy.safetensors"
    assert info["TI hashes"] == f"glowy: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert "TI hashes" not in plain.infotexts[0]
    again = ti_engine.generate(GenerationRequest(prompt="a circle", **base))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))
    # "glowyness" is not the embedding
    assert "TI hashes" not in ti_engine.generate(GenerationRequest(prompt="a gl circle", **base)).infotexts[0]


def test_listing(ti_engine):
    listing = ti_engine.embedding_listing()
    assert set(listing["loaded"]) == {"shiny", "glowy", "xlthing"}
    assert listing["loaded"]["shiny"]["vectors"] == 2 and listing["loaded"]["shiny"]["shape"] == WIDTH
    assert set(listing["skipped"]) == {"broken"}


def test_sdxl_embedding_uses_both_halves(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "xl.safetensors", family="sdxl")
    comp = load_components(path)
    g = torch.Generator().manual_seed(1)
    widths = [e.config.hidden_size for e in comp.text_encoders]
    save_file({"clip_l": torch.randn(1, widths[0], generator=g), "clip_g": torch.randn(1, widths[1], generator=g)},
              str(tmp_path / "xlthing.safetensors"))
    bound = embeddings.bind(embeddings.load(tmp_path / "xlthing.safetensors"), comp)
    assert bound is not None and bound.vectors(0) is not None and bound.vectors(1) is not None
    assert not torch.equal(bound.vectors(0), bound.vectors(1))
    c = prompts.encode_prompts(comp, "a xlthing", "", 1, "cpu", embeddings=[bound]).cond
    plain = prompts.encode_prompts(comp, "a xlthing", "", 1, "cpu").cond
    assert c.shape == plain.shape and not torch.equal(c, plain)
    # an SD 1.x-only embedding does not bind to SDXL
    save_file({"emb_params": torch.randn(1, widths[0])}, str(tmp_path / "sd1only.safetensors"))
    sd1only = embeddings.load(tmp_path / "sd1only.safetensors")
    assert embeddings.bind(sd1only, comp) is None
