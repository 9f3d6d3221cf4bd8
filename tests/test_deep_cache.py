"""DeepCache: the deep U-Net features reused across steps (pipelines/generate/deep_cache.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from tiny import make_tiny_sd1
from torch.utils.flop_counter import FlopCounterMode

from pipelines.core.request import GenerationRequest
from pipelines.generate import deep_cache
from pipelines.generate.deep_cache import DeepCacheSettings


@pytest.fixture(scope="module")
def unet():
    model, _, _ = make_tiny_sd1(seed=3)
    return model


def unet_inputs(seed: int, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    context = torch.randn(batch, 77, 64, generator=generator)
    return latents, context


@torch.no_grad()
def sample(unet, settings: DeepCacheSettings, steps: int = 6, seed: int = 0) -> tuple[torch.Tensor, object]:
    """A small Euler loop the way the runner drives the U-Net: cache.step(i) before each call."""
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps)
    latents, context = unet_inputs(seed)
    latents = latents * scheduler.init_noise_sigma
    with deep_cache.applied(unet, settings) as cache:
        for i, t in enumerate(scheduler.timesteps):
            if cache is not None:
                cache.step(i, len(scheduler.timesteps))
            prediction = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=context).sample
            latents = scheduler.step(prediction, t, latents).prev_sample
    return latents, cache


def test_interval_one_is_the_uncached_image_and_patches_nothing(unet):
    plain, cache = sample(unet, DeepCacheSettings(interval=1))
    assert cache is None
    reference, _ = sample(unet, deep_cache.OFF)
    assert torch.equal(plain, reference)


def test_settings_of_a_request():
    from types import SimpleNamespace

    fields = SimpleNamespace(deepcache_interval=3, deepcache_branch=1, deepcache_start=0.5)
    assert DeepCacheSettings.of(fields) == DeepCacheSettings(3, 1, 0.5)
    assert not DeepCacheSettings.of(SimpleNamespace()).active  # a request without the fields: off


def test_the_first_share_of_the_steps_runs_in_full_then_every_interval():
    def full_steps(settings: DeepCacheSettings, steps: int) -> list[int]:
        return [i for i in range(steps) if settings.full_step(i, steps)]

    assert full_steps(DeepCacheSettings(interval=4, start=0), 10) == [0, 4, 8]
    assert full_steps(DeepCacheSettings(interval=4, start=0.2), 20) == [0, 1, 2, 3, 4, 8, 12, 16]
    assert full_steps(DeepCacheSettings(interval=3, start=1), 6) == list(range(6))
    assert full_steps(deep_cache.OFF, 5) == list(range(5))


def test_cached_steps_change_the_image_a_little_and_count_as_such(unet):
    plain, _ = sample(unet, deep_cache.OFF)
    cached, cache = sample(unet, DeepCacheSettings(interval=3, start=0))
    assert (cache.full_steps, cache.cached_steps) == (2, 4)  # steps 0 and 3 run in full
    assert not torch.equal(cached, plain)
    relative = (cached - plain).norm() / plain.norm()
    assert relative < 0.5, f"cached image is {relative:.2f} away from the uncached one"


def test_a_cached_step_on_the_same_input_gives_the_full_prediction(unet):
    """The replayed deep features are exactly the ones the full step computed: on the same input
    the shallow part finishes them into the same prediction, for every branch."""
    latents, context = unet_inputs(1)
    with torch.no_grad():
        full = unet(latents, 500, encoder_hidden_states=context).sample
        for branch in range(deep_cache.max_branch(unet) + 1):
            with deep_cache.applied(unet, DeepCacheSettings(interval=2, branch=branch, start=0)) as cache:
                cache.step(0, 10)
                first = unet(latents, 500, encoder_hidden_states=context).sample
                cache.step(1, 10)
                replayed = unet(latents, 500, encoder_hidden_states=context).sample
                assert cache.cached_steps == 1
            torch.testing.assert_close(first, full, rtol=0, atol=0)
            torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)


def test_a_cached_step_costs_a_fraction_of_a_full_one(unet):
    latents, context = unet_inputs(2)

    def flops(settings: DeepCacheSettings, step: int) -> int:
        with torch.no_grad(), deep_cache.applied(unet, settings) as cache:
            cache.step(0, 10)
            unet(latents, 500, encoder_hidden_states=context)
            cache.step(step, 10)
            with FlopCounterMode(display=False) as counter:
                unet(latents, 400, encoder_hidden_states=context)
        return counter.get_total_flops()

    full = flops(DeepCacheSettings(interval=3, start=0), 3)
    shallowest = flops(DeepCacheSettings(interval=3, branch=0, start=0), 1)
    deepest = flops(DeepCacheSettings(interval=3, branch=deep_cache.max_branch(unet), start=0), 1)
    assert shallowest < 0.5 * full
    assert shallowest < deepest < full  # a deeper branch keeps more of the U-Net live


def test_the_model_is_unchanged_after_the_job_and_after_an_error(unet):
    latents, context = unet_inputs(4)
    with torch.no_grad():
        before = unet(latents, 300, encoder_hidden_states=context).sample
        sample(unet, DeepCacheSettings(interval=2))
        with pytest.raises(RuntimeError, match="interrupted"), \
                deep_cache.applied(unet, DeepCacheSettings(interval=4)) as cache:
            cache.step(0, 10)
            unet(latents, 300, encoder_hidden_states=context)
            raise RuntimeError("interrupted")
        after = unet(latents, 300, encoder_hidden_states=context).sample
    assert torch.equal(before, after)
    assert not any("forward" in module.__dict__ for module in unet.modules())
    assert not unet._forward_pre_hooks


def test_a_step_with_another_batch_runs_in_full(unet):
    """CFG cutoff drops the unconditional half on some steps: cached features of another batch
    size cannot serve, so that step runs the whole U-Net (and is exact)."""
    latents, context = unet_inputs(5, batch=2)
    half_latents, half_context = latents[1:], context[1:]  # the runner keeps one context while the text holds
    with torch.no_grad(), deep_cache.applied(unet, DeepCacheSettings(interval=5, start=0)) as cache:
        cache.step(0, 10)
        unet(latents, 500, encoder_hidden_states=context)
        cache.step(1, 10)
        half = unet(half_latents, 480, encoder_hidden_states=half_context).sample
        assert (cache.full_steps, cache.cached_steps) == (2, 0)
        cache.step(2, 10)
        unet(half_latents, 460, encoder_hidden_states=half_context)
        assert cache.cached_steps == 1
    plain = unet(half_latents, 480, encoder_hidden_states=half_context).sample
    torch.testing.assert_close(half, plain, rtol=0, atol=0)


def test_new_text_conditioning_runs_in_full(unet):
    """Prompt editing ([a:b:0.5]) switches the text mid-run: the step with the new text runs the whole
    U-Net instead of finishing the old text's deep features."""
    latents, context = unet_inputs(7)
    _, other = unet_inputs(8)
    with torch.no_grad(), deep_cache.applied(unet, DeepCacheSettings(interval=4, start=0)) as cache:
        cache.step(0, 10)
        unet(latents, 500, encoder_hidden_states=context)
        cache.step(1, 10)
        switched = unet(latents, 480, encoder_hidden_states=other).sample
        cache.step(2, 10)
        unet(latents, 460, encoder_hidden_states=other)
        assert (cache.full_steps, cache.cached_steps) == (2, 1)
    torch.testing.assert_close(switched, unet(latents, 480, encoder_hidden_states=other).sample, rtol=0, atol=0)


