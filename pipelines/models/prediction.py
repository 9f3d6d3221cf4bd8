"""The prediction type of a checkpoint (epsilon or v), and where that answer came from.

In order: A1111's `<checkpoint>.yaml` beside the file, the file's metadata, then the
family's rule (SD 2.x: Stability's file names, else a probe of the U-Net once loaded).
A user override (kept by the registry) wins over all of it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipelines.core.prediction_types import EPSILON, V_PREDICTION
from pipelines.models.families import Family


def normalise_prediction(value: str | None) -> str | None:
    """'v', 'v-prediction', 'v_prediction' -> 'v_prediction'; 'eps', 'epsilon' -> 'epsilon'."""
    if value is None:
        return None
    v = str(value).strip().strip("\"'").lower().replace("-", "_")
    if v in ("v", "v_prediction", "vpred", "v_pred", "v_parameterization"):
        return V_PREDICTION
    if v in ("eps", "epsilon", "noise"):
        return EPSILON
    return None


def yaml_beside(path: Path) -> Path | None:
    for suffix in (".yaml", ".yml"):
        candidate = Path(path).with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def prediction_from_yaml(path: Path) -> str | None:
    """A1111's `<checkpoint>.yaml`: `model.params.parameterization: "v"`; LDM's default is eps."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        params = (config.get("model") or {}).get("params") or {}
    except Exception:  # an unreadable yaml is ignored, like a missing one
        return None
    return normalise_prediction(params.get("parameterization", "eps"))


def prediction_from_metadata(metadata: dict[str, str]) -> str | None:
    for key in ("modelspec.prediction_type", "prediction_type", "sd_prediction_type"):
        found = normalise_prediction(metadata.get(key))
        if found:
            return found
    if str(metadata.get("ss_v_parameterization", "")).lower() == "true":  # kohya's trainers
        return V_PREDICTION
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if arch.endswith("-v") or "v-prediction" in arch or "v_prediction" in arch:
        return V_PREDICTION
    return None


def prediction_from_name(path: Path) -> str | None:
    """Stability's SD 2.x file names: `768-v-ema`, `v2-1_768-ema-pruned` (v); `512-base-ema` (eps)."""
    stem = Path(path).stem.lower()
    if re.search(r"(^|[^0-9])768([^0-9]|$)", stem) or re.search(r"(^|[-_ .])v([-_ .]|$)", stem):
        return V_PREDICTION
    if re.search(r"(^|[^0-9])512([^0-9]|$)", stem) or "base" in stem:
        return EPSILON
    return None


def resolve_prediction(path: Path, metadata: dict[str, str], family: Family, inpainting: bool) -> tuple[str, str]:
    """(prediction type, where it came from): yaml beside the file, metadata, then the family rule.

    The family rule: epsilon, except SD 2.x (non-inpainting) files whose weights cannot say:
    the file name (Stability's names say 768 or v for the v models, 512 or base for the
    epsilon ones), else 'probe' — decided when loaded by running the U-Net once
    (`build.probe_v_prediction`). A user override (registry) wins over all of this.
    """
    found = yaml_beside(path)
    if found is not None:
        value = prediction_from_yaml(found)
        if value:
            return value, f"{found.name}"
    value = prediction_from_metadata(metadata)
    if value:
        return value, "file metadata"
    if family.prediction_undecidable and not inpainting:
        value = prediction_from_name(path)
        if value:
            return value, "file name"
        return EPSILON, "probe"
    return EPSILON, "family default"
