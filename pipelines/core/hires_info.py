"""Hires fix and the refiner in the infotext: the keys A1111 writes, and the request fields they restore.

No torch here (unlike `hires`), so `infotext` and the UI can use it when a pasted text is
read back into the txt2img tab.
"""

from __future__ import annotations

from typing import Any

from pipelines.core import samplers
from pipelines.core.request import in_limits


def infotext_params(request: Any, width: int, height: int) -> dict[str, object]:
    """The hires keys A1111 writes (Size stays the first pass's size)."""
    params: dict[str, object] = {"Denoising strength": request.hr_denoising_strength}
    if request.hr_resize_x or request.hr_resize_y:
        hr_w, hr_h = request.hires_size(width, height)
        params["Hires resize"] = f"{hr_w}x{hr_h}"
    else:
        params["Hires upscale"] = request.hr_scale
    if request.hr_second_pass_steps:
        params["Hires steps"] = request.hr_second_pass_steps
    params["Hires upscaler"] = request.hr_upscaler
    if request.hr_sampler and request.hr_sampler != request.sampler:
        params["Hires sampler"] = request.hr_sampler
    if request.hr_schedule_type and request.hr_schedule_type != request.schedule_type:
        params["Hires schedule type"] = request.hr_schedule_type
    if request.hr_prompt and request.hr_prompt != request.prompt:
        params["Hires prompt"] = request.hr_prompt
    if request.hr_negative_prompt and request.hr_negative_prompt != request.negative_prompt:
        params["Hires negative prompt"] = request.hr_negative_prompt
    return params


def fields_from_infotext(info: dict[str, str]) -> dict[str, object]:
    """GenerationRequest hires fields from a parsed infotext (`infotext.parse_infotext`).

    Never raises; values out of range or unknown samplers are left out, so
    `request.replace(**fields)` cannot fail on them. Empty when the text has no hires keys."""
    def number(key: str, field: str, kind=float):
        try:
            value = kind(info[key])
        except (KeyError, TypeError, ValueError):
            return
        if in_limits(field, value):
            fields[field] = value

    fields: dict[str, object] = {}
    if not any(key.startswith("Hires ") for key in info):
        return fields
    fields["enable_hr"] = True
    number("Hires upscale", "hr_scale")
    number("Hires resize-1", "hr_resize_x", int)
    number("Hires resize-2", "hr_resize_y", int)
    number("Hires steps", "hr_second_pass_steps", int)
    number("Denoising strength", "hr_denoising_strength")
    if info.get("Hires upscaler"):
        fields["hr_upscaler"] = info["Hires upscaler"]
    if info.get("Hires sampler") in samplers.SAMPLER_NAMES:
        fields["hr_sampler"] = info["Hires sampler"]
    if info.get("Hires schedule type") in samplers.SCHEDULE_TYPES:
        fields["hr_schedule_type"] = info["Hires schedule type"]
    for key, field in (("Hires prompt", "hr_prompt"), ("Hires negative prompt", "hr_negative_prompt")):
        if info.get(key):
            fields[field] = info[key]
    if info.get("Hires checkpoint", "").strip():  # "name [hash]" as written, for a caller to match
        fields["hr_checkpoint_name"] = info["Hires checkpoint"].strip()
    return fields


def refiner_fields(info: dict[str, str]) -> dict[str, object]:
    """refiner_checkpoint ("name [hash]" as written) and refiner_switch_at from "Refiner" and
    "Refiner switch at" (a text without "Refiner" had no refiner: the UI's paste turns it off)."""
    fields: dict[str, object] = {}
    if info.get("Refiner", "").strip():
        fields["refiner_checkpoint"] = info["Refiner"].strip()
    try:
        switch_at = float(info["Refiner switch at"])
    except (KeyError, ValueError):
        return fields
    if in_limits("refiner_switch_at", switch_at):
        fields["refiner_switch_at"] = switch_at
    return fields
