"""CFG cutoff: which steps skip the unconditional pass (A1111's NGMS and Skip Early CFG)."""

from __future__ import annotations

import pytest

from pipelines.core.checks import RequestError
from pipelines.core.request import GenerationRequest
from pipelines.generate import schedulers
from pipelines.generate.guidance import NO_CUTOFF, CfgCutoff, use_uncond
from pipelines.models.families import SD_SCHEDULE


def sigmas_of(sampler: str, steps: int) -> list[float]:
    scheduler = schedulers.make_scheduler(sampler, "Automatic", SD_SCHEDULE)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas[:steps]]


def skipped(cutoff: CfgCutoff, sigmas: list[float]) -> list[int]:
    return [i for i, sigma in enumerate(sigmas) if not use_uncond(i, len(sigmas), sigma, cutoff)]


def test_off_by_default_every_step_keeps_the_negative_prompt():
    assert skipped(NO_CUTOFF, sigmas_of("Euler", 20)) == []
    assert not NO_CUTOFF.active


def test_ngms_skips_every_other_step_once_sigma_falls_below_it():
    sigmas = sigmas_of("Euler", 20)
    low = [i for i, s in enumerate(sigmas) if s < 1.0]
    assert low and low[-1] == 19 and low[0] > 0  # the last part of the steps
    assert skipped(CfgCutoff(s_min_uncond=1.0), sigmas) == [i for i in low if i % 2 == 1]
    assert skipped(CfgCutoff(s_min_uncond=1.0, s_min_uncond_all=True), sigmas) == low
    # a larger sigma reaches further back: more steps are saved
    assert len(skipped(CfgCutoff(s_min_uncond=5.0, s_min_uncond_all=True), sigmas)) > len(low)


def test_skip_early_cfg_drops_the_first_share_of_the_steps():
    sigmas = sigmas_of("Euler", 10)
    assert skipped(CfgCutoff(skip_early_cond=0.2), sigmas) == [0, 1, 2]  # step / steps <= 0.2
    assert skipped(CfgCutoff(skip_early_cond=1.0), sigmas) == list(range(10))


def test_a_step_without_a_sigma_never_skips_by_sigma():
    assert use_uncond(5, 10, None, CfgCutoff(s_min_uncond=15.0, s_min_uncond_all=True))


@pytest.mark.parametrize("fields,field", [
    ({"s_min_uncond": -1}, "s_min_uncond"),
    ({"s_min_uncond": 16}, "s_min_uncond"),
    ({"s_min_uncond": "1"}, "s_min_uncond"),
    ({"skip_early_cond": 1.5}, "skip_early_cond"),
    ({"s_min_uncond_all": "yes"}, "s_min_uncond_all"),
])
def test_bad_values_name_the_field(fields, field):
    with pytest.raises(RequestError) as caught:
        GenerationRequest(**fields)
    assert caught.value.field == field


def test_the_settings_are_written_and_read_back():
    from pipelines.core import infotext

    request = GenerationRequest(cfg_scale=7, s_min_uncond=0.5, s_min_uncond_all=True, skip_early_cond=0.1)
    assert infotext.cfg_cutoff_params(request) == {"NGMS": 0.5, "NGMS all steps": "True", "Skip Early CFG": 0.1}
    assert infotext.cfg_cutoff_params(request.replace(cfg_scale=1)) == {}  # nothing is skipped without CFG
    text = infotext.build_infotext("a cat", "", {"Steps": 20, **infotext.cfg_cutoff_params(request)})
    fields = infotext.request_fields_from_infotext(text)
    assert (fields["s_min_uncond"], fields["s_min_uncond_all"], fields["skip_early_cond"]) == (0.5, True, 0.1)
    plain = infotext.request_fields_from_infotext(infotext.build_infotext("a cat", "", {"Steps": 20, "Sampler": "Euler",
                                                                                  "CFG scale": 7}))
    assert (plain["s_min_uncond"], plain["s_min_uncond_all"], plain["skip_early_cond"]) == (0.0, False, 0.0)


def test_ngms_on_every_step_is_the_image_without_cfg(engine):
    """Skipping the unconditional pass on every step leaves the prompt's prediction alone: CFG 1."""
    import numpy as np

    base = dict(prompt="a red circle", negative_prompt="blurry", seed=9, steps=4, sampler="Euler", width=64,
                height=64, save_images=False)
    no_cfg = engine.generate(GenerationRequest(**base, cfg_scale=1.0)).images[0]
    skipped = engine.generate(GenerationRequest(**base, cfg_scale=7.0, s_min_uncond=15.0,
                                                s_min_uncond_all=True)).images[0]
    plain = engine.generate(GenerationRequest(**base, cfg_scale=7.0)).images[0]
    assert np.array_equal(np.asarray(no_cfg), np.asarray(skipped))
    assert not np.array_equal(np.asarray(plain), np.asarray(skipped))
