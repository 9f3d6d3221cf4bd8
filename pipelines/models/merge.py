"""The checkpoint merger (A1111's Checkpoint Merger tab), streaming over the mapped inputs.

`plan` checks a `MergeRequest` against the listings before anything is queued: every name
resolves, every input is a single-file `.safetensors` of the primary model's family, every
tensor the method combines has the same shape in each input, the VAE to bake in fits, and
the output name is free (or `overwrite` is set). `run` then hashes the inputs (A1111's
`sd_merge_recipe` / `sd_merge_models` metadata name them by sha256) and `write_merged` writes
the result one tensor at a time: the safetensors header is known up front (names, shapes,
the output dtype), so each merged tensor is written as soon as it is computed and the file
pages of the inputs it came from are dropped at once. Peak memory is a few tensors (the
largest one, in float32, times about four), not a model; the output goes to a temporary
file renamed into place at the end, so an interrupt or an error leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.core.fileio import atomic_path
from pipelines.core.merge_request import (
    ADD_DIFFERENCE,
    NO_INTERPOLATION,
    WEIGHTED_SUM,
    MergeRequest,
    MergeResult,
    output_file_name,
)
from pipelines.core.progress import JobControl, ProgressCallback, ProgressClock
from pipelines.core.request import RequestError
from pipelines.models.checkpoint_file import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    CheckpointHeader,
    TensorSource,
    read_header,
    sniff_format,
)
from pipelines.models.families import EMA_PREFIX, VAE_PREFIX
from pipelines.models.registry import ModelFile, ModelRegistry

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MergeInterrupted(Exception):
    """The user stopped the merge; the temporary file is removed."""


@dataclass
class MergePlan:
    request: MergeRequest
    headers: list[CheckpointHeader]  # A, then B and C as the method reads them
    target: Path
    files: list[tuple[str, ModelFile]] = field(default_factory=list)  # (request field, listed file)
    vae: CheckpointHeader | None = None
    vae_keys: dict[str, str] = field(default_factory=dict)  # output key -> key in the VAE file


def plan(registry: ModelRegistry, request: MergeRequest, folder: Path) -> MergePlan:
    """Check the request against the listings (RequestError naming the field); nothing is read
    but headers."""
    files: list[tuple[str, ModelFile]] = []
    headers: list[CheckpointHeader] = []
    for name_field, name in request.models():
        file = registry.find("checkpoints", name)
        if file is None:
            names = ", ".join(f.name for f in registry.list("checkpoints")) or "none"
            raise RequestError(name_field, f"unknown checkpoint {name!r}; available: {names}")
        headers.append(_single_file_header(name_field, file))
        files.append((name_field, file))
    primary = files[0][1]
    family = primary.details.get("family_id")
    for (name_field, file), header in zip(files[1:], headers[1:]):
        if file.details.get("family_id") != family:
            raise RequestError(name_field, f"{file.name} is a {file.family} model and {primary.name} a "
                               f"{primary.family} model: models of different families cannot be merged")
        _check_shapes(name_field, headers[0], header, file.name)
    target = Path(folder) / output_file_name(request, [f.model_name for _, f in files])
    if target.exists() and not request.overwrite:
        raise RequestError("custom_name", f"{target.name} already exists in the checkpoints folder; "
                           "choose another name or set overwrite")
    merge_plan = MergePlan(request, headers, target, files)
    if request.vae is not None:
        merge_plan.vae, merge_plan.vae_keys = _vae_keys(registry, request.vae, headers[0])
    return merge_plan


def _single_file_header(name_field: str, file: ModelFile) -> CheckpointHeader:
    if "error" in file.details:
        raise RequestError(name_field, f"{file.name} is unreadable: {file.details['error']}")
    try:
        if file.path.is_dir() or sniff_format(file.path) != "safetensors":
            raise RequestError(name_field, f"{file.name}: only single-file .safetensors checkpoints can be "
                               "merged (convert it first)")
        return read_header(file.path)
    except CheckpointError as exc:
        raise RequestError(name_field, str(exc)) from exc


def _check_shapes(name_field: str, primary: CheckpointHeader, other: CheckpointHeader, name: str) -> None:
    for key, shape in primary.shapes.items():
        theirs = other.shapes.get(key)
        if theirs is not None and theirs != shape:
            raise RequestError(name_field, f"{name}: tensor {key} has shape {list(theirs)} but "
                               f"{list(shape)} in the primary model; these models cannot be merged")


def _vae_keys(registry: ModelRegistry, name: str, primary: CheckpointHeader) -> tuple[CheckpointHeader, dict]:
    """The VAE file and which of its tensors replace which `first_stage_model.` weights."""
    file = registry.find("vae", name)
    if file is None:
        names = ", ".join(f.name for f in registry.list("vae")) or "none"
        raise RequestError("bake_in_vae", f"unknown VAE {name!r}; available: {names}")
    header = _single_file_header("bake_in_vae", file)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in header.shapes) else ""
    if any(k.startswith(prefix + "encoder.down_blocks.") for k in header.shapes):
        raise RequestError("bake_in_vae", f"{file.name} is in diffusers layout; only original-layout VAE "
                           "files (encoder.down.0...) can be baked in")
    keys = {}
    for key, shape in header.shapes.items():
        if not key.startswith(prefix) or key.startswith((prefix + "loss.", EMA_PREFIX)):
            continue
        target = VAE_PREFIX + key[len(prefix):]
        if target not in primary.shapes:
            continue
        if primary.shapes[target] != shape:
            raise RequestError("bake_in_vae", f"{file.name}: {key} has shape {list(shape)}, the checkpoint's "
                               f"{list(primary.shapes[target])}; this VAE does not fit the model")
        keys[target] = key
    if not keys:
        raise RequestError("bake_in_vae", f"{file.name} has no weights of this checkpoint's VAE")
    return header, keys


def run(merge_plan: MergePlan, registry: ModelRegistry, control: JobControl | None = None,
        on_progress: ProgressCallback | None = None) -> MergeResult:
    """Hash the inputs, write the merged file with A1111's merge metadata; the listing is refreshed."""
    started = time.monotonic()
    hashes, models = {}, {}
    for (name_field, file), header in zip(merge_plan.files, merge_plan.headers):
        hashes[name_field] = registry.ensure_hash(file)
        models[file.sha256] = {"name": file.name, "legacy_hash": file.legacy_hash,
                               "sd_merge_recipe": _json(header.metadata.get("sd_merge_recipe"))}
        models.update(_json(header.metadata.get("sd_merge_models")) or {})
    recipe = merge_plan.request.recipe(hashes)
    recipe["is_inpainting"] = bool(merge_plan.files[0][1].details.get("inpainting"))
    metadata = {"format": "pt", "sd_merge_recipe": json.dumps(recipe),
                "sd_merge_models": json.dumps(models)}
    try:
        count = write_merged(merge_plan, metadata, control, on_progress)
    except MergeInterrupted:
        return MergeResult(interrupted=True, seconds=time.monotonic() - started)
    registry.list("checkpoints", refresh=True)
    result = MergeResult(name=merge_plan.target.name, path=str(merge_plan.target), tensors=count,
                         seconds=time.monotonic() - started)
    others = merge_plan.headers[1:]
    only_a = sum(1 for k in merge_plan.headers[0].shapes if any(k not in h.shapes for h in others))
    if only_a:
        result.warnings.append(f"{only_a} tensors of the primary model are missing from the other "
                               "model(s) and were kept as they are in the primary model")
    return result


