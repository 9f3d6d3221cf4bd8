"""The checks every request type shares: each raises `RequestError` naming the field.

Torch-free and free of any request type, so `request`, `control` and the rest can all use it."""

from __future__ import annotations

from typing import Any, Mapping


class RequestError(ValueError):
    """A bad request field; `field` names it so UI and API can point at it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # pickles (a ZeroGPU worker sends its errors back to the main process)
        return (type(self), (self.field, self.message))


def check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(name, "must be text")


def check_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # sliders and JSON clients send 20.0 for 20
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be a whole number, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """A checkbox value: true or false (1 and 0 too, as JSON clients send them)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise RequestError(name, f"must be true or false, got {value!r}")


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(name, f"must be a number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise RequestError(name, f"unknown value {value!r}; choose one of: {', '.join(choices)}")



def within(limits: Mapping[str, tuple[float, float]], name: str, value: float | None) -> bool:
    """True when `value` lies within ``limits[name]`` (None never does)."""
    low, high = limits[name]
    return value is not None and low <= value <= high


def check_range_of(limits: Mapping[str, tuple[float, float]], name: str, value: float) -> float:
    """`value`, when it lies within ``limits[name]``; else a RequestError naming the range."""
    if not within(limits, name, value):
        low, high = limits[name]
        raise RequestError(name, f"must be between {low:g} and {high:g}, got {value:g}")
    return value
