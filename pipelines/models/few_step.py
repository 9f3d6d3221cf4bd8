"""Few-step checkpoints and LoRAs (LCM, TCD, Hyper-SD, SDXL-Lightning, SD/SDXL Turbo): which
one a file is, from its name and safetensors metadata, and the settings its authors recommend.

    recommended_settings("sdxl_lightning_4step_lora", metadata)
    -> {"sampler": "Euler", "schedule_type": "SGM Uniform", "steps": 4, "cfg_scale": 1.0, "why": "..."}

Names are this app's sampler table names (`core.samplers`), so the result can be applied to a
request as it is ("use recommended settings"). `recommended_settings` is pure text rules (the
caller passes the metadata it already read), so the listing can call it for every file;
`recommend_for_job` (the engine's `recommended_settings(checkpoint, prompt)`) finds the files a
job names and reads their safetensors headers.

The facts, from each model's card (CFG 1 is "no CFG": diffusers' guidance_scale 0 or 1):
- LCM / LCM-LoRA: LCM sampler, 2-8 steps (4 is the card's example), CFG 1-2.
- TCD LoRA: TCD sampler (gamma 0.3), 2-8 steps (4), CFG 1.
- Hyper-SD N-step LoRA: DDIM with trailing timesteps (A1111: "SGM Uniform"), N steps, CFG 1;
  the "-CFG" LoRAs take CFG 5-8 and a negative prompt; the unified 1-step LoRA runs under TCD
  (its card asks for gamma 1.0, TCD's default here is 0.3) and the 1-step U-Net under LCM.
- SDXL-Lightning (U-Net, LoRA or checkpoint): Euler with trailing timesteps, N steps as trained
  (1, 2, 4 or 8), CFG 1.
- SD-Turbo / SDXL-Turbo: Euler a with trailing timesteps (their shipped scheduler), 1-4 steps,
  CFG 1, 512x512. Community "Turbo"/"Lightning" merges name their sampler when it differs
  ("...DPMSDE": DPM++ SDE Karras), and usually want a few more steps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from pipelines.core import samplers
from pipelines.core.checks import RequestError
from pipelines.core.extra_networks import extract_extra_networks
from pipelines.models.checkpoint_file import CheckpointError, read_header

# The metadata fields that name a file (kohya's output name, the model spec's title); others,
# like kohya's ss_sd_model_name (the base a LoRA was trained on), say nothing about the file itself.
NAME_FIELDS = ("ss_output_name", "modelspec.title")
LORA_FIELDS = ("ss_network_module",)  # present in kohya-trained LoRAs only

STEP_COUNT = re.compile(r"(\d{1,2})[-_ ]?steps?(?![a-z])")
NAMED_SAMPLERS = (("dpmsde", "DPM++ SDE", "Karras"), ("dpm++sde", "DPM++ SDE", "Karras"))


def _has_word(text: str, word: str) -> bool:
    """`word` as its own token: "lcm-lora", "LCM_Dreamshaper", "dreamshaperLCM", not "calcmodel"."""
    lowered = text.lower()
    bounded = re.search(rf"(?:^|[^a-z]){word}(?:$|[^a-z])", lowered) is not None
    return bounded or word.upper() in text


def _names(name: str, metadata: Mapping[str, str] | None) -> list[str]:
    """The file's own name (its stem, not its folder) and the names its metadata gives it."""
    texts = [PurePosixPath(str(name).replace("\\", "/")).stem]
    texts += [str(metadata[key]) for key in NAME_FIELDS if metadata and metadata.get(key)]
    return texts


def _is_lora(metadata: Mapping[str, str] | None) -> bool:
    if not metadata:
        return False
    architecture = str(metadata.get("modelspec.architecture", ""))
    return architecture.endswith("/lora") or any(metadata.get(key) for key in LORA_FIELDS)


def _steps_in(text: str) -> int | None:
    match = STEP_COUNT.search(text.lower())
    return int(match.group(1)) if match and 0 < int(match.group(1)) <= 50 else None


