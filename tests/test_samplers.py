"""pipelines.core.samplers (A1111 sampler/schedule names) and pipelines.generate.schedulers (-> diffusers schedulers).

Fast CPU tests with a toy denoiser (no model files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.core import samplers as S
from pipelines.generate import schedulers

ROOT = Path(__file__).resolve().parents[1]

# diffusers 0.42.1 feeds torch tensors to numpy in set_timesteps (KDPM2, UniPC, ...),
# which emits ~200k numpy-2 DeprecationWarnings per run of this file; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}

COMBOS = [(s, t) for s in S.SAMPLER_NAMES for t in S.allowed_schedule_types(s)]
SHAPE = (4, 8, 8)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, slightly non-linear 'denoiser' (no weights)."""
    return 0.1 * x + 0.05 * torch.tanh(x)


def sample(sampler, schedule_type, seeds, steps=6, base=SD15, latents=None):
    """Full sampling loop; the generators draw the initial noise and then the step noise."""
    sch = schedulers.make_scheduler(sampler, schedule_type, base)
    sch.set_timesteps(steps)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if latents is None:
        latents = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens])
    x = latents * sch.init_noise_sigma
    for t in sch.timesteps:
        eps = toy_model(sch.scale_model_input(x, t), t)
        x = schedulers.step(sch, eps, t, x, gens)
    return x


def test_names():
    assert S.SAMPLER_NAMES == (
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2S a", "Euler a", "Euler", "LMS",
        "Heun", "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC", "LCM", "TCD",
    )
    assert S.SCHEDULE_TYPES == ("Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform")
    assert set(S.SAMPLERS) == set(S.SAMPLER_NAMES)
    for name in S.SAMPLER_NAMES:
        allowed = S.allowed_schedule_types(name)
        assert allowed[:2] == ("Automatic", "Uniform")  # the plain schedule works everywhere
        assert set(allowed) <= set(S.SCHEDULE_TYPES)


def test_import_does_not_pull_torch():
    code = (
        "import sys, pipelines.core.samplers as s; "
        "assert s.allowed_schedule_types('Euler a'); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'torchsde')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("sampler,schedule_type", COMBOS)
def test_every_combo_runs_and_batches_like_singles(sampler, schedule_type):
    batch = sample(sampler, schedule_type, [11, 12, 13])
    assert batch.shape == (3, *SHAPE)
    assert torch.isfinite(batch).all()
    singles = torch.cat([sample(sampler, schedule_type, [s]) for s in (11, 12, 13)])
    assert torch.allclose(batch, singles, atol=1e-6, rtol=0), (batch - singles).abs().max()


@pytest.mark.parametrize("sampler", S.SAMPLER_NAMES)
def test_same_seed_repeats_and_stochastic_flag_matches_behaviour(sampler):
    assert torch.equal(sample(sampler, "Automatic", [4, 5]), sample(sampler, "Automatic", [4, 5]))
    # Same initial latent, different generators: only stochastic samplers differ.
    latents = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(0))
    a = sample(sampler, "Automatic", [1], latents=latents)
    b = sample(sampler, "Automatic", [2], latents=latents)
    assert (not torch.equal(a, b)) == S.is_stochastic(sampler)


def test_v_prediction_passes_through():
    for sampler in S.SAMPLER_NAMES:
        sch = schedulers.make_scheduler(sampler, "Automatic", dict(SD15, prediction_type="v_prediction"))
        assert sch.config.prediction_type == "v_prediction", sampler
    x = sample("Euler a", "Automatic", [3], base=dict(SD15, prediction_type="v_prediction"))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("sampler", S.SAMPLER_NAMES)
def test_disallowed_schedule_types_raise(sampler):
    allowed = S.allowed_schedule_types(sampler)
    for bad in [t for t in S.SCHEDULE_TYPES if t not in allowed] + ["Polyexponential"]:
        with pytest.raises(ValueError, match="schedule_type") as exc:
            schedulers.make_scheduler(sampler, bad, SD15)
        for name in allowed:
            assert name in str(exc.value)


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="sampler"):
        schedulers.make_scheduler("Euler b", "Automatic", SD15)
    with pytest.raises(ValueError, match="sampler"):
        S.allowed_schedule_types("nope")


def test_automatic_defaults_follow_a1111():
    expected = {
        "DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
        "DPM++ 2S a": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
        "Euler": "Uniform", "Euler a": "Uniform", "LMS": "Uniform", "Heun": "Uniform",
        "DDIM": "Uniform", "PLMS": "Uniform", "UniPC": "Uniform", "LCM": "Uniform", "TCD": "Uniform",
    }
    for sampler, want in expected.items():
        assert S.resolve_schedule_type(sampler, "Automatic") == want
        cfg = schedulers.make_scheduler(sampler, "Automatic", SD15).config
        assert cfg.get("use_karras_sigmas", False) == (want == "Karras"), sampler
        assert cfg.get("use_exponential_sigmas", False) == (want == "Exponential"), sampler


