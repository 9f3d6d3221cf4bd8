"""Token merging (A1111's "Token merging ratio", ToMe for SD): the bipartite merge itself, its wiring
around the full-resolution self-attention, a job through the engine, the infotext, the page's and the
API's fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from test_webui import FakeEngine

from pipelines.core import infotext
from pipelines.core.request import GenerationRequest, RequestError
from pipelines.generate import token_merging
from webui import convert
from webui.api import ApiOptions
from webui.api.bodies import Txt2ImgRequest
from webui.api.errors import ApiError
from webui.api.translate import prepare_generation


def test_a_merge_keeps_one_minus_ratio_of_the_tokens_and_unmerges_to_every_place():
    tokens = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    grid = token_merging.destinations(8, 8, torch.Generator().manual_seed(1))
    assert grid.view(4, 2, 4, 2).sum(dim=(1, 3)).eq(1).all()  # one destination per 2x2 cell
    merge = token_merging.bipartite_merge(tokens, grid, 0.5)
    merged = merge.merge(tokens)
    assert merged.shape == (2, 32, 8)
    back = merge.unmerge(merged)
    assert back.shape == tokens.shape
    # destinations that took nobody, and kept sources, come back exactly; a merged source takes its
    # destination's value, which is the mean of the destination and the sources merged into it
    exact = (back == tokens).all(dim=-1)
    assert exact.sum(dim=1).ge(64 - 2 * 32).all() and not exact.all()
    for image in range(2):
        for place in (~exact[image]).nonzero().squeeze(1):
            group = (back[image] == back[image, place]).all(dim=-1)
            assert torch.allclose(back[image, place], tokens[image][group].mean(dim=0), atol=1e-6)
    most = token_merging.bipartite_merge(tokens, grid, 0.9)  # past 0.75: every source, as at 0.75
    assert most.merge(tokens).shape == (2, 16, 8)
    nothing = token_merging.bipartite_merge(tokens, grid, 0.0)
    assert torch.equal(nothing.unmerge(nothing.merge(tokens)), tokens)


class OneBlock(torch.nn.Module):
    """A U-Net stand-in: one transformer block over the sample's pixels as tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=16).eval()

    def forward(self, sample, context):
        batch, channels, height, width = sample.shape
        tokens = sample.flatten(2).transpose(1, 2)
        return self.block(tokens, encoder_hidden_states=context).transpose(1, 2).reshape(batch, channels, height, width)


@torch.no_grad()
def test_around_self_attention_identical_tokens_give_the_same_output_and_the_hooks_go_afterwards():
    unet, context = OneBlock(), torch.randn(1, 3, 16)
    flat = torch.randn(1, 16, 1, 1).expand(1, 16, 8, 8).contiguous()  # every token the same
    varied = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    plain_flat, plain_varied = unet(flat, context), unet(varied, context)
    with token_merging.applied(unet, 0.5, seed=1) as on:
        assert on
        assert torch.allclose(unet(flat, context), plain_flat, atol=1e-5)
        merged = unet(varied, context)
    assert merged.shape == plain_varied.shape and not torch.allclose(merged, plain_varied, atol=1e-3)
    with token_merging.applied(unet, 0.5, seed=1):
        unet(flat, context)
        assert torch.equal(unet(varied, context), merged)  # the same seed and calls: the same merges
    assert torch.equal(unet(varied, context), plain_varied)
    with token_merging.applied(unet, 0.0) as on:
        assert not on


def generate(engine, ratio: float, **fields):
    request = GenerationRequest(prompt="a red circle", steps=3, width=64, height=64, seed=5, sampler="Euler",
                                save_images=False, checkpoint="tiny.safetensors", token_merging_ratio=ratio, **fields)
    return engine.generate(request)


def test_a_job_with_token_merging_differs_a_little_says_so_and_leaves_the_model_as_it_was(engine):
    plain = generate(engine, 0.0)
    merged = generate(engine, 0.5)
    again = generate(engine, 0.5)
    a, b = (np.asarray(r.images[0], dtype=np.float64) for r in (plain, merged))
    assert not np.array_equal(a, b) and np.abs(a - b).mean() < 40
    assert np.array_equal(b, np.asarray(again.images[0], dtype=np.float64))
    assert "Token merging ratio: 0.5" in merged.infotexts[0] and "Token merging" not in plain.infotexts[0]
    assert np.array_equal(np.asarray(generate(engine, 0.0).images[0], dtype=np.float64), a)


def test_the_infotext_key_reads_back_and_a_parameters_line_without_it_means_off():
    fields = infotext.request_fields_from_infotext("a cat\nSteps: 20, Seed: 1, Token merging ratio: 0.3")
    assert fields["token_merging_ratio"] == 0.3
    assert infotext.request_fields_from_infotext("a cat\nSteps: 20, Seed: 1, Size: 64x64")["token_merging_ratio"] == 0.0
    with pytest.raises(RequestError, match="token_merging_ratio"):
        GenerationRequest(prompt="x", token_merging_ratio=0.95)  # past A1111's range


def test_sd3_and_flux_are_told_it_is_not_applied():
    request = GenerationRequest(prompt="x", token_merging_ratio=0.5, deepcache_interval=3)
    assert token_merging.unused_notes(request, flow=True) and not token_merging.unused_notes(request, flow=False)
    from pipelines.generate import deep_cache

    assert deep_cache.unused_notes(request, flow=True) and not deep_cache.unused_notes(request, flow=False)


def test_the_pages_speed_fields_reach_the_request():
    request = convert.generation_request("txt2img", {
        "prompt": "x", "token_merging_ratio": 0.5, "deepcache_interval": 3, "deepcache_branch": 1,
        "deepcache_start": 0.1, "skip_early_cond": 0.2, "s_min_uncond": 1.5, "s_min_uncond_all": True})
    assert (request.token_merging_ratio, request.deepcache_interval, request.deepcache_branch,
            request.deepcache_start, request.skip_early_cond, request.s_min_uncond,
            request.s_min_uncond_all) == (0.5, 3, 1, 0.1, 0.2, 1.5, True)


def test_the_api_takes_a1111s_settings_and_our_deepcache_fields():
    body = Txt2ImgRequest(prompt="x", deepcache_interval=4, override_settings={
        "token_merging_ratio": 0.4, "skip_early_cond": 0.25, "s_min_uncond_all": True})
    prepared = prepare_generation(FakeEngine(), body, ApiOptions())
    request = prepared.request
    assert (request.token_merging_ratio, request.skip_early_cond, request.s_min_uncond_all,
            request.deepcache_interval) == (0.4, 0.25, True, 4)
    assert not any("override_settings" in w for w in prepared.warnings)


@pytest.mark.parametrize("overrides, field", [
    ({"token_merging_ratio": 0.95}, "override_settings.token_merging_ratio"),
    ({"token_merging_ratio": "half"}, "override_settings.token_merging_ratio"),
    ({"s_min_uncond_all": "yes"}, "override_settings.s_min_uncond_all"),
])
def test_a_bad_speed_setting_is_a_422_naming_it(overrides, field):
    with pytest.raises(ApiError) as info:
        prepare_generation(FakeEngine(), Txt2ImgRequest(prompt="x", override_settings=overrides), ApiOptions())
    assert info.value.status == 422 and info.value.field == field
