"""Numbers read from pasted text (infotexts): None where the text is not one; never raises."""

from __future__ import annotations


def to_int(value: str | None) -> int | None:
    """A whole number written as text ("20", "20.0"); None for anything else."""
    number = to_float(value)
    return int(number) if number is not None and number.is_integer() else None


def to_float(value: str | None) -> float | None:
    """A finite number written as text; None for anything else (never raises)."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None
