"""A1111's "parameters" text: build it for saved images, parse it back when pasted.

The format (one text, as A1111 writes it into the PNG `parameters` chunk):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>   (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values containing a separator are written as JSON strings, so `Lora hashes: "a: 1, b: 2"`
survives a round trip. Users paste texts from this app, A1111, Forge and Civitai, so the
parser is lenient: unknown keys are kept, junk is skipped, nothing raises.

No torch here: the UI imports this module.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from pipelines.core import control_infotext, hires_info, module_choice, regions, samplers
from pipelines.core.infotext_options import (
    cfg_cutoff_params,
    cutoff_fields,
    deep_cache_fields,
    deep_cache_params,
    tiny_decode_fields,
    tiny_decode_params,
    token_merging_fields,
    token_merging_params,
)
from pipelines.core.request import INPAINT_FILLS, MAX_SEED, in_limits
from pipelines.core.text_numbers import to_float, to_int

NEGATIVE_PREFIX = "Negative prompt:"

# Keys in the order A1111 1.10's create_infotext writes them (the subset this app can fill).
# Extra keys (hires, extensions, "Lora hashes", ...) go after these and before "Version".
_KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
    "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength",
    "Clip skip", "RNG",
)

# "512x768" style values: A1111 also exposes them as "<Key>-1" / "<Key>-2".
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
# A key is a word followed by words, spaces, dashes, slashes or dots, then a colon.
_KEY_RE = re.compile(r"\s*(\w[\w \-/.]*?)\s*:\s*")


# --- writing ------------------------------------------------------------------------------

def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        # 7.0 -> "7" (what A1111 texts show for integral sliders); 0.1+0.2 -> "0.3", not float noise.
        value = round(value, 6)
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _quote(text: str) -> str:
    # A1111 JSON-quotes values containing a comma, colon or newline; we also quote a '"' so a
    # value that happens to start and end with quotes is not unquoted on the way back.
    if any(ch in text for ch in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The full parameters text; None values are dropped, as A1111 drops them."""
    line = ", ".join(f"{key}: {_quote(_format_value(value))}"
                     for key, value in params.items() if value is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    # A1111 strips the whole text, so an empty prompt starts with the "Negative prompt:" line.
    return f"{prompt}{negative}\n{line}".strip()


def generation_params(request: Any, *, seed: int, subseed: int, width: int, height: int,
                      model_name: str | None, model_hash: str | None,
                      vae_name: str | None = None, vae_hash: str | None = None,
                      version: str | None, extra: Mapping[str, object] | None = None,
                      control_titles: Mapping[int, str] | None = None,
                      ) -> dict[str, object]:
    """The `Key: value` pairs for one image of `request`, in A1111's key order.

    `request` is a GenerationRequest (duck-typed). `seed`/`subseed` are this image's resolved
    seeds. Entries of `extra` whose key is one of ours replace it in place (e.g. the runner
    passes the resolved {"Schedule type": "Karras"}); new keys go before "Version"; an extra
    value of None removes the key.

    Schedule type: A1111 1.10 writes `Schedule type: <the UI choice>` right after the sampler
    and then overwrites it with the concrete schedule when the sampler resolves "Automatic"
    to one (DPM++ 2M -> Karras); with no concrete schedule the text says "Automatic". We
    write the request's value and let the runner pass the resolved label through `extra`.

    RNG: our initial noise is A1111's "CPU" RNG source, and A1111 writes "RNG: CPU" for it,
    so A1111 users pasting our text get the same noise.

    Control units: a "ControlNet <i>" entry each (`control_infotext`); `control_titles` gives
    each unit's model as listed ("name [hash]"), by the unit's index in `request.control_units`.
    """
    strength = float(request.subseed_strength or 0.0)
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": request.schedule_type,
        "CFG scale": request.cfg_scale,
        # flow models' keys, where Forge writes them: the runner passes the values in `extra`
        "Distilled CFG Scale": None,
        "Shift": None,
        "Seed": seed,
        # A1111 writes the restorer's name here; the engine passes the one it resolved in `extra`
        "Face restoration": (getattr(request, "face_restorer", None) or "Automatic")
        if getattr(request, "restore_faces", False) else None,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Variation seed": subseed if strength > 0 else None,
        "Variation seed strength": strength if strength > 0 else None,
        "Seed resize from": seed_resize_text(request),
        "Denoising strength": request.denoising_strength if request.mode in ("img2img", "inpaint") else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "RNG": "CPU",
        "Tiling": "True" if getattr(request, "tiling", False) else None,  # A1111 writes it after RNG
    }
    if request.mode == "inpaint":
        # A1111 adds these to extra_generation_params in this order while preparing the mask.
        if request.inpainting_mask_invert:
            params["Mask mode"] = "Inpaint not masked"
        if request.mask_blur > 0:
            params["Mask blur"] = request.mask_blur
        if request.inpaint_full_res:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = request.inpaint_full_res_padding
        # A1111 only writes "fill"; we also write the latent fills so a paste restores them
        # ("original", the default, stays implicit as in A1111).
        if request.inpainting_fill != "original":
            params["Masked content"] = request.inpainting_fill
        if getattr(request, "soft_inpainting", False):
            params["Soft inpainting"] = "True"
    params.update(cfg_cutoff_params(request))
    params.update(deep_cache_params(request))
    params.update(token_merging_params(request))
    params.update(tiny_decode_params(request))
    params.update(control_infotext.control_params(getattr(request, "control_units", ()), control_titles))
    params.update(regions.request_infotext_params(request))
    for key, value in (extra or {}).items():
        params[key] = value
    params["Version"] = version
    return {key: value for key, value in params.items() if value is not None}


