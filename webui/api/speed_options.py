"""The speed options of a generation request from the API: A1111's settings in `override_settings`
(`token_merging_ratio`, `skip_early_cond`, `s_min_uncond_all`; NGMS itself, `s_min_uncond`, is a
body field as in A1111) and our DeepCache body fields (`deepcache_interval`, `deepcache_branch`,
`deepcache_start`). Ranges are GenerationRequest's; an error names the field the client sent.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import bad_field

# A1111's setting names, which are also GenerationRequest's field names
OVERRIDE_KEYS = ("token_merging_ratio", "skip_early_cond", "s_min_uncond_all")
DEEPCACHE_FIELDS = ("deepcache_interval", "deepcache_branch", "deepcache_start")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_field(name, f"must be a number, got {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_field(name, f"must be true or false, got {value!r}")
    return value


def speed_fields(body: Any, overrides: Mapping[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """GenerationRequest fields for what `body` and its `overrides` set; `names` learns where each came from."""
    fields: dict[str, Any] = {}
    for key in OVERRIDE_KEYS:
        if key in overrides:
            where = f"override_settings.{key}"
            fields[key] = (_flag if key == "s_min_uncond_all" else _number)(where, overrides[key])
            names[key] = where
    for key in DEEPCACHE_FIELDS:
        value = getattr(body, key, None)
        if value is not None:
            fields[key] = value
    return fields
