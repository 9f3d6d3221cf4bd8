"""A1111's attention weights on the flow families' encoders (SD 3's CLIPs and T5, Flux's T5):
the positions of a weighted word are scaled by its weight relative to the rest, the sequence keeps
its unweighted mean, and a prompt without weights is encoded exactly as diffusers encodes it."""

from __future__ import annotations

import pytest
import torch

from pipelines.generate.flow_emphasis import read_weights, weighted_ids
from pipelines.generate.flux_prompts import encode_flux_prompts
from pipelines.generate.sd3_prompts import encode_sd3_prompts
from pipelines.models.flux_build import load_flux_components
from pipelines.models.sd3_build import load_sd3_components

try:
    from tiny_flux import make_tiny_flux, write_tiny_flux
    from tiny_sd3 import make_tiny_sd3, write_tiny_sd3
except ImportError:
    from tests.tiny_flux import make_tiny_flux, write_tiny_flux
    from tests.tiny_sd3 import make_tiny_sd3, write_tiny_sd3

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return load_flux_components(write_tiny_flux(tmp_path_factory.mktemp("flux"), make_tiny_flux(seed=3)).all_in_one)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return load_sd3_components(write_tiny_sd3(tmp_path_factory.mktemp("sd3"), make_tiny_sd3(seed=2)).all_in_one)


def test_reading_weights_keeps_plain_prompts_byte_for_byte():
    plain = read_weights("a  photo, of a cat")
    assert (plain.text, plain.weighted, plain.broke) == ("a  photo, of a cat", False, False)
    weighted = read_weights("a (red:1.5) cat BREAK [dog]")
    assert weighted.weighted and weighted.broke and weighted.text == "a red cat dog"
    assert ("red", 1.5) in weighted.segments


def test_weighted_ids_are_the_plain_tokenization_with_a_weight_per_position(flux):
    tokenizer = flux.tokenizers[1]  # T5: no BOS, EOS then padding
    ids, weights = weighted_ids(tokenizer, read_weights("a (red:1.5) cat").segments, 16, begin=False)
    plain = tokenizer(["a red cat"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert ids == plain and len(weights) == 16
    red = tokenizer("red", add_special_tokens=False).input_ids
    assert weights.count(1.5) == len(red) and ids[weights.index(1.5)] == red[0]
    long_ids, _ = weighted_ids(tokenizer, read_weights("(cat:1.2) " * 40).segments, 16, begin=False)
    assert len(long_ids) == 16 and long_ids[-1] == tokenizer.eos_token_id  # truncated like the plain path


def ratio_of_red(sequence_weighted, sequence_plain, tokenizer, text="a red cat"):
    ids = tokenizer([text], add_special_tokens=False).input_ids[0]
    red = tokenizer("red", add_special_tokens=False).input_ids
    at = ids.index(red[0])
    scale = sequence_weighted[0] / sequence_plain[0]  # per position: weight x the common mean factor
    others = [i for i in range(len(ids)) if ids[i] not in red]
    return float(scale[at].mean() / scale[others].mean())


def test_flux_t5_positions_of_a_weighted_word_scale_by_its_weight_and_the_mean_is_kept(flux):
    plain = encode_flux_prompts(flux, "a red cat", "", CPU, real_cfg=False)
    weighted = encode_flux_prompts(flux, "a (red:1.5) cat", "", CPU, real_cfg=False)
    assert ratio_of_red(weighted.cond, plain.cond, flux.tokenizers[1]) == pytest.approx(1.5, rel=1e-4)
    assert float(weighted.cond.mean()) == pytest.approx(float(plain.cond.mean()), rel=1e-4, abs=1e-6)
    assert torch.equal(weighted.pooled_cond, plain.pooled_cond)  # CLIP-L's pooled output is not weighted
    assert not weighted.weights_ignored


def test_sd3_weights_reach_the_clips_and_t5_and_plain_prompts_are_unchanged(sd3):
    plain = encode_sd3_prompts(sd3, "a red cat", "", CPU)
    again = encode_sd3_prompts(sd3, "a (red:1.0) cat", "", CPU)
    assert torch.equal(plain.cond, again.cond)
    weighted = encode_sd3_prompts(sd3, "a (red:0.5) cat", "", CPU)
    clip_l = sd3.tokenizers[0]
    ids = clip_l(["a red cat"]).input_ids[0]  # BOS first: the CLIP rows are shifted by one
    red = clip_l("red", add_special_tokens=False).input_ids[0]
    scale = weighted.cond[0, : len(ids)] / plain.cond[0, : len(ids)]
    width = sd3.text_encoders[0].config.hidden_size  # CLIP-L's part of the row
    at, other = ids.index(red), ids.index(red) + 1
    assert float(scale[at, :width].mean() / scale[other, :width].mean()) == pytest.approx(0.5, rel=1e-4)
    assert torch.equal(weighted.pooled_cond, plain.pooled_cond)
    assert not torch.equal(weighted.cond[0, 77:], plain.cond[0, 77:])  # T5's sequence is weighted too
    assert encode_sd3_prompts(sd3, "a red BREAK cat", "", CPU).weights_ignored
