"""MergeRequest: A1111's Checkpoint Merger as a request, validated in one place.

Field names are those of A1111's merger (its UI's and `modules.extras.run_modelmerger`'s):
primary A, secondary B, tertiary C, `interp_method`, `multiplier` M, `save_as_half`,
`custom_name`, `bake_in_vae`. The methods:

- "Weighted sum":     A * (1 - M) + B * M
- "Add difference":   A + (B - C) * M
- "No interpolation": A as it is (to bake in a VAE or convert to fp16)

Inputs are single-file checkpoints from the listing: `.safetensors` (streamed) or `.ckpt` pickles
(read with weights only and copied to a temporary `.safetensors`, one at a time: a pickle cannot be
streamed); a diffusers folder or a GGUF file is refused with a message naming its field.
The result is a `.safetensors` file in the checkpoints folder, named `custom_name` (a plain
file name, never a path) or after its inputs as A1111 names it; an existing file is replaced
only with `overwrite`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipelines.core.request import RequestError

WEIGHTED_SUM = "Weighted sum"
ADD_DIFFERENCE = "Add difference"
NO_INTERPOLATION = "No interpolation"
INTERP_METHODS = (NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE)
NO_VAE = ("", "None")  # bake_in_vae values that bake nothing in
MERGE_SUFFIX = ".safetensors"
MAX_NAME_CHARS = 200
FORBIDDEN_NAME_CHARS = '/\\:*?"<>|\0'


@dataclass(frozen=True)
class MergeRequest:
    primary_model_name: str = ""
    secondary_model_name: str = ""
    tertiary_model_name: str = ""
    interp_method: str = WEIGHTED_SUM
    multiplier: float = 0.3  # A1111's default
    save_as_half: bool = True  # fp16 file; False keeps float32
    custom_name: str = ""
    bake_in_vae: str = "None"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("primary_model_name", "secondary_model_name", "tertiary_model_name", "custom_name",
                     "bake_in_vae", "interp_method"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, "")
            elif not isinstance(value, str):
                raise RequestError(name, f"must be a string, got {type(value).__name__}")
        if self.interp_method not in INTERP_METHODS:
            raise RequestError("interp_method", f"unknown method {self.interp_method!r}; one of: "
                               + ", ".join(INTERP_METHODS))
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) \
                or not math.isfinite(self.multiplier) or not 0.0 <= self.multiplier <= 1.0:
            raise RequestError("multiplier", f"must be a number from 0 to 1, got {self.multiplier!r}")
        object.__setattr__(self, "multiplier", float(self.multiplier))
        if not self.primary_model_name.strip():
            raise RequestError("primary_model_name", "choose the primary model (A)")
        if self.interp_method != NO_INTERPOLATION and not self.secondary_model_name.strip():
            raise RequestError("secondary_model_name", f"{self.interp_method} needs a secondary model (B)")
        if self.interp_method == ADD_DIFFERENCE and not self.tertiary_model_name.strip():
            raise RequestError("tertiary_model_name", "Add difference needs a tertiary model (C)")
        check_file_name(self.custom_name)

    def models(self) -> list[tuple[str, str]]:
        """(field, name) of the models the method reads, A first."""
        fields = ["primary_model_name"]
        if self.interp_method != NO_INTERPOLATION:
            fields.append("secondary_model_name")
        if self.interp_method == ADD_DIFFERENCE:
            fields.append("tertiary_model_name")
        return [(f, getattr(self, f)) for f in fields]

    @property
    def vae(self) -> str | None:
        """The VAE to bake in, None for none."""
        return None if self.bake_in_vae.strip() in NO_VAE else self.bake_in_vae.strip()

    def recipe(self, hashes: dict[str, str | None]) -> dict:
        """A1111's `sd_merge_recipe` (hashes: field -> sha256 of that model)."""
        return {
            "type": "webui",
            "primary_model_hash": hashes.get("primary_model_name"),
            "secondary_model_hash": hashes.get("secondary_model_name"),
            "tertiary_model_hash": hashes.get("tertiary_model_name"),
            "interp_method": self.interp_method,
            "multiplier": self.multiplier,
            "save_as_half": self.save_as_half,
            "custom_name": self.custom_name,
            "config_source": 0,
            "bake_in_vae": self.vae,
            "discard_weights": "",
            "is_inpainting": False,
            "is_instruct_pix2pix": False,
        }


def check_file_name(name: str) -> None:
    """`custom_name` is a plain file name in the checkpoints folder: no folders, no path."""
    if not name:
        return
    if name != name.strip():
        raise RequestError("custom_name", "must not start or end with spaces")
    bad = sorted({c for c in name if c in FORBIDDEN_NAME_CHARS or ord(c) < 32})
    if bad:
        raise RequestError("custom_name", f"must be a plain file name, without {' '.join(map(repr, bad))}")
    if name.startswith(".") or name in ("..", "."):
        raise RequestError("custom_name", "must not start with a dot")
    if len(name) > MAX_NAME_CHARS:
        raise RequestError("custom_name", f"at most {MAX_NAME_CHARS} characters")


def output_file_name(request: MergeRequest, stems: list[str]) -> str:
    """The merged file's name: `custom_name` (+ .safetensors), or A1111's way after the inputs:
    `A_0.7-B_0.3-Weighted_sum-merged.safetensors` (stems: the inputs' model names, A first)."""
    name = request.custom_name
    if name.lower().endswith(MERGE_SUFFIX):
        name = name[: -len(MERGE_SUFFIX)]
    if not name:
        m = request.multiplier
        if request.interp_method == NO_INTERPOLATION:
            name = stems[0]
        else:
            name = f"{stems[0]}_{round(1 - m, 2)}-{stems[1]}_{round(m, 2)}"
        name += "-" + request.interp_method.replace(" ", "_") + "-merged"
    return name + MERGE_SUFFIX


@dataclass
class MergeResult:
    name: str = ""  # the new file's name in the checkpoint listing ("" when nothing was saved)
    path: str = ""
    tensors: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.interrupted:
            return "Interrupted: nothing was saved."
        return f"Checkpoint saved to {self.path} ({self.tensors} tensors, {self.seconds:.1f} s)"
