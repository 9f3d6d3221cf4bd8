"""Prompt language on a tiny CLIP text encoder: emphasis, BREAK, editing, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import write_tiny_checkpoint

from pipelines.core.request import GenerationRequest
from pipelines.generate import prompts
from pipelines.generate.prompts import CHUNK, encode_chunks, encode_prompts, weighted_chunks
from pipelines.models.build import load_components


@pytest.fixture(scope="module")
def components(engine):
    file = engine.resolve_checkpoint("tiny.safetensors")
    return engine.manager.get(file.name, file.path).components


def plain(components, text: str, clip_skip: int = 1) -> torch.Tensor:
    """The plain path: tokens in chunks of 75, no syntax."""
    encoder, tokenizer = components.text_encoders[0], components.tokenizers[0]
    return encode_chunks(encoder, tokenizer, prompts.tokenize_chunks(tokenizer, text), clip_skip, "cpu")


def test_weights_of_one_equal_the_plain_encoding(components):
    for text in ["a red circle on a blue background", "a cat " * 60]:
        cond = encode_prompts(components, text, "", 1, "cpu").cond
        assert torch.equal(cond, plain(components, text))
    # (x:1.0) and escapes read as their text
    cond = encode_prompts(components, "(a red:1.0) circle", "", 1, "cpu").cond
    assert torch.equal(cond, plain(components, "a red circle"))
    cond = encode_prompts(components, r"a \(red\) circle", "", 1, "cpu").cond
    assert torch.equal(cond, plain(components, "a (red) circle"))


def test_emphasis_scales_its_tokens_and_restores_the_chunk_mean(components):
    base = encode_prompts(components, "a red circle", "", 1, "cpu").cond
    weighted = encode_prompts(components, "a (red:1.5) circle", "", 1, "cpu").cond
    assert base.shape == weighted.shape == (1, 77, 64)
    # the mean of the chunk is that before weighting
    torch.testing.assert_close(weighted.mean(), base.mean())
    # before the mean restore: only position 2 (BOS, "a", "red") changes, by x1.5
    unscaled = weighted * (1 / (base.mean() / (base * _weights(2, 1.5)).mean()))
    torch.testing.assert_close(unscaled, base * _weights(2, 1.5))
    diff = (unscaled - base).abs().sum(-1)[0]
    assert diff[2] > 0.1 and diff[:2].max() < 1e-5 and diff[3:].max() < 1e-5
    assert not torch.equal(weighted, base)


def _weights(position: int, weight: float) -> torch.Tensor:
    w = torch.ones(1, 77, 1)
    w[0, position] = weight
    return w


def test_chunks_follow_a1111(components):
    tokenizer = components.tokenizers[0]
    chunks, _ = weighted_chunks(tokenizer, "a (b:1.2) [c] ((d))")
    assert len(chunks) == 1
    assert chunks[0].weights == pytest.approx([1.0, 1.2, 1 / 1.1, 1.21])
    # BREAK starts a new chunk
    chunks, _ = weighted_chunks(tokenizer, "a cat BREAK a dog")
    assert [len(c.tokens) for c in chunks] == [2, 2]
    cond = encode_prompts(components, "a cat BREAK a dog", "", 1, "cpu").cond
    assert cond.shape == (1, 154, 64)
    torch.testing.assert_close(cond[:, 77:], plain(components, "a dog"))
    # a full chunk moves the words after its last comma into the next one
    chunks, _ = weighted_chunks(tokenizer, "cat " * 70 + ", dog " * 3)
    assert len(chunks[0].tokens) == 75 and len(chunks) == 2
    chunks, _ = weighted_chunks(tokenizer, "cat " * 72 + ", dog dog dog dog dog")
    assert [len(c.tokens) for c in chunks] == [73, 5]
    # exactly 75 tokens: one chunk
    assert len(weighted_chunks(tokenizer, "cat " * CHUNK)[0]) == 1


def test_negative_is_padded_to_the_positive_chunks(components):
    c = encode_prompts(components, "a cat " * 50, "blurry", 1, "cpu")
    assert c.cond.shape == c.uncond.shape == (1, 154, 64)
    torch.testing.assert_close(c.uncond[:, :77], plain(components, "blurry"))
    torch.testing.assert_close(c.uncond[:, 77:], plain(components, ""))
    c = encode_prompts(components, "a cat", "ugly " * 80, 1, "cpu")
    assert c.cond.shape == c.uncond.shape == (1, 154, 64)


def test_lora_tags_are_not_encoded(components):
    a = encode_prompts(components, "a cat <lora:foo:0.5>", "", 1, "cpu").cond
    torch.testing.assert_close(a, plain(components, "a cat "))


def test_prompt_editing_encodes_each_text_once_and_switches_at_the_step(components, monkeypatch):
    seen = []
    real = prompts.encode_text

    def spy(components_, text, *args, **kwargs):
        seen.append(text)
        return real(components_, text, *args, **kwargs)

    monkeypatch.setattr(prompts, "encode_text", spy)
    c = encode_prompts(components, "a [red:blue:0.5] circle", "", 1, "cpu", steps=10)
    texts = [c.texts_at(i)[0] for i in range(10)]
    assert texts == ["a red circle"] * 6 + ["a blue circle"] * 4  # A1111: calls 0..5 use "from"
    conds = [c.at(i) for i in range(10)]
    assert sorted(seen) == ["", "a blue circle", "a red circle"]  # each text encoded exactly once
    assert conds[0] is conds[5] and conds[6] is conds[9] and conds[5] is not conds[6]
    torch.testing.assert_close(conds[9].cond, plain(components, "a blue circle"))
    # alternation
    c = encode_prompts(components, "[cat|dog]", "", 1, "cpu", steps=4)
    assert [c.texts_at(i)[0] for i in range(4)] == ["cat", "cat", "dog", "cat"]


def test_runner_uses_the_text_of_each_step(engine):
    """[a:b:when] in generation: a run that switches at step k equals neither fixed text."""
    base = dict(negative_prompt="", steps=4, width=64, height=64, seed=3, sampler="Euler",
                save_images=False, checkpoint="tiny.safetensors")
    edited = engine.generate(GenerationRequest(prompt="[red circle:blue square:2]", **base)).images[0]
    red = engine.generate(GenerationRequest(prompt="red circle", **base)).images[0]
    blue = engine.generate(GenerationRequest(prompt="blue square", **base)).images[0]
    assert not np.array_equal(np.asarray(edited), np.asarray(red))
    assert not np.array_equal(np.asarray(edited), np.asarray(blue))
    same = engine.generate(GenerationRequest(prompt="[red circle:red circle:2]", **base)).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(red))


def test_sdxl_and_sd2_emphasis_and_break(tmp_path):
    for family, dim in (("sdxl", 128), ("sd2", 64)):
        path = write_tiny_checkpoint(tmp_path / f"{family}.safetensors", family=family)
        comp = load_components(path)
        c = encode_prompts(comp, "a cat BREAK (a dog:1.3)", "ugly", 1, "cpu")
        assert c.cond.shape == c.uncond.shape == (1, 154, dim)
        plain_c = encode_prompts(comp, "a cat BREAK a dog", "ugly", 1, "cpu")
        torch.testing.assert_close(c.cond[:, :77], plain_c.cond[:, :77])
        assert not torch.equal(c.cond[:, 77:], plain_c.cond[:, 77:])
        if family == "sdxl":
            # pooled output from the first chunk
            first = encode_prompts(comp, "a cat", "ugly", 1, "cpu")
            torch.testing.assert_close(c.pooled_cond, first.pooled_cond)