def seed_resize_text(request: Any) -> str | None:
    """The "Seed resize from" value ("WxH"), or None when the request does not resize the seed."""
    width, height = getattr(request, "seed_resize_from_w", 0), getattr(request, "seed_resize_from_h", 0)
    return f"{width}x{height}" if width > 0 and height > 0 else None


# --- parsing ------------------------------------------------------------------------------

def _bracket_end(line: str, pos: int) -> int | None:
    """Index just past the bracketed JSON-ish value starting at `pos` (Civitai writes
    `Civitai resources: [{"type": ..., ...}]` unquoted), or None if it never closes."""
    depth, in_string, escaped = 0, False, False
    for i in range(pos, len(line)):
        ch = line[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _parse_params_line(line: str) -> dict[str, str]:
    result: dict[str, str] = {}
    pos, n = 0, len(line)
    decoder = json.JSONDecoder()
    while pos < n:
        match = _KEY_RE.match(line, pos)  # a key cannot contain a comma
        if not match:
            # No "Key:" before the next comma: a bare word or junk; skip that piece.
            comma = line.find(",", pos)
            if comma == -1:
                break
            pos = comma + 1
            continue
        key, pos = match.group(1), match.end()
        value, end = None, None
        if line.startswith('"', pos):
            try:
                decoded, end = decoder.raw_decode(line, pos)
            except ValueError:
                end = None
            else:
                rest = line[end:].lstrip()
                if isinstance(decoded, str) and (not rest or rest.startswith(",")):
                    value = decoded
                else:
                    end = None
        elif line.startswith(("[", "{"), pos):
            end = _bracket_end(line, pos)
            if end is not None:
                value = line[pos:end]
        if value is None:  # plain value: up to the next comma, as A1111 reads it
            end = line.find(",", pos)
            end = n if end == -1 else end
            value = line[pos:end].strip()
        result[key] = value
        pos = end
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ",":
            pos += 1
    return result


def parse_infotext(text: str) -> dict[str, str]:
    """"Prompt", "Negative prompt" (both always present) and every `Key: value` pair.

    Like A1111: the last line counts as the parameters line only if it holds at least three
    pairs (otherwise it is prompt text); lines are stripped; everything from a line starting
    with "Negative prompt:" on is the negative prompt; `Size: 512x768` also gives
    "Size-1": "512" and "Size-2": "768" (for any `<W>x<H>` value).
    """
    lines = (text or "").replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    params = _parse_params_line(lines[-1].strip())
    if len(params) >= 3:
        lines = lines[:-1]
    else:
        params = {}

    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if not in_negative and line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative if in_negative else prompt).append(line)

    result = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in params.items():
        result[key] = value
        size = _SIZE_RE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
    return result


# --- pasting into a request ---------------------------------------------------------------

def _canonical(value: str, choices: tuple[str, ...]) -> str | None:
    folded = value.strip().casefold()
    for choice in choices:
        if choice.casefold() == folded:
            return choice
    return None


def _seed_resize_fields(info: Mapping[str, str], has_params: bool) -> dict[str, int]:
    """seed_resize_from_w/h from "Seed resize from: WxH"; off (0) when a parameters line lacks it."""
    width, height = to_int(info.get("Seed resize from-1")), to_int(info.get("Seed resize from-2"))
    if in_limits("seed_resize_from_w", width) and in_limits("seed_resize_from_h", height) and min(width, height) >= 8:
        return {"seed_resize_from_w": width, "seed_resize_from_h": height}
    if has_params and "Seed resize from" not in info:
        return {"seed_resize_from_w": 0, "seed_resize_from_h": 0}
    return {}


