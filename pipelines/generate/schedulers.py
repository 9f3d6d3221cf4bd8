"""Diffusers schedulers for the sampler table of `pipelines.core.samplers`, and one sampler step.

`core.samplers` says what a sampler and schedule type mean (plain data, torch-free, the UI
reads it); this module builds the diffusers scheduler that does it and steps it with per-image
random numbers:

- ``make_scheduler(sampler, schedule_type, base_config)``: a fresh diffusers scheduler.
- ``scheduler_config(...)``: the constructor arguments it uses.
- ``step(scheduler, model_output, timestep, sample, generators)``: one step with per-image
  RNG, so a batch gives the same images as the same seeds one by one.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Mapping, Sequence

import diffusers

from pipelines.core import samplers


def scheduler_class(sampler: str) -> type:
    """The diffusers scheduler class of ``sampler`` (ValueError for an unknown sampler)."""
    return getattr(diffusers, samplers.sampler_spec(sampler).cls)


def _init_params(cls: type) -> frozenset[str]:
    params = inspect.signature(cls.__init__).parameters
    return frozenset(
        n for n, p in params.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def scheduler_config(sampler: str, schedule_type: str, base_config: Mapping[str, Any]) -> dict:
    """The constructor kwargs ``make_scheduler`` uses: the model's config (keys the class
    does not take dropped, sigma flags off), then the sampler's and schedule type's settings.
    Raises ValueError naming ``schedule_type`` if not allowed."""
    overrides = samplers.scheduler_overrides(sampler, schedule_type)  # validates before any lookup
    accepted = _init_params(scheduler_class(sampler))
    config: dict[str, Any] = {
        k: v for k, v in dict(base_config).items() if not k.startswith("_") and k in accepted
    }
    config.update({flag: False for flag in samplers.SIGMA_FLAGS if flag in accepted})
    config.update(overrides)
    unknown = sorted(set(config) - accepted)
    if unknown:  # a table bug, not a user error
        raise TypeError(f"{samplers.sampler_spec(sampler).cls} does not accept {unknown}")
    return config


def make_scheduler(sampler: str, schedule_type: str, base_config: Mapping[str, Any]):
    """A fresh diffusers scheduler for ``sampler`` / ``schedule_type``.

    ``base_config`` is the model's training noise schedule (a diffusers scheduler
    config); keys the chosen class does not take are dropped, and the sampler's own
    settings (spacing, algorithm, sigma schedule) override it.
    """
    config = scheduler_config(sampler, schedule_type, base_config)
    return scheduler_class(sampler)(**config)


@functools.lru_cache(maxsize=64)  # one entry per scheduler class: the table has about a dozen
def _step_takes_generator(cls: type) -> bool:
    return "generator" in inspect.signature(cls.step).parameters


def _quiet_torchsde() -> None:
    # diffusers queries its Brownian tree at sigma_fn(t_fn(sigma)), which can fall a
    # rounding error outside the tree's [sigma_min, sigma_max]; torchsde then warns
    # "Should have ta>=t0 ..." on every image. Harmless, so silence just that message
    # (idempotent: filterwarnings replaces an identical filter).
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
