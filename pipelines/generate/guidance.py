"""CFG cutoff: the steps that skip the unconditional (negative prompt) U-Net pass.

A1111's two settings, under their option names (what `override_settings` sends) and their
infotext keys:
- ``s_min_uncond`` ("Negative Guidance minimum sigma", infotext ``NGMS``): once the noise level
  sigma falls below it, the image is nearly done and the negative prompt changes little, so every
  other step (odd step indices) runs on the prompt alone; with ``s_min_uncond_all``
  (``NGMS all steps``) every step below it does. 0 turns it off.
- ``skip_early_cond`` ("Ignore negative prompt during early sampling", infotext
  ``Skip Early CFG``): the first share of the steps (step / steps <= the share) run without CFG.
  0 turns it off.

A step without the unconditional pass costs half a CFG step and uses the conditional prediction
as it is (guidance 1 for that step), as A1111 does. 
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CfgCutoff:
    """When the unconditional pass is skipped (all off by default); the request checks the values."""

    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0

    @classmethod
    def of(cls, request) -> CfgCutoff:
        """A GenerationRequest's cutoff settings."""
        return cls(request.s_min_uncond, request.s_min_uncond_all, request.skip_early_cond)

    @property
    def active(self) -> bool:
        return self.s_min_uncond > 0 or self.skip_early_cond > 0


NO_CUTOFF = CfgCutoff()


def skips_early(step: int, steps: int, cutoff: CfgCutoff) -> bool:
    """True for a step in the first ``skip_early_cond`` share of the steps ("Skip Early CFG")."""
    return cutoff.skip_early_cond > 0 and step / max(steps, 1) <= cutoff.skip_early_cond


def skips_late(step: int, sigma: float | None, cutoff: CfgCutoff) -> bool:
    """True for a step below the ``s_min_uncond`` sigma ("NGMS"): every other one, or all of them
    with ``s_min_uncond_all``. A schedule without sigmas (None) never skips."""
    if cutoff.s_min_uncond <= 0 or sigma is None or not sigma < cutoff.s_min_uncond:
        return False
    return cutoff.s_min_uncond_all or step % 2 == 1


def use_uncond(step: int, steps: int, sigma: float | None, cutoff: CfgCutoff = NO_CUTOFF) -> bool:
    """Whether step ``step`` (0-based, of ``steps``, at noise level ``sigma``) runs the
    unconditional pass under CFG. Only meaningful where CFG is on (cfg_scale != 1)."""
    return not (skips_early(step, steps, cutoff) or skips_late(step, sigma, cutoff))
