"""Forge's "VAE / Text Encoder" pick for one checkpoint: the request's module names resolved
through the listings and checked against the checkpoint's family, from headers only, before
anything loads.

For the flow families (SD 3.x, Flux) a chosen text encoder replaces the automatic pairing for
its kind (a chosen t5xxl_fp8 instead of the folder's first T5), and a 16-channel VAE (the VAE
list's or one among the modules, as Forge users keep ae.safetensors in models/text_encoder)
is the VAE of a transformer file without its own. What does not fit (CLIP-G for Flux, SD 1.5's
VAE for Flux, Flux's for SD 1.5, two T5s) is a RequestError naming the field and the file. The
U-Net families carry their own encoders: a chosen one is a warning that it was not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from pipelines.core.checks import RequestError
from pipelines.core.module_choice import FIELD
from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, read_header
from pipelines.models.families import BY_NAME, FLUX, SD3, Family
from pipelines.models.flux_build import separate_vae
from pipelines.models.flux_files import REQUIRED_ENCODERS as FLUX_ENCODERS
from pipelines.models.flux_files import flow_vae_prefix, vae_prefix
from pipelines.models.registry import ModelFile, ModelRegistry
from pipelines.models.sd3_files import (
    CLIP_G,
    CLIP_L,
    T5XXL,
    EncoderWeights,
    encoder_files,
    encoder_weights,
    encoders_inside,
)
from pipelines.models.sd3_files import REQUIRED_ENCODERS as SD3_ENCODERS

KIND_LABELS = {CLIP_L: "CLIP-L", CLIP_G: "CLIP-G", T5XXL: "T5-XXL"}
# the text encoders each flow family reads (U-Net families carry theirs inside the checkpoint)
FAMILY_ENCODERS = {FLUX.name: FLUX_ENCODERS, SD3.name: (*SD3_ENCODERS, T5XXL)}  # SD 3's T5 is optional
VAE_FIELD = "vae"


@dataclass(frozen=True)
class ModulePick:
    """What a checkpoint loads with beyond its own file: the user's encoder files by kind, and the
    16-channel VAE for a transformer file without one (None: automatic pairing)."""

    encoders: dict[str, EncoderWeights] = field(default_factory=dict)
    vae: Path | None = None
    warnings: tuple[str, ...] = ()

    def cache_key(self) -> tuple:
        """What makes a loaded model with this pick another one than with the automatic pairing."""
        files = tuple(sorted((kind, str(weights.header.path)) for kind, weights in self.encoders.items()))
        return files, str(self.vae) if self.vae else None


AUTOMATIC = ModulePick()


def beyond_automatic(pick: ModulePick, header: CheckpointHeader, text_encoder_dir: Path | None,
                     vae_dir: Path | None) -> ModulePick:
    """`pick` less what automatic pairing takes anyway (the folder's first file of a kind the checkpoint
    does not carry, the VAE found by name), so that the same modules are one cache entry however they
    were asked for."""
    if pick.cache_key() == AUTOMATIC.cache_key() or header.format == "diffusers":
        return pick
    automatic = {**encoder_files(text_encoder_dir), **encoders_inside(header)}
    encoders = {kind: weights for kind, weights in pick.encoders.items()
                if kind not in automatic or automatic[kind].header.path != weights.header.path}
    vae = None if pick.vae == separate_vae(header, vae_dir) else pick.vae
    return replace(pick, encoders=encoders, vae=vae)


def family_of(file: ModelFile) -> Family | None:
    return BY_NAME.get(file.details.get("family_id"))


def checked_vae(registry: ModelRegistry, file: ModelFile, choice: str | None, family: Family | None) -> Path | None:
    """The VAE file the request's `vae` means (None: baked in), checked to have the latents of the
    checkpoint's family: RequestError naming `vae` for an unknown name or a VAE of the other kind."""
    try:
        path = registry.resolve_vae(file, choice)
    except LookupError as exc:
        raise RequestError(VAE_FIELD, str(exc)) from exc
    if path is None or family is None:
        return path
    flow_vae = is_flow_vae(path)
    if family.name in FAMILY_ENCODERS and not flow_vae:
        raise RequestError(VAE_FIELD, f"{path.name} is not a 16-channel VAE; {family.label} needs its own "
                                      f"({'ae.safetensors' if family is FLUX else 'sd3_vae.safetensors'}) or "
                                      "Automatic")
    if family.name not in FAMILY_ENCODERS and flow_vae:
        raise RequestError(VAE_FIELD, f"{path.name} is a 16-channel VAE (SD 3 / Flux); {family.label} needs a "
                                      "4-channel one, or Automatic")
    return path


