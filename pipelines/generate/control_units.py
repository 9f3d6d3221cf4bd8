"""A request's control units made ready for one job: each active unit's control model found in
models/ControlNet, checked against the checkpoint's family, loaded through the model cache, and
its map made at the job's size. Errors name the unit's field: `control_units[1].model`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

from pipelines.core.checks import RequestError
from pipelines.core.control import ControlUnit
from pipelines.core.control_infotext import control_model_title
from pipelines.core.control_modules import INPAINT_MODULES, find_preprocessor
from pipelines.core.request import GenerationRequest
from pipelines.core.settings import Paths
from pipelines.generate.control import LoadedControl
from pipelines.generate.control_preprocess import prepare_control_image, prepare_control_mask
from pipelines.models.families import BY_NAME
from pipelines.models.registry import ModelFile, ModelRegistry

CONTROL_KIND = "controlnet"  # core.settings.MODEL_KINDS: models/ControlNet


@dataclass
class JobControls:
    """What a job's units became: the loaded units, and their models' titles for the infotext
    ({unit index: "name [hash]"})."""

    loaded: list[LoadedControl] = field(default_factory=list)
    titles: dict[int, str] = field(default_factory=dict)


def unit_field(index: int, name: str) -> str:
    return f"control_units[{index}].{name}"


def find_control_file(registry: ModelRegistry, index: int, unit: ControlUnit, family: str) -> ModelFile:
    """The unit's control model file, fit for a checkpoint of `family` (a Family name)."""
    file = registry.find(CONTROL_KIND, unit.model)
    if file is None:
        names = ", ".join(f.name for f in registry.list(CONTROL_KIND)) or "none (put files into models/ControlNet)"
        raise RequestError(unit_field(index, "model"), f"unknown control model {unit.model!r}; available: {names}")
    details = file.details or {}
    if details.get("error"):
        raise RequestError(unit_field(index, "model"), f"{file.name} cannot be used: {details['error']}")
    theirs = details.get("family")
    if theirs != family:
        label = BY_NAME[theirs].label if theirs in BY_NAME else (theirs or "an unknown family")
        raise RequestError(unit_field(index, "model"),
                           f"{file.name} is a control model for {label}; the checkpoint is "
                           f"{BY_NAME[family].label if family in BY_NAME else family}: choose one made for it")
    return file


def prepare(request: GenerationRequest, *, registry: ModelRegistry, load_control, paths: Paths, family: str,
            size: tuple[int, int], device: str = "cpu", skip: Collection[int] = ()) -> JobControls:
    """Each active unit of `request` loaded (`load_control(file) -> module`) with its map at `size`;
    the units at the indices in `skip` are left out (image prompts: generate/ip_adapter.py).

    Everything is checked before any control model loads, so a bad unit costs no loading."""
    width, height = size
    active = [(i, unit) for i, unit in enumerate(request.control_units) if unit.active and i not in skip]
    files = [find_control_file(registry, i, unit, family) for i, unit in active]
    for index, unit in active:
        try:
            find_preprocessor(unit.module)
        except RequestError as exc:
            raise RequestError(unit_field(index, exc.field), exc.message) from None
    job = JobControls()
    for (index, unit), file in zip(active, files):
        try:
            image = prepare_control_image(unit, width, height, request.init_image, paths=paths,
                                          init_mask=request.mask, seed=request.seed, device=device)
            mask = prepare_control_mask(unit, width, height, request.mask) if needs_mask(unit) else None
        except RequestError as exc:
            raise RequestError(unit_field(index, exc.field), exc.message) from None
        job.loaded.append(LoadedControl(unit, load_control(file), image, mask))
        registry.ensure_hash(file)  # once per file (cached): the infotext names it "name [hash]"
        job.titles[index] = control_model_title(file)
    return job


def needs_mask(unit: ControlUnit) -> bool:
    """The inpaint ControlNet reads the masked pixels as -1: its preprocessors keep the mask."""
    return find_preprocessor(unit.module).name in INPAINT_MODULES