def request_fields_from_infotext(text: str) -> dict[str, Any]:
    """GenerationRequest field values found in a pasted text; never raises.

    Unknown keys, unparsable numbers, out-of-range values and samplers/schedules this app
    does not have are left out, so `request.replace(**fields)` cannot fail on them.
    Checkpoint/VAE come back as hints (`model_name`, `model_hash`, `vae_name`, `vae_hash`)
    for the caller to match against the registry; they are not request fields.
    Absent "Clip skip" and "Variation seed strength" mean 1 and 0 (A1111 leaves them out at
    those values), so they are filled in when the text has a parameters line.
    """
    info = parse_infotext(text)
    fields: dict[str, Any] = {"prompt": info["Prompt"], "negative_prompt": info["Negative prompt"]}
    has_params = len(info) > 2

    steps = to_int(info.get("Steps"))
    if in_limits("steps", steps):
        fields["steps"] = steps

    if "Sampler" in info:
        sampler_name, schedule = samplers.split_sampler_name(info["Sampler"])
        sampler = _canonical(sampler_name, samplers.SAMPLER_NAMES)
        if sampler is not None:
            fields["sampler"] = sampler
            if "Schedule type" not in info:
                # Pre-1.9 texts: the schedule lives in the sampler name, or is the default.
                fields["schedule_type"] = schedule or "Automatic"
    if "Schedule type" in info:
        schedule = samplers.schedule_type_named(info["Schedule type"])
        if schedule is not None:
            fields["schedule_type"] = schedule

    cfg = to_float(info.get("CFG scale"))
    if in_limits("cfg_scale", cfg):
        fields["cfg_scale"] = cfg
    for key, field in (("Distilled CFG Scale", "distilled_cfg_scale"), ("Shift", "shift")):  # Forge's flow keys
        value = to_float(info.get(key))
        if in_limits(field, value):
            fields[field] = value

    for key, field in (("Seed", "seed"), ("Variation seed", "subseed")):
        seed = to_int(info.get(key))
        if seed is not None and (seed == -1 or 0 <= seed <= MAX_SEED):
            fields[field] = seed

    strength = to_float(info.get("Variation seed strength"))
    if in_limits("subseed_strength", strength):
        fields["subseed_strength"] = strength
    elif has_params and "Variation seed strength" not in info:
        fields["subseed_strength"] = 0.0

    width, height = to_int(info.get("Size-1")), to_int(info.get("Size-2"))
    if (in_limits("width", width) and in_limits("height", height)
            and width % 8 == 0 and height % 8 == 0):
        fields["width"], fields["height"] = width, height

    fields.update(_seed_resize_fields(info, has_params))

    denoise = to_float(info.get("Denoising strength"))
    if in_limits("denoising_strength", denoise):
        fields["denoising_strength"] = denoise

    clip_skip = to_int(info.get("Clip skip"))
    if in_limits("clip_skip", clip_skip):
        fields["clip_skip"] = clip_skip
    elif has_params and "Clip skip" not in info:
        fields["clip_skip"] = 1

    # Inpainting settings, only when the text has them.
    blur = to_int(info.get("Mask blur"))
    if in_limits("mask_blur", blur):
        fields["mask_blur"] = blur
    if "Mask mode" in info:
        fields["inpainting_mask_invert"] = info["Mask mode"].strip().casefold() == "inpaint not masked"
    if "Inpaint area" in info:
        fields["inpaint_full_res"] = info["Inpaint area"].strip().casefold() == "only masked"
    padding = to_int(info.get("Masked area padding"))
    if in_limits("inpaint_full_res_padding", padding):
        fields["inpaint_full_res_padding"] = padding
    if "Masked content" in info:
        fill = _canonical(info["Masked content"], INPAINT_FILLS)
        if fill is not None:
            fields["inpainting_fill"] = fill

    for key, hint in (("Model", "model_name"), ("Model hash", "model_hash"),
                      ("VAE", "vae_name"), ("VAE hash", "vae_hash")):
        if info.get(key, "").strip():
            fields[hint] = info[key].strip()
    if "Tiling" in info:
        fields["tiling"] = info["Tiling"].strip().casefold() == "true"
    elif has_params:  # A1111 only writes "Tiling: True"; absent means off
        fields["tiling"] = False
    if info.get("Face restoration", "").strip():
        fields["restore_faces"] = True
        fields["face_restorer"] = info["Face restoration"].strip()
    elif has_params:  # absent means off
        fields["restore_faces"] = False
    fields.update(hires_info.fields_from_infotext(info))  # hires fix, when the text has it
    fields.update(hires_info.refiner_fields(info))
    fields.update(cutoff_fields(info, has_params))
    fields.update(regions.fields_from_params(info))  # regional prompts: the Regional Prompter's keys
    fields.update(deep_cache_fields(info, has_params))
    fields.update(token_merging_fields(info, has_params))
    fields.update(tiny_decode_fields(info, has_params))
    if module_choice.from_infotext(info):  # Forge's "Module 1: ae, Module 2: clip_l, ..."
        fields["text_encoders"] = module_choice.from_infotext(info)
    return fields
