"""A1111 sampler and schedule-type names, and what each means for a diffusers scheduler.

Plain data and pure functions: the UI imports this and must never import torch, so the
table names diffusers classes as strings. `pipelines.generate.schedulers` turns a row into
a scheduler and steps it.

Public API:
- ``SAMPLER_NAMES``, ``SCHEDULE_TYPES``: the names, in A1111's display order.
- ``SAMPLERS``: sampler name -> ``SamplerSpec`` (the table row); ``sampler_spec(sampler)``.
- ``allowed_schedule_types(sampler)``, ``resolve_schedule_type(sampler, schedule_type)``.
- ``scheduler_overrides(sampler, schedule_type)``: the scheduler settings they fix.
- ``is_stochastic(sampler)``, ``needs_torchsde(sampler)``.
- Names as texts and API clients write them: ``parse_sampler_name(name)``,
  ``split_sampler_name(name)``, ``schedule_type_named(text)``, ``sampler_aliases(sampler)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

SAMPLER_NAMES: tuple[str, ...] = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2S a", "Euler a", "Euler", "LMS", "Heun",
    "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC", "LCM", "TCD",
)
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform")

# The model's own (un-reshaped) sigma schedule. A1111 calls it "Uniform" (and its
# "Normal" is numerically the same thing for SD's discrete schedule). It is what
# "Automatic" means for Euler, Euler a, LMS, Heun, DDIM, PLMS, UniPC and LCM, and every
# sampler supports it, so it is offered for all (DPM++ 2M without Karras, for example).
# LCM and TCD take their timesteps from their distillation grid whatever the schedule.
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
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

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
    # TCD (Trajectory Consistency Distillation): A1111 1.10 has none; "TCD" (alias "tcd") is
    # what A1111's TCD sampler extensions and ComfyUI's "tcd" call it. Like LCM it picks its
    # timesteps from the distillation grid, and its gamma (diffusers' step ``eta``, 0.3 by
    # default, as TCD's authors recommend) re-noises a share of each step: stochastic.
    "TCD": _row("TCDScheduler", spacing=None, schedules=(), stochastic=True),
})

assert tuple(SAMPLERS) == SAMPLER_NAMES

# Older A1111 names (before 1.9 folded the schedule into the sampler name) and the
# k-diffusion style aliases A1111's API accepts, -> (sampler, schedule type or None).
SAMPLER_ALIASES: Mapping[str, tuple[str, str | None]] = MappingProxyType({
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
    "tcd": ("TCD", None),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "Karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "Karras"),
    "k_dpmpp_2m_sde_exp": ("DPM++ 2M SDE", "Exponential"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "Karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "Karras"),
    "k_lms_ka": ("LMS", "Karras"),
    "k_dpm_2_ka": ("DPM2", "Karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "Karras"),
})


# Schedule names older texts fold into the end of a sampler name ("DPM++ 2M Karras"), in
# lower case, A1111's internal names included -> schedule type.
_FOLDED_SCHEDULES: Mapping[str, str] = MappingProxyType({
    **{s.casefold(): s for s in SCHEDULE_TYPES if s != "Automatic"},
    "sgm_uniform": "SGM Uniform",
})


def sampler_spec(sampler: str) -> SamplerSpec:
    """The table row of ``sampler``; ValueError naming the field for an unknown one."""
    try:
        return SAMPLERS[sampler]
    except KeyError:
        raise ValueError(
            f"sampler: unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}"
        ) from None


def allowed_schedule_types(sampler: str) -> tuple[str, ...]:
    """Schedule types offered for ``sampler``, in SCHEDULE_TYPES order ("Automatic" first)."""
    spec = sampler_spec(sampler)
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
    return sampler_spec(sampler).automatic if schedule_type == "Automatic" else schedule_type


def is_stochastic(sampler: str) -> bool:
    """True if the sampler injects fresh noise while sampling (needs per-image generators)."""
    return sampler_spec(sampler).stochastic


def needs_torchsde(sampler: str) -> bool:
    return sampler_spec(sampler).torchsde


def sampler_aliases(sampler: str) -> list[str]:
    """The k-diffusion style names A1111 lists as aliases of ``sampler`` ("k_euler_a" for
    "Euler a"); those that also fix a schedule ("k_lms_ka") are not the sampler's own."""
    return [alias for alias, (name, schedule) in SAMPLER_ALIASES.items() if name == sampler and schedule is None]


def schedule_type_named(text: str) -> str | None:
    """The schedule type a text names, in any case and by A1111's internal names too
    ("karras", "sgm_uniform"); None for a name this app does not have."""
    folded = str(text).strip().casefold()
    return "Automatic" if folded == "automatic" else _FOLDED_SCHEDULES.get(folded)


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """"DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"): a schedule folded into the end of a sampler
    name (pre-1.9 A1111 names); a name without one -> (name, None). The name is not checked."""
    name = name.strip()
    folded = name.casefold()
    for alias in sorted(_FOLDED_SCHEDULES, key=len, reverse=True):
        if folded.endswith(" " + alias):
            return name[: -len(alias) - 1].strip(), _FOLDED_SCHEDULES[alias]
    return name, None


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
    if sampler is None and text.lower() in SAMPLER_ALIASES:
        sampler, folded = SAMPLER_ALIASES[text.lower()]
    if sampler is None:
        base, folded = split_sampler_name(text)
        sampler = by_lower.get(base.lower()) if folded is not None else None
    if sampler is None:
        raise ValueError(
            f"sampler: unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}"
        )
    chosen = folded or schedule_type or "Automatic"
    if chosen not in allowed_schedule_types(sampler):
        chosen = "Automatic"
    return sampler, chosen


def scheduler_overrides(sampler: str, schedule_type: str) -> dict[str, Any]:
    """The scheduler settings ``sampler`` and ``schedule_type`` fix over the model's own noise
    schedule: the row's arguments, its timestep spacing and offset, and the schedule type's
    sigma flags. Raises ValueError naming ``schedule_type`` if the sampler does not offer it.

    `generate.schedulers.scheduler_config` lays these over the model's config after turning
    off every sigma flag (``SIGMA_FLAGS``) the class knows, so none leaks from the model."""
    spec = sampler_spec(sampler)
    resolved = resolve_schedule_type(sampler, schedule_type)
    overrides: dict[str, Any] = dict(spec.kwargs)
    if spec.spacing is not None:
        overrides["timestep_spacing"] = spec.spacing
    if spec.steps_offset is not None:
        overrides["steps_offset"] = spec.steps_offset
    overrides.update(_SCHEDULE_OVERRIDES[resolved])
    return overrides