def _json(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def write_merged(merge_plan: MergePlan, metadata: dict[str, str], control: JobControl | None = None,
                 on_progress: ProgressCallback | None = None) -> int:
    """Write the merged checkpoint to `merge_plan.target`, one tensor at a time; the number of tensors."""
    request, primary = merge_plan.request, merge_plan.headers[0]
    keys = list(primary.shapes)
    dtypes = {k: _output_dtype(primary.entries[k][0], request.save_as_half) for k in keys}
    header, offset = {}, 0
    for key in keys:
        size = _numel(primary.shapes[key]) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtypes[key]]).element_size()
        header[key] = {"dtype": dtypes[key], "shape": list(primary.shapes[key]),
                       "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    clock = ProgressClock(len(keys), 1, on_progress)
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(TensorSource(h)) for h in merge_plan.headers]
        vae = stack.enter_context(TensorSource(merge_plan.vae)) if merge_plan.vae is not None else None
        out = stack.enter_context(atomic_path(merge_plan.target))
        with open(out, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for i, key in enumerate(keys):
                if control is not None and control.interrupted:
                    raise MergeInterrupted()
                tensor = _merged(key, request, sources, vae, merge_plan.vae_keys)
                tensor = tensor.to(SAFETENSORS_DTYPES[dtypes[key]]).contiguous()
                if tensor.numel():
                    f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
                for source, h in zip(sources, merge_plan.headers):
                    if key in h.entries:
                        source.release([key])
                clock.step_done(0, i + 1)
    return len(keys)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _output_dtype(dtype_name: str, half: bool) -> str:
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype not in FLOAT_DTYPES:
        return dtype_name  # integers and the like are copied as they are
    return DTYPE_NAMES[torch.float16 if half else torch.float32]


def _merged(key: str, request: MergeRequest, sources: list[TensorSource], vae: TensorSource | None,
            vae_keys: dict[str, str]) -> torch.Tensor:
    """One output tensor, in float32 for floating point tensors."""
    if vae is not None and key in vae_keys:
        return vae.get(vae_keys[key], torch.float32)
    a = sources[0].get(key)
    if a.dtype not in FLOAT_DTYPES:
        return a
    a = a.to(torch.float32)
    m = request.multiplier
    others = [s.get(key, torch.float32) if key in s.header.shapes else None for s in sources[1:]]
    if request.interp_method == NO_INTERPOLATION or any(o is None for o in others):
        return a  # a tensor only A has stays A's (A1111 keeps it too)
    if request.interp_method == WEIGHTED_SUM:
        return a * (1 - m) + others[0] * m
    if request.interp_method == ADD_DIFFERENCE:
        return a + (others[0] - others[1]) * m
    raise AssertionError(request.interp_method)