def test_class_and_fixed_kwargs():
    sde = schedulers.make_scheduler("DPM++ 2M SDE", "Automatic", SD15)
    assert type(sde).__name__ == "DPMSolverMultistepScheduler"
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    assert schedulers.make_scheduler("DPM++ 2M", "Automatic", SD15).config.algorithm_type == "dpmsolver++"
    assert type(schedulers.make_scheduler("DPM++ SDE", "Automatic", SD15)).__name__ == "DPMSolverSDEScheduler"
    assert S.needs_torchsde("DPM++ SDE") and not S.needs_torchsde("DPM++ 2M SDE")
    assert schedulers.make_scheduler("PLMS", "Automatic", SD15).config.skip_prk_steps is True
    # each call is a fresh instance
    euler = schedulers.make_scheduler("Euler", "Automatic", SD15)
    assert euler is not schedulers.make_scheduler("Euler", "Automatic", SD15)


def test_unaccepted_base_keys_dropped_and_flags_not_leaked():
    base = dict(SD15, use_karras_sigmas=True, not_a_scheduler_key=1)
    euler = schedulers.make_scheduler("Euler", "Automatic", base)
    assert euler.config.use_karras_sigmas is False
    assert "clip_sample" not in euler.config and "not_a_scheduler_key" not in euler.config
    assert "skip_prk_steps" not in euler.config
    assert euler.config.beta_schedule == "scaled_linear"


def test_spacing():
    # k-diffusion samplers: A1111's plain schedule spans t = 999 .. 0 ("linspace").
    euler = schedulers.make_scheduler("Euler", "Automatic", SD15)
    assert euler.config.timestep_spacing == "linspace"
    euler.set_timesteps(6)
    assert euler.timesteps[0] == 999 and euler.timesteps[-1] == 0
    # SGM Uniform -> trailing
    sgm = schedulers.make_scheduler("Euler", "SGM Uniform", SD15)
    assert sgm.config.timestep_spacing == "trailing"
    sgm.set_timesteps(6)
    assert sgm.timesteps.tolist() == [999, 832, 666, 499, 332, 166]


def test_ddim_timesteps_match_a1111():
    a1111 = [t + 1 for t in range(0, 1000, 1000 // 20)][::-1]  # 951 .. 1
    for base in (SD15, dict(SD15, steps_offset=0, timestep_spacing="trailing")):
        ddim = schedulers.make_scheduler("DDIM", "Automatic", base)
        ddim.set_timesteps(20)
        assert ddim.timesteps.tolist() == a1111
    plms = schedulers.make_scheduler("PLMS", "Automatic", SD15)
    plms.set_timesteps(20)
    assert sorted(set(plms.timesteps.tolist()), reverse=True) == a1111


@pytest.mark.parametrize("sampler", [s for s in S.SAMPLER_NAMES if "Karras" in S.allowed_schedule_types(s)])
def test_karras_changes_the_schedule(sampler):
    def sigmas(schedule_type):
        sch = schedulers.make_scheduler(sampler, schedule_type, SD15)
        sch.set_timesteps(10)
        return sch.sigmas.clone(), sch.timesteps.clone()

    karras = sigmas("Karras")
    if S.resolve_schedule_type(sampler, "Automatic") == "Karras":
        assert all(torch.equal(a, b) for a, b in zip(karras, sigmas("Automatic")))
    else:
        auto = sigmas("Automatic")
        assert not (karras[0].shape == auto[0].shape and torch.allclose(karras[0], auto[0]))
    if "Exponential" in S.allowed_schedule_types(sampler):
        expo = sigmas("Exponential")
        assert not (expo[0].shape == karras[0].shape and torch.allclose(expo[0], karras[0]))


def test_generators_must_match_batch():
    sch = schedulers.make_scheduler("Euler a", "Automatic", SD15)
    sch.set_timesteps(4)
    x = torch.randn(2, *SHAPE)
    t = sch.timesteps[0]
    with pytest.raises(ValueError, match="generators"):
        schedulers.step(sch, x, t, sch.scale_model_input(x, t), [torch.Generator()])


def test_sde_scheduler_can_be_reused():
    """set_timesteps resets the Brownian trees; a second run with the same seeds repeats."""
    sch = schedulers.make_scheduler("DPM++ SDE", "Automatic", SD15)

    def run(seeds):
        sch.set_timesteps(4)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens]) * sch.init_noise_sigma
        for t in sch.timesteps:
            x = schedulers.step(sch, toy_model(sch.scale_model_input(x, t), t), t, x, gens)
        return x

    first = run([5, 6])
    run([7])
    assert torch.equal(run([5, 6]), first)


def test_parse_sampler_name():
    assert S.parse_sampler_name("DPM++ 2M") == ("DPM++ 2M", "Automatic")
    assert S.parse_sampler_name("DPM++ 2M", "Karras") == ("DPM++ 2M", "Karras")
    assert S.parse_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert S.parse_sampler_name("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert S.parse_sampler_name("euler a") == ("Euler a", "Automatic")
    assert S.parse_sampler_name("k_dpm_2_a_ka") == ("DPM2 a", "Karras")
    with pytest.raises(ValueError, match="sampler"):
        S.parse_sampler_name("Restart")
