"""Other apps' metadata values in A1111's terms, for `metadata_read`'s readers.

Numbers written as text, sizes, checkpoint file names as "Model", LoRAs as prompt tags, and
ComfyUI's / Fooocus's / InvokeAI's sampler and scheduler names as A1111's Sampler and Schedule
type. Each returns None (or leaves a value as written) where it cannot convert; none raises.
"""

from __future__ import annotations

import re
from typing import Any

# ComfyUI's KSampler sampler_name -> A1111 sampler (Fooocus uses the same names).
COMFY_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_gpu": "DPM++ 3M SDE", "ddim": "DDIM",
    "uni_pc": "UniPC", "uni_pc_bh2": "UniPC", "lcm": "LCM", "tcd": "TCD", "restart": "Restart",
}
# ComfyUI's scheduler -> A1111 schedule type ("normal" is the model's own sigma schedule,
# which this app calls "Uniform").
COMFY_SCHEDULERS = {
    "normal": "Uniform", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
}
# InvokeAI's scheduler names -> A1111 sampler; a "_k" suffix means Karras sigmas.
INVOKE_SAMPLERS = {
    "ddim": "DDIM", "lms": "LMS", "pndm": "PLMS", "heun": "Heun", "euler": "Euler", "euler_a": "Euler a",
    "kdpm_2": "DPM2", "kdpm_2_a": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE", "unipc": "UniPC", "lcm": "LCM", "tcd": "TCD",
}


def number(value: Any) -> float | None:
    """A number, or one written as text ("20", "7.5"; whole ones as int); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            return None
        return int(parsed) if parsed.is_integer() else parsed
    return None


def sampler_params(sampler: str | None, scheduler: str | None) -> dict[str, Any]:
    """ComfyUI/Fooocus sampler_name + scheduler -> A1111's Sampler and Schedule type."""
    params: dict[str, Any] = {}
    if sampler:
        params["Sampler"] = COMFY_SAMPLERS.get(str(sampler), str(sampler))
    if scheduler:
        params["Schedule type"] = COMFY_SCHEDULERS.get(str(scheduler), str(scheduler))
    return params


def size_text(width: Any, height: Any) -> str | None:
    """A1111's "Size" ("512x768") from two whole numbers; None otherwise."""
    width, height = number(width), number(height)
    if isinstance(width, int) and isinstance(height, int):
        return f"{width}x{height}"
    return None


def model_name(value: Any) -> str | None:
    """A checkpoint file name as A1111 writes "Model": the stem, without folders."""
    if not isinstance(value, str) or not value.strip():
        return None
    name = re.split(r"[\\/]", value.strip())[-1]
    return re.sub(r"\.(safetensors|ckpt|pt|pth|bin|gguf)$", "", name, flags=re.IGNORECASE)


def lora_tag(name: Any, unet: Any, text_encoder: Any = None) -> str | None:
    """``<lora:stem:unet[:te]>`` for a LoRA file and its weights; None for no name or weight 0."""
    stem = model_name(name)
    unet = number(unet)
    if not stem or unet is None or unet == 0:
        return None
    te = number(text_encoder)
    weights = f"{unet:g}" if te is None or te == unet else f"{unet:g}:{te:g}"
    return f"<lora:{stem}:{weights}>"


def with_loras(prompt: str, tags: list[str]) -> str:
    """LoRAs as A1111 prompts carry them, so pasting loads them too."""
    return ", ".join(part for part in (prompt.strip(), " ".join(tags)) if part)


def invoke_sampler(name: Any) -> dict[str, Any]:
    """InvokeAI's scheduler name -> A1111's Sampler (and Schedule type where it maps)."""
    if not isinstance(name, str) or not name:
        return {}
    base, karras = (name[:-2], True) if name.endswith("_k") else (name, False)
    if base not in INVOKE_SAMPLERS:
        return {"Sampler": name}
    return {"Sampler": INVOKE_SAMPLERS[base], "Schedule type": "Karras" if karras else "Uniform"}


def short_hash(sha256: Any) -> str | None:
    """A file's sha256 as A1111's "Model hash" (its first 10 hex digits)."""
    return sha256[:10] if isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256) else None
