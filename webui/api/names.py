"""Names A1111 clients send, resolved against this server's lists: samplers and schedulers
(A1111's scheduler table lives here), checkpoints (the engine matches the name; here a miss
becomes a 422 naming the field) and clip skip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.core import samplers
from pipelines.core.engine_api import EngineAPI, ModelFileInfo
from pipelines.core.request import LIMITS

from .bodies import GenerationFields
from .errors import bad_field


@dataclass(frozen=True)
class SchedulerInfo:
    name: str  # A1111's internal name, what clients send
    label: str  # our schedule type (A1111's label)
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False


SCHEDULERS: tuple[SchedulerInfo, ...] = (
    SchedulerInfo("automatic", "Automatic"),
    SchedulerInfo("uniform", "Uniform", aliases=("normal",), need_inner_model=True),
    SchedulerInfo("karras", "Karras", default_rho=7.0),
    SchedulerInfo("exponential", "Exponential"),
    SchedulerInfo("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True),
)


def schedulers() -> list[SchedulerInfo]:
    """Every schedule type the engine has, in its order, with A1111's names (a type added to
    the engine later shows up with a name made from its label)."""
    known = {info.label: info for info in SCHEDULERS}
    return [known.get(label) or SchedulerInfo(label.casefold().replace(" ", "_"), label)
            for label in samplers.SCHEDULE_TYPES]


def parse_scheduler(field_name: str, value: str) -> str:
    """A1111 scheduler name, label or alias (any case) -> our schedule type."""
    wanted = str(value).strip().casefold()
    for info in schedulers():
        if wanted in {info.name.casefold(), info.label.casefold(), *(a.casefold() for a in info.aliases)}:
            return info.label
    choices = ", ".join(s.name for s in schedulers())
    raise bad_field(field_name, f"unknown scheduler {value!r}; choose one of: {choices}")


def parse_sampler(body: GenerationFields) -> tuple[str, str, str]:
    """(sampler, schedule type, the field it came from). An explicit scheduler wins over one
    folded into an old-style name ("DPM++ 2M Karras"), unless it is "automatic"."""
    field_name = "sampler_name" if body.sampler_name else "sampler_index"
    raw = body.sampler_name or body.sampler_index
    try:
        sampler, folded = samplers.parse_sampler_name(raw)
    except ValueError:
        raise bad_field(field_name, f"unknown sampler {raw!r}; choose one of: "
                                    f"{', '.join(samplers.SAMPLER_NAMES)}") from None
    schedule = folded
    if body.scheduler is not None and str(body.scheduler).strip():
        explicit = parse_scheduler("scheduler", body.scheduler)
        if explicit != "Automatic":
            schedule = explicit
    return sampler, schedule, field_name


def resolve_checkpoint_field(engine: EngineAPI, field_name: str, name: Any) -> ModelFileInfo:
    """The listed checkpoint `name` means (the engine knows every name A1111 clients use);
    a 422 naming `field_name` and listing the titles otherwise."""
    file = engine.find_checkpoint(name) if isinstance(name, str) and name.strip() else None
    if file is None:
        titles = ", ".join(f.title for f in engine.list_checkpoints()) or "none"
        raise bad_field(field_name, f"unknown checkpoint {name!r}; available: {titles}")
    return file


def parse_clip_skip(field_name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    low, high = LIMITS["clip_skip"]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_field(field_name, f"must be a whole number between {low:g} and {high:g}, got {value!r}")
    return value
