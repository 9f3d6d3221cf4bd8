"""X/Y/Z plot axes: which request field each axis type sets, and how its values are written.

Values are comma-separated (quotes protect commas: `"a, b", c`). Numeric axes also take
ranges: `1-5` (1,2,3,4,5), `1-10 (+3)` (1,4,7,10), `0-1 [5]` (five values from 0 to 1).
Prompt S/R: the first value is searched for in the prompt (and negative prompt) and each
value replaces it in turn, the first one included (so it leaves the prompt as it is).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from typing import Any, Callable

from extensions.api import GenerationRequest, RequestError
from pipelines.core import samplers  # the names only: torch-free


@dataclass(frozen=True)
class AxisType:
    label: str
    field: str | None  # the GenerationRequest field; None for Prompt S/R and Nothing
    kind: type  # int, float or str
    show_label: bool = True  # "Seed: 1" rather than "1"
    choices: Callable[[], list[str]] | None = None  # case-insensitive names (samplers, ...)


def _samplers() -> list[str]:
    return list(samplers.SAMPLER_NAMES)


def _schedules() -> list[str]:
    return list(samplers.SCHEDULE_TYPES)


AXIS_TYPES = {a.label: a for a in (
    AxisType("Nothing", None, str),
    AxisType("Seed", "seed", int),
    AxisType("Var. seed", "subseed", int),
    AxisType("Var. strength", "subseed_strength", float),
    AxisType("Steps", "steps", int),
    AxisType("CFG Scale", "cfg_scale", float),
    AxisType("Prompt S/R", None, str, show_label=False),
    AxisType("Sampler", "sampler", str, choices=_samplers),
    AxisType("Schedule type", "schedule_type", str, choices=_schedules),
    AxisType("Checkpoint name", "checkpoint", str, show_label=False),
    AxisType("VAE", "vae", str),
    AxisType("Width", "width", int),
    AxisType("Height", "height", int),
    AxisType("Denoising", "denoising_strength", float),
    AxisType("Clip skip", "clip_skip", int),
    AxisType("Negative prompt", "negative_prompt", str, show_label=False),
)}
AXIS_NAMES = list(AXIS_TYPES)

_INT_RANGE = re.compile(r"^\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*(?:\(\s*\+?\s*(-?\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$")
_FLOAT_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)\s*"
                          r"(?:\(\s*\+?\s*(-?\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*$")


def split_values(text: str) -> list[str]:
    rows = list(csv.reader([str(text or "")], skipinitialspace=True))
    return [v.strip() for v in (rows[0] if rows else []) if v.strip()]


def _expand(item: str, kind: type) -> list[Any]:
    match = (_INT_RANGE if kind is int else _FLOAT_RANGE).match(item)
    if not match:
        return [kind(item)]
    start, end = kind(match.group(1)), kind(match.group(2))
    if match.group(4):  # [count]
        count = int(match.group(4))
        if count < 1:
            raise ValueError("a count in [ ] must be at least 1")
        if count == 1:
            return [start]
        values = [start + (end - start) * i / (count - 1) for i in range(count)]
        return [int(round(v)) for v in values] if kind is int else [round(v, 6) for v in values]
    step = kind(match.group(3)) if match.group(3) else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"{item!r}: the step goes the wrong way")
    values, value = [], start
    while (value <= end + 1e-9) if step > 0 else (value >= end - 1e-9):
        values.append(round(value, 6) if kind is float else value)
        value += step
        if len(values) > 10000:
            raise ValueError(f"{item!r}: too many values")
    return values


def parse_values(axis: AxisType, text: str, where: str) -> list[Any]:
    """The values of one axis (RequestError naming `where` when they do not parse)."""
    if axis.field is None and axis.label == "Nothing":
        return [None]
    items = split_values(text)
    if not items:
        raise RequestError(where, f"{axis.label}: give at least one value")
    values: list[Any] = []
    try:
        for item in items:
            values += _expand(item, axis.kind) if axis.kind in (int, float) else [item]
    except ValueError as exc:
        raise RequestError(where, f"{axis.label}: {exc}") from None
    if axis.choices is not None:
        known = {c.lower(): c for c in axis.choices()}
        for i, value in enumerate(values):
            if value.lower() not in known:
                raise RequestError(where, f"{axis.label}: unknown value {value!r}; "
                                          f"choose from {', '.join(known.values())}")
            values[i] = known[value.lower()]
    return values


def apply(request: GenerationRequest, axis: AxisType, value: Any, values: list[Any], where: str) -> GenerationRequest:
    """`request` with this axis set to `value` (RequestError naming `where` if it is invalid)."""
    if axis.label == "Nothing":
        return request
    try:
        if axis.label == "Prompt S/R":
            search = values[0]
            if search not in request.prompt and search not in request.negative_prompt:
                raise RequestError(where, f"Prompt S/R: {search!r} is not in the prompt or the negative prompt")
            return request.replace(prompt=request.prompt.replace(search, value),
                                   negative_prompt=request.negative_prompt.replace(search, value))
        return request.replace(**{axis.field: value})
    except RequestError as exc:
        if exc.field == where:
            raise
        raise RequestError(where, f"{axis.label} {value!r}: {exc.message}") from None


def label(axis: AxisType, value: Any) -> str:
    if axis.label == "Nothing":
        return ""
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{axis.label}: {value}" if axis.show_label else str(value)