def _count(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def _settings(sampler: str, schedule_type: str, steps: int, cfg_scale: float, why: str) -> dict:
    samplers.resolve_schedule_type(sampler, schedule_type)  # a table name, or a bug here
    return {"sampler": sampler, "schedule_type": schedule_type, "steps": steps,
            "cfg_scale": float(cfg_scale), "why": why}


def _hyper_sd(text: str, steps: int | None) -> dict:
    lowered = text.lower()
    if "-cfg" in lowered or "_cfg" in lowered:
        steps = steps or 8
        return _settings("DDIM", "SGM Uniform", steps, 5.0,
                         f"Hyper-SD {steps}-step CFG model: DDIM, SGM Uniform (trailing), CFG 5-8 with a "
                         "negative prompt")
    if steps == 1 and "unet" in lowered:
        return _settings("LCM", "Automatic", 1, 1.0, "Hyper-SD 1-step U-Net: LCM, 1 step, CFG 1")
    if steps == 1:
        return _settings("TCD", "Automatic", 1, 1.0,
                         "Hyper-SD unified 1-step LoRA: TCD, 1-8 steps, CFG 1 (its card asks for gamma 1.0)")
    steps = steps or 8
    return _settings("DDIM", "SGM Uniform", steps, 1.0,
                     f"Hyper-SD {steps}-step model: DDIM, SGM Uniform (trailing), {_count(steps)}, CFG 1")


def _lightning(text: str, steps: int | None) -> dict:
    sampler, schedule = _named_sampler(text) or ("Euler", "SGM Uniform")
    steps = steps or 4
    x0 = "; the 1-step U-Net predicts x0, which this app does not run" if steps == 1 else ""
    return _settings(sampler, schedule, steps, 1.0,
                     f"SDXL-Lightning: {sampler}, {schedule}, {_count(steps)} as trained (1, 2, 4 or 8), "
                     f"CFG 1; merges may want 1-2{x0}")


def _turbo(text: str, steps: int | None) -> dict:
    lowered = text.lower()
    official = re.search(r"(?:^|[^a-z])(sd|sdxl)[-_ ]?turbo", lowered) is not None
    named = _named_sampler(text)
    sampler, schedule = named or ("Euler a", "SGM Uniform")
    steps = steps or (1 if official and not named else 4)
    made_for = "SD/SDXL Turbo (made for 512x512)" if official else "Turbo model"
    return _settings(sampler, schedule, steps, 1.0, f"{made_for}: {sampler}, {_count(steps)} (1-4), CFG 1")


def _named_sampler(text: str) -> tuple[str, str] | None:
    """A sampler a merge's name asks for ("dreamshaperXL_lightningDPMSDE")."""
    lowered = text.lower()
    return next(((sampler, schedule) for key, sampler, schedule in NAMED_SAMPLERS if key in lowered), None)


def _recognise(text: str) -> dict | None:
    lowered = text.lower().replace(" ", "")
    steps = _steps_in(text)
    if "hyper-sd" in lowered or "hypersd" in lowered or "hyper_sd" in lowered:
        return _hyper_sd(text, steps)
    if _has_word(text, "tcd"):
        steps = steps or 4
        return _settings("TCD", "Automatic", steps, 1.0, f"TCD: TCD sampler, {_count(steps)} (2-8), CFG 1")
    if _has_word(text, "lcm"):
        steps = steps or 4
        return _settings("LCM", "Automatic", steps, 1.0, f"LCM: LCM sampler, {_count(steps)} (2-8), CFG 1-2")
    if "lightning" in lowered:
        return _lightning(text, steps)
    if "turbo" in lowered:
        return _turbo(text, steps)
    return None


def recommended_settings(name: str, metadata: Mapping[str, str] | None = None, *,
                         is_lora: bool | None = None) -> dict | None:
    """The sampler, schedule type, steps and CFG scale a few-step checkpoint or LoRA wants, with
    a short "why" for the UI; None for a file that is not one. `name` is the listed file name
    (folders are ignored), `metadata` its safetensors metadata (kohya's ss_output_name and the
    model spec's title name the file when it was renamed). `is_lora`: what the caller knows
    (a prompt's <lora:...> tag); None: the metadata says."""
    lora = _is_lora(metadata) if is_lora is None else is_lora
    for text in _names(name, metadata):
        found = _recognise(text)
        if found is not None:
            if lora and "LoRA" not in found["why"]:
                found["why"] = (found["why"].replace(" model:", " LoRA:", 1) if " model:" in found["why"]
                                else found["why"] + " (a LoRA)")
            return found
    return None


def file_metadata(path: Path) -> dict[str, str]:
    """A file's own metadata (safetensors header, diffusers folder); {} for a pickle, whose
    reading would mean unpickling it, or a file that cannot be read."""
    path = Path(path)
    if not (path.is_dir() or path.suffix.lower() in (".safetensors", ".gguf")):
        return {}
    try:
        return dict(read_header(path).metadata)
    except (CheckpointError, OSError):
        return {}


def recommend_for_job(registry, checkpoint: str | None, prompt: str) -> dict | None:
    """"Use recommended settings" for a job on `checkpoint` with `prompt`: the first few-step
    LoRA among the prompt's <lora:...> tags (the user's latest choice), else the checkpoint. Its
    `recommended_settings` with `source` (the file's listed name) and `source_kind` ("lora" |
    "checkpoint"); None when neither is a few-step model. RequestError naming `checkpoint` for a
    name the listing does not have. LoRA tags naming no listed file are passed over."""
    _, networks = extract_extra_networks(prompt or "")
    candidates = [("lora", registry.find("lora", net.name)) for net in networks if net.is_lora]
    if checkpoint:
        file = registry.find("checkpoints", checkpoint)
        if file is None:
            raise RequestError("checkpoint", f"unknown checkpoint {checkpoint!r}")
        candidates.append(("checkpoint", file))
    for kind, file in candidates:
        if file is None:
            continue
        found = recommended_settings(file.name, file_metadata(file.path), is_lora=kind == "lora" or None)
        if found is None and kind == "checkpoint":
            found = distilled_settings(file.details)
        if found is not None:
            return {**found, "source": file.name, "source_kind": kind}
    return None


def distilled_settings(details: dict) -> dict | None:
    """A guidance-distilled checkpoint's own settings (Flux dev / schnell / Fill / Kontext: real CFG
    off), from the listing's details (`inspection.family_details`); None for any other checkpoint.
    An inpainting one (Flux Fill) or an edit model (Flux Kontext, guidance 2.5 as BFL's and
    diffusers' examples run it) also says where it runs and at which denoising strength."""
    wanted = details.get("recommended")
    if not wanted:
        return None
    why = (f"{details.get('variant', 'this model')} is guidance-distilled: {wanted['sampler']}, {wanted['steps']} "
           f"steps, CFG {wanted['cfg_scale']:g} (one pass)")
    if "distilled_cfg_scale" in wanted:
        why += f", Distilled CFG Scale {wanted['distilled_cfg_scale']:g}"
    if details.get("inpainting"):
        strength = wanted.get("denoising_strength")
        why += "; an inpainting model: use it in the Inpaint tab (or outpainting)" + (
            f" at denoising strength {strength:g}" if strength is not None else "")
    if details.get("edit_model"):
        why += ("; an edit model: put the picture to edit in img2img (or Inpaint) and say the change in the "
                f"prompt, at denoising strength {wanted.get('denoising_strength', 1.0):g}")
    return {"schedule_type": "Automatic", **wanted, "why": why}
