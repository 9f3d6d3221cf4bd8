"""A1111 sampler and schedule-type names -> diffusers schedulers.

This module is imported by the UI, which must never import torch, so the table is
plain data (diffusers class names as strings) and torch/diffusers are imported
lazily inside the functions that build or step a scheduler.

Public API:
- ``SAMPLER_NAMES``, ``SCHEDULE_TYPES``: the names, in A1111's display order.
- ``SAMPLERS``: sampler name -> ``SamplerSpec`` (the table row).
- ``allowed_schedule_types(sampler)``, ``resolve_schedule_type(sampler, schedule_type)``.
- ``make_scheduler(sampler, schedule_type, base_config)``: a fresh diffusers scheduler.
- ``step(scheduler, model_output, timestep, sample, generators)``: one step with
  per-image RNG, so a batch gives the same images as the same seeds one by one.
- ``is_stochastic(sampler)``, ``needs_torchsde(sampler)``, ``parse_sampler_name(name)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

SAMPLER_NAMES: tuple[str, ...] = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2S a", "Euler a", "Euler", "LMS", "Heun",
    "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC", "LCM",
)
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform")

# The model's own (un-reshaped) sigma schedule. A1111 calls it "Uniform" (and its
# "Normal" is numerically the same thing for SD's discrete schedule). It is what
# "Automatic" means for Euler, Euler a, LMS, Heun, DDIM, PLMS, UniPC and LCM, and every
# sampler supports it, so it is offered for all (DPM++ 2M without Karras, for example).
UNIFORM = "Uniform"

# Schedule type -> scheduler config overrides. A schedule type is allowed for a
# sampler only if its row lists it (checked against what the diffusers class accepts
# and what runs, see tests/test_samplers.py).
_SCHEDULE_OVERRIDES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    UNIFORM: MappingProxyType({}),
    "Normal": MappingProxyType({}),
    "Karras": MappingProxyType({"use_karras_sigmas": True}),
    "Exponential": MappingProxyType({"use_exponential_sigmas": True}),
    # A1111's sgm_uniform takes n+1 evenly spaced timesteps from t_max down to t_min and
    # drops the last, i.e. 999, 999-999/n, ...: diffusers' "trailing" spacing (same to
    # within one training timestep).
    "SGM Uniform": MappingProxyType({"timestep_spacing": "trailing"}),
})

# Sigma-reshaping flags reset to False unless the schedule type asks for one, so a
# base_config that happens to carry e.g. use_karras_sigmas=True cannot leak through.
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

_KDIFF = ("Karras", "Exponential", "SGM Uniform")


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the table.

    cls: diffusers scheduler class name.
    kwargs: fixed constructor arguments for this sampler.
    spacing: ``timestep_spacing`` for the plain schedule, or None where the class has
        no such option (it then uses its own fixed spacing).
    schedules: schedule types (besides "Automatic") this sampler allows.
    automatic: what "Automatic" means for it (A1111 1.9+ per-sampler default).
    stochastic: adds fresh noise during sampling (ancestral / SDE), so the result
        depends on the generators given to ``step``.
    torchsde: needs the torchsde package.
    steps_offset: forced ``steps_offset`` (matters for "leading" spacing only).
    """

    cls: str
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    spacing: str | None = "linspace"
    schedules: tuple[str, ...] = _KDIFF
    automatic: str = UNIFORM
    stochastic: bool = False
    torchsde: bool = False
    steps_offset: int | None = None


def _row(cls: str, kwargs: Mapping[str, Any] | None = None, **rest: Any) -> SamplerSpec:
    return SamplerSpec(cls=cls, kwargs=MappingProxyType(dict(kwargs or {})), **rest)


