"""The denoising options' infotext keys, both ways: CFG cutoff (NGMS, Skip Early CFG), soft
inpainting's flag, DeepCache and token merging. `infotext.generation_params` writes them, and
`infotext.request_fields_from_infotext` reads them back.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipelines.core.limits import in_limits
from pipelines.core.text_numbers import to_float, to_int


def cfg_cutoff_params(request: Any) -> dict[str, object]:
    """A1111's keys for the CFG cutoff settings in use (only under CFG: without it nothing is skipped)."""
    if request.cfg_scale == 1 or not (getattr(request, "s_min_uncond", 0) or getattr(request, "skip_early_cond", 0)):
        return {}
    every_step = request.s_min_uncond and request.s_min_uncond_all
    params: dict[str, object] = {"NGMS": request.s_min_uncond or None, "NGMS all steps": "True" if every_step else None,
                                 "Skip Early CFG": request.skip_early_cond or None}
    return {key: value for key, value in params.items() if value is not None}


def deep_cache_params(request: Any) -> dict[str, object]:
    """DeepCache's settings when it is on (interval above 1); A1111's DeepCache extensions write no
    interval, so these keys are ours."""
    if getattr(request, "deepcache_interval", 1) <= 1:
        return {}
    return {"DeepCache interval": request.deepcache_interval, "DeepCache branch": request.deepcache_branch,
            "DeepCache start": request.deepcache_start}


def deep_cache_fields(info: Mapping[str, str], has_params: bool) -> dict[str, Any]:
    """DeepCache's settings from a text; a parameters line without them means off."""
    interval = to_int(info.get("DeepCache interval"))
    if not in_limits("deepcache_interval", interval):
        return {"deepcache_interval": 1} if has_params else {}
    fields: dict[str, Any] = {"deepcache_interval": interval}
    for key, name, read in (("DeepCache branch", "deepcache_branch", to_int),
                            ("DeepCache start", "deepcache_start", to_float)):
        value = read(info.get(key))
        if in_limits(name, value):
            fields[name] = value
    return fields


TOKEN_MERGING_KEY = "Token merging ratio"  # A1111's


def token_merging_params(request: Any) -> dict[str, object]:
    """A1111's key for token merging when it is on."""
    ratio = getattr(request, "token_merging_ratio", 0.0)
    return {TOKEN_MERGING_KEY: ratio} if ratio > 0 else {}


def token_merging_fields(info: Mapping[str, str], has_params: bool) -> dict[str, Any]:
    """Token merging from a text; a parameters line without the key means off."""
    ratio = to_float(info.get(TOKEN_MERGING_KEY))
    if in_limits("token_merging_ratio", ratio):
        return {"token_merging_ratio": ratio}
    return {"token_merging_ratio": 0.0} if has_params else {}


TINY_DECODE_KEY, TINY_DECODE_VALUE = "VAE decoder", "TAESD"  # ours: A1111 has no fast final decode


def tiny_decode_params(request: Any) -> dict[str, object]:
    """The fast final decode (TAESD instead of the full VAE) when the request asks for it."""
    return {TINY_DECODE_KEY: TINY_DECODE_VALUE} if getattr(request, "tiny_vae_decode", False) else {}


def tiny_decode_fields(info: Mapping[str, str], has_params: bool) -> dict[str, Any]:
    """The fast final decode from a text; a parameters line without the key means the full VAE."""
    if TINY_DECODE_KEY in info:
        return {"tiny_vae_decode": info[TINY_DECODE_KEY].strip().upper().startswith(TINY_DECODE_VALUE)}
    return {"tiny_vae_decode": False} if has_params else {}


def cutoff_fields(info: Mapping[str, str], has_params: bool) -> dict[str, Any]:
    """CFG cutoff and soft inpainting from a text; absent keys mean off (A1111 leaves them out then)."""
    fields: dict[str, Any] = {}
    for key, name in (("NGMS", "s_min_uncond"), ("Skip Early CFG", "skip_early_cond")):
        value = to_float(info.get(key))
        if in_limits(name, value):
            fields[name] = value
        elif has_params and key not in info:
            fields[name] = 0.0
    for key, name in (("NGMS all steps", "s_min_uncond_all"), ("Soft inpainting", "soft_inpainting")):
        if key in info or has_params:
            fields[name] = info.get(key, "").strip().casefold() == "true"
    return fields
