"""Names A1111 clients send, resolved against this server's lists: samplers and schedulers,
checkpoints (by file name, title, stem, model_name or hash; never by path), VAE, clip skip."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core import samplers
from pipelines.core.request import LIMITS

from .errors import bad_field
from .models import GenerationFields


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


def sampler_aliases(name: str) -> list[str]:
    """The k-diffusion style names A1111 lists as aliases ("k_euler_a" for "Euler a")."""
    table = getattr(samplers, "_ALIASES", {})
    return [alias for alias, (sampler, schedule) in table.items() if sampler == name and schedule is None]


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


def checkpoint_title(file) -> str:
    return f"{file.name} [{file.short_hash}]" if file.short_hash else file.name


def checkpoint_model_name(file) -> str:
    # A1111: the name without its extension, folders joined with "_"
    return str(Path(file.name.replace("/", "_").replace("\\", "_")).with_suffix(""))


def find_checkpoint(engine, name: str):
    """A listed checkpoint by any name A1111 clients use: file name, title "name [hash]",
    stem, model_name, short hash or sha256. Never a path: only the listing resolves."""
    if not isinstance(name, str) or not name.strip():
        return None
    file = engine.registry.find("checkpoints", name)
    if file is not None:
        return file
    wanted = name.strip()
    for file in engine.list_checkpoints():
        if wanted in (checkpoint_model_name(file), file.short_hash, file.sha256):
            return file
    return None


def resolve_checkpoint_field(engine, field_name: str, name: Any):
    file = find_checkpoint(engine, name) if isinstance(name, str) else None
    if file is None:
        titles = ", ".join(checkpoint_title(f) for f in engine.list_checkpoints()) or "none"
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


VAE_BUILTIN = ("Automatic", "None")


def vae_choices(engine) -> list[str]:
    return [*VAE_BUILTIN, *(f.name for f in engine.registry.list("vae"))]