def is_flow_vae(path: Path) -> bool:
    try:
        return flow_vae_prefix(read_header(path).shapes) is not None
    except (CheckpointError, OSError):
        return False  # unreadable: the load says why


def listed_module(registry: ModelRegistry, name: str) -> ModelFile:
    """A module name as models/text_encoder (or, for a VAE among Forge's modules, models/VAE) lists it."""
    found = registry.find("text_encoders", name) or registry.find("vae", name)
    if found is None:
        names = ", ".join(f.name for f in registry.list("text_encoders")) or "none"
        raise RequestError(FIELD, f"unknown text encoder {name!r}; available in models/text_encoder: {names}")
    return found


def read_modules(registry: ModelRegistry, names: Sequence[str]) -> tuple[dict[str, EncoderWeights], Path | None]:
    """The named files as encoders by kind and at most one 16-channel VAE; RequestError naming the
    field for a file that is neither, two of a kind, or two VAEs."""
    encoders: dict[str, EncoderWeights] = {}
    vae = None
    for name in names:
        module = listed_module(registry, name)
        try:
            header = read_header(module.path)
        except (CheckpointError, OSError) as exc:
            raise RequestError(FIELD, f"{module.name} could not be read ({exc})") from exc
        weights = encoder_weights(header)
        if weights is not None:
            if weights.name in encoders:
                raise RequestError(FIELD, f"{encoders[weights.name].header.path.name} and {module.name} are both "
                                          f"{KIND_LABELS[weights.name]}; choose one")
            encoders[weights.name] = weights
        elif flow_vae_prefix(header.shapes) is not None:
            if vae is not None:
                raise RequestError(FIELD, f"{vae.name} and {module.name} are both VAEs; choose one")
            vae = module.path
        else:
            raise RequestError(FIELD, f"{module.name} is neither a text encoder (CLIP-L, CLIP-G, T5-XXL) "
                                      "nor a 16-channel VAE")
    return encoders, vae


def lacks_vae(file: ModelFile) -> bool:
    """A transformer file without its VAE (BFL's bare flux1-dev, SD 3 GGUF files)."""
    try:
        header = read_header(file.path)
    except (CheckpointError, OSError):
        return False  # the load says why
    return header.format != "diffusers" and vae_prefix(header.shapes) is None


def pick_modules(registry: ModelRegistry, file: ModelFile, text_encoders: Sequence[str] = (),
                 vae: str | None = None) -> ModulePick:
    """The checked pick for `file`: RequestError naming `text_encoders` or `vae` (and the file) for a
    name that is not listed or does not fit the checkpoint's family; reads headers only."""
    family = family_of(file)
    vae_path = checked_vae(registry, file, vae, family)
    if not text_encoders and (vae_path is None or family is None or family.name not in FAMILY_ENCODERS):
        return AUTOMATIC
    encoders, module_vae = read_modules(registry, text_encoders)
    if family is None or family.name not in FAMILY_ENCODERS:
        label = family.label if family else "these"
        if module_vae is not None:
            raise RequestError(FIELD, f"{module_vae.name} is a 16-channel VAE (SD 3 / Flux); {label} checkpoints "
                                      "use a 4-channel one")
        used = ", ".join(w.header.path.name for w in encoders.values())
        return ModulePick(warnings=(f"text encoders: {used} not used; {label} checkpoints carry their own",))
    wanted = FAMILY_ENCODERS[family.name]
    for kind, weights in encoders.items():
        if kind not in wanted:
            readable = " and ".join(KIND_LABELS[k] for k in wanted)
            raise RequestError(FIELD, f"{weights.header.path.name} is {KIND_LABELS[kind]}, not a text encoder of "
                                      f"{family.label} (it reads {readable})")
    if vae_path is not None and module_vae is not None and vae_path != module_vae:
        raise RequestError(FIELD, f"{module_vae.name} is a VAE and the VAE is already {vae_path.name}; "
                                  "choose one")
    chosen_vae = vae_path or module_vae
    if file.details.get("format") == "diffusers" or file.path.is_dir():
        return ModulePick(warnings=(f"{file.name} is a diffusers folder: it loads its own text encoders and "
                                    "VAE; the chosen ones were not used",) if encoders or module_vae else ())
    lacking, warnings = lacks_vae(file), ()
    if module_vae is not None and not lacking:
        warnings = (f"{module_vae.name} not used: {file.name} has its own VAE (choose a VAE in the VAE list "
                    "to replace it)",)
    # a VAE chosen for a file that has its own is swapped in after loading (as for every family)
    return ModulePick(encoders, chosen_vae if lacking else None, warnings)