# Spacing for k-diffusion-style samplers (Euler, Euler a, Heun, LMS, DPM2, DPM2 a,
# DPM++ *): A1111 runs these through k-diffusion, whose plain schedule is
# ``get_sigmas(n)`` = the model's sigmas at t = linspace(999, 0, n), then 0. That is
# diffusers' "linspace" spacing (not SD's "leading" training-config default, which never
# reaches t=999, and not "trailing", which A1111 only uses for SGM Uniform). "linspace"
# also matters for Karras/Exponential: diffusers takes sigma_min/sigma_max for them
# from the spaced sigmas, and only "linspace" spans the full [t=0, t=999] range that
# k-diffusion uses.
#
# DDIM and PLMS are A1111 "timesteps" samplers: timesteps range(0, 1000, 1000 // n) + 1,
# which is diffusers' "leading" spacing with steps_offset=1. UniPC: A1111's default
# skip type "time_uniform" spreads n+1 points from t=999 to t=0, i.e. diffusers'
# "linspace" for UniPCMultistepScheduler. LCM picks its own timesteps from its
# distillation grid (original_inference_steps), and DPMSolverSinglestepScheduler has no
# timestep_spacing option (its own spacing is linspace-like), so neither gets SGM Uniform.
SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({
    "DPM++ 2M": _row(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        automatic="Karras",
    ),
    "DPM++ SDE": _row(
        "DPMSolverSDEScheduler", automatic="Karras", stochastic=True, torchsde=True,
    ),
    "DPM++ 2M SDE": _row(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        automatic="Exponential", stochastic=True,
    ),
    # Closest diffusers match for k-diffusion's sample_dpmpp_2s_ancestral: second-order
    # singlestep DPM-Solver++ with its stochastic (SDE) update, so it stays an
    # ancestral-style sampler ("a"). diffusers spends one model call per step, A1111 two.
    "DPM++ 2S a": _row(
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
         # diffusers forces this on anyway (with a warning) when the last sigma is 0
         "lower_order_final": True},
        spacing=None, schedules=("Karras", "Exponential"), automatic="Karras", stochastic=True,
    ),
    # EulerAncestralDiscreteScheduler has no use_karras/use_exponential_sigmas.
    "Euler a": _row(
        "EulerAncestralDiscreteScheduler", schedules=("SGM Uniform",), stochastic=True,
    ),
    "Euler": _row("EulerDiscreteScheduler"),
    "LMS": _row("LMSDiscreteScheduler"),
    "Heun": _row("HeunDiscreteScheduler"),
    # A1111 also drops the next-to-last sigma for DPM2/DPM2 a
    # (discard_next_to_last_sigma); diffusers' KDPM2 schedulers do not.
    "DPM2": _row("KDPM2DiscreteScheduler", automatic="Karras"),
    "DPM2 a": _row("KDPM2AncestralDiscreteScheduler", automatic="Karras", stochastic=True),
    # eta = 0 (A1111's default eta_ddim), so DDIM is deterministic.
    "DDIM": _row(
        "DDIMScheduler", spacing="leading", steps_offset=1, schedules=("SGM Uniform",),
    ),
    # A1111's PLMS has no Runge-Kutta (PRK) warm-up.
    "PLMS": _row(
        "PNDMScheduler", {"skip_prk_steps": True}, spacing="leading", steps_offset=1,
        schedules=("SGM Uniform",),
    ),
    # A1111's UniPC defaults: variant bh1, order 3, lower order final, and it stops at
    # t=0 (sigma_min) rather than sigma=0. final_sigmas_type="sigma_min" is also needed
    # for bh1 in diffusers 0.42.1: with the default "zero" its last step divides by
    # B_h = -inf and returns NaN. A1111 applies no schedule type to UniPC, and with
    # sigma_min as the last sigma diffusers' Karras/Exponential schedules repeat it
    # (a wasted step), so only the plain schedule and SGM Uniform are offered.
    "UniPC": _row(
        "UniPCMultistepScheduler",
        {"solver_order": 3, "solver_type": "bh1", "lower_order_final": True,
         "final_sigmas_type": "sigma_min"},
        schedules=("SGM Uniform",),
    ),
    # LCM re-noises between steps (like A1111's LCM sampler).
    "LCM": _row("LCMScheduler", spacing=None, schedules=(), stochastic=True),
})

assert tuple(SAMPLERS) == SAMPLER_NAMES