def test_control_residuals_still_reach_the_live_layers(unet):
    """ControlNet adds residuals to every skip connection: on a cached step the live layers still
    get theirs, so a changed residual on conv_in's skip changes the cached prediction."""
    latents, context = unet_inputs(6)
    with torch.no_grad():
        down = [torch.zeros_like(r) for r in skip_shapes(unet, latents, context)]
        mid = torch.zeros(2, 64, 4, 4)
        with deep_cache.applied(unet, DeepCacheSettings(interval=2, start=0)) as cache:
            cache.step(0, 10)
            unet(latents, 500, encoder_hidden_states=context, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
            cache.step(1, 10)
            nudged = [torch.randn_like(down[0])] + down[1:]  # random: GroupNorm removes a constant
            out = unet(latents, 500, encoder_hidden_states=context, down_block_additional_residuals=nudged,
                       mid_block_additional_residual=mid).sample
        plain = unet(latents, 500, encoder_hidden_states=context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample
    assert (out - plain).abs().max() > 1e-3


def skip_shapes(unet, latents, context) -> list[torch.Tensor]:
    """The U-Net's skip-connection tensors (what ControlNet residuals must match), read by a hook."""
    found: list[torch.Tensor] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: found.append(o))]
    hooks += [block.register_forward_hook(lambda m, i, o: found.extend(o[1])) for block in unet.down_blocks]
    try:
        unet(latents, 500, encoder_hidden_states=context)
    finally:
        for hook in hooks:
            hook.remove()
    return found


@pytest.mark.parametrize("branch", [-1, 99])
def test_branch_is_capped_at_what_the_unet_has(unet, branch):
    deep = deep_cache.deep_modules(unet, branch)
    assert unet.mid_block in deep and unet.conv_in not in deep and unet.conv_out not in deep
    assert deep == deep_cache.deep_modules(unet, 0 if branch < 0 else deep_cache.max_branch(unet))


# --- through the engine, once the request carries the settings (the lead wires the runner) -------

WIRED = "deepcache_interval" in GenerationRequest.__dataclass_fields__
needs_wiring = pytest.mark.skipif(not WIRED, reason="GenerationRequest has no deepcache_interval field yet")


@needs_wiring
def test_a_job_with_deepcache_differs_and_leaves_the_model_as_it_was(engine):
    import numpy as np

    from pipelines.core import infotext

    base = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 3, "steps": 8, "sampler": "Euler",
            "width": 64, "height": 64, "cfg_scale": 7.0, "save_images": False}
    plain = engine.generate(GenerationRequest(**base))
    off = engine.generate(GenerationRequest(**base, deepcache_interval=1))
    cached = engine.generate(GenerationRequest(**base, deepcache_interval=3, deepcache_start=0))
    again = engine.generate(GenerationRequest(**base))
    pixels = [np.asarray(result.images[0]) for result in (plain, off, cached, again)]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[3])
    assert not np.array_equal(pixels[0], pixels[2])
    assert "DeepCache" not in plain.infotexts[0]
    fields = infotext.request_fields_from_infotext(cached.infotexts[0])
    assert (fields["deepcache_interval"], fields["deepcache_start"]) == (3, 0.0)


@needs_wiring
@pytest.mark.parametrize("fields,field", [
    ({"deepcache_interval": 0}, "deepcache_interval"),
    ({"deepcache_interval": 11}, "deepcache_interval"),
    ({"deepcache_interval": "3"}, "deepcache_interval"),
    ({"deepcache_branch": -1}, "deepcache_branch"),
    ({"deepcache_start": 1.5}, "deepcache_start"),
])
def test_bad_values_name_the_field(fields, field):
    from pipelines.core.checks import RequestError

    with pytest.raises(RequestError) as caught:
        GenerationRequest(**fields)
    assert caught.value.field == field