# Older A1111 names (before 1.9 folded the schedule into the sampler name) and the
# k-diffusion style aliases A1111's API accepts, -> (sampler, schedule type or None).
_ALIASES: Mapping[str, tuple[str, str | None]] = MappingProxyType({
    "k_dpmpp_2m": ("DPM++ 2M", None),
    "k_dpmpp_sde": ("DPM++ SDE", None),
    "k_dpmpp_2m_sde": ("DPM++ 2M SDE", None),
    "k_dpmpp_2s_a": ("DPM++ 2S a", None),
    "k_euler_a": ("Euler a", None),
    "k_euler_ancestral": ("Euler a", None),
    "k_euler": ("Euler", None),
    "k_lms": ("LMS", None),
    "k_heun": ("Heun", None),
    "k_dpm_2": ("DPM2", None),
    "k_dpm_2_a": ("DPM2 a", None),
    "ddim": ("DDIM", None),
    "plms": ("PLMS", None),
    "unipc": ("UniPC", None),
    "lcm": ("LCM", None),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "Karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "Karras"),
    "k_dpmpp_2m_sde_exp": ("DPM++ 2M SDE", "Exponential"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "Karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "Karras"),
    "k_lms_ka": ("LMS", "Karras"),
    "k_dpm_2_ka": ("DPM2", "Karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "Karras"),
})


def _spec(sampler: str) -> SamplerSpec:
    try:
        return SAMPLERS[sampler]
    except KeyError:
        raise ValueError(
            f"sampler: unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}"
        ) from None


def allowed_schedule_types(sampler: str) -> tuple[str, ...]:
    """Schedule types offered for ``sampler``, in SCHEDULE_TYPES order ("Automatic" first)."""
    spec = _spec(sampler)
    return tuple(s for s in SCHEDULE_TYPES if s in ("Automatic", UNIFORM) or s in spec.schedules)


def resolve_schedule_type(sampler: str, schedule_type: str) -> str:
    """The schedule actually used: "Automatic" becomes the sampler's default
    ("Karras", "Exponential" or "Uniform" for the plain schedule)."""
    allowed = allowed_schedule_types(sampler)
    if schedule_type not in allowed:
        raise ValueError(
            f"schedule_type: {schedule_type!r} is not available for sampler {sampler!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    return _spec(sampler).automatic if schedule_type == "Automatic" else schedule_type


def is_stochastic(sampler: str) -> bool:
    """True if the sampler injects fresh noise while sampling (needs per-image generators)."""
    return _spec(sampler).stochastic


def needs_torchsde(sampler: str) -> bool:
    return _spec(sampler).torchsde


def parse_sampler_name(name: str, schedule_type: str | None = None) -> tuple[str, str]:
    """Map a sampler name as found in A1111 infotexts / API requests to
    ``(sampler, schedule_type)``. Accepts current names, pre-1.9 names with the
    schedule folded in ("DPM++ 2M Karras", "DPM++ 2M SDE Exponential"), and the
    k-diffusion aliases ("k_euler_a"). A schedule type the sampler does not offer
    falls back to "Automatic" (pasted text should not fail on it); an unknown sampler
    raises ValueError."""
    text = " ".join(str(name).split())
    by_lower = {s.lower(): s for s in SAMPLER_NAMES}
    sampler, folded = by_lower.get(text.lower()), None
    if sampler is None and text.lower() in _ALIASES:
        sampler, folded = _ALIASES[text.lower()]
    if sampler is None:
        for suffix in ("Karras", "Exponential"):
            if text.lower().endswith(" " + suffix.lower()):
                base = by_lower.get(text[: -len(suffix) - 1].lower())
                if base is not None:
                    sampler, folded = base, suffix
                    break
    if sampler is None:
        raise ValueError(
            f"sampler: unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}"
        )
    chosen = folded or schedule_type or "Automatic"
    if chosen not in allowed_schedule_types(sampler):
        chosen = "Automatic"
    return sampler, chosen


def _init_params(cls: type) -> frozenset[str]:
    params = inspect.signature(cls.__init__).parameters
    return frozenset(
        n for n, p in params.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def scheduler_config(sampler: str, schedule_type: str, base_config: Mapping[str, Any]) -> dict:
    """The constructor kwargs ``make_scheduler`` uses (imports diffusers to read the
    class signature). Raises ValueError naming ``schedule_type`` if not allowed."""
    spec = _spec(sampler)
    resolved = resolve_schedule_type(sampler, schedule_type)
    cls = _scheduler_class(spec.cls)
    accepted = _init_params(cls)

    config: dict[str, Any] = {
        k: v for k, v in dict(base_config).items() if not k.startswith("_") and k in accepted
    }
    config.update(spec.kwargs)
    for flag in _SIGMA_FLAGS:
        if flag in accepted:
            config[flag] = False
    if spec.spacing is not None:
        config["timestep_spacing"] = spec.spacing
    if spec.steps_offset is not None:
        config["steps_offset"] = spec.steps_offset
    config.update(_SCHEDULE_OVERRIDES[resolved])
    unknown = sorted(set(config) - accepted)
    if unknown:  # a table bug, not a user error
        raise TypeError(f"{spec.cls} does not accept {unknown}")
    return config


def _scheduler_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def make_scheduler(sampler: str, schedule_type: str, base_config: Mapping[str, Any]):
    """A fresh diffusers scheduler for ``sampler`` / ``schedule_type``.

    ``base_config`` is the model's training noise schedule (a diffusers scheduler
    config); keys the chosen class does not take are dropped, and the sampler's own
    settings (spacing, algorithm, sigma schedule) override it.
    """
    config = scheduler_config(sampler, schedule_type, base_config)
    return _scheduler_class(_spec(sampler).cls)(**config)


_STEP_TAKES_GENERATOR: dict[type, bool] = {}


def _step_takes_generator(cls: type) -> bool:
    if cls not in _STEP_TAKES_GENERATOR:
        _STEP_TAKES_GENERATOR[cls] = "generator" in inspect.signature(cls.step).parameters
    return _STEP_TAKES_GENERATOR[cls]


def _quiet_torchsde() -> None:
    # diffusers queries its Brownian tree at sigma_fn(t_fn(sigma)), which can fall a
    # rounding error outside the tree's [sigma_min, sigma_max]; torchsde then warns
    # "Should have ta>=t0 ..." on every image. Harmless, so silence just that message
    # (idempotent: filterwarnings replaces an identical filter).
    import warnings

    warnings.filterwarnings("ignore", message=r"Should have (ta>=t0|tb<=t1)", category=UserWarning)


def step(scheduler, model_output, timestep, sample, generators: Sequence | None):
    """One denoising step; returns the new sample (``prev_sample``).

    ``generators[i]`` is the (CPU) ``torch.Generator`` of batch element i. Noise for
    element i comes only from generators[i], so a batch of N seeded s, s+1, ... gives
    the same per-element results as N batch-1 runs seeded s+i.

    - Most schedulers take ``generator=`` as a list and draw each element's noise
      with shape (1, ...) from its own generator (diffusers' randn_tensor).
    - DPMSolverSDEScheduler draws from a torchsde Brownian tree seeded by an integer;
      it gets one tree per element, seeded with that element's generator seed
      (``initial_seed()``, i.e. the image seed, as A1111 seeds its trees), which
      leaves the generator's state untouched.
    """
    if generators is not None:
        generators = list(generators)
        if len(generators) != sample.shape[0]:
            raise ValueError(
                f"generators: got {len(generators)} for a batch of {sample.shape[0]}"
            )
    cls = type(scheduler)
    kwargs: dict[str, Any] = {}
    if cls.__name__ == "DPMSolverSDEScheduler":
        if getattr(scheduler, "noise_sampler", None) is None:  # first step after set_timesteps
            _quiet_torchsde()
            # A list (even of one) selects diffusers' per-element Brownian trees, so a
            # batch-1 run builds exactly the tree element i gets in a batch.
            scheduler.noise_sampler_seed = (
                None if generators is None else [int(g.initial_seed()) for g in generators]
            )
    elif generators is not None and _step_takes_generator(cls):
        kwargs["generator"] = generators
    out = scheduler.step(model_output, timestep, sample, return_dict=False, **kwargs)
    return out[0]
