"""The checkpoint merger (A1111's Checkpoint Merger tab), streaming over the mapped inputs.

`plan` checks a `MergeRequest` against the listings before anything is queued: every name
resolves, every input is a single file (`.safetensors`, or a `.ckpt`/`.pt` pickle) of the primary
model's family, every tensor the method combines has the same shape in each input, the VAE to
bake in fits, and the output name is free (or `overwrite` is set). Diffusers folders and GGUF
files are refused (a folder is a different key layout; GGUF weights are quantized) with a
message naming the field. `run` then hashes the inputs (A1111's
`sd_merge_recipe` / `sd_merge_models` metadata name them by sha256) and `write_merged` writes
the result one tensor at a time: the safetensors header is known up front (names, shapes,
the output dtype), so each merged tensor is written as soon as it is computed and the file
pages of the inputs it came from are dropped at once. Peak memory is a few tensors (the
largest one, in float32, times about four), not a model; the output goes to a temporary
file renamed into place at the end, so an interrupt or an error leaves nothing behind.

A pickle cannot be streamed: it has no header of offsets to read one tensor from, and
`torch.load` (always `weights_only=True`, never retried without it) gives all of it at once
(a zip-format file as views of a mapping, an old-style one in RAM). So each pickle input is read
on its own, one at a time, and copied tensor by tensor into a temporary `.safetensors` beside
the output (freeing each tensor as it is written); the merge then streams over those. Peak
memory is one pickled model, and the copies need their size in free disk space until the end.
The plan says so in its notes, which the result repeats as warnings.
"""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
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
    torch_state_dict,
)
from pipelines.models.families import EMA_PREFIX, VAE_PREFIX
from pipelines.models.inspection import inspect_checkpoint
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
    notes: list[str] = field(default_factory=list)  # what the user should know (pickled inputs)
    inpainting: bool = False  # the primary model is an inpainting one (the recipe says so)


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
    facts = [_facts(file, header) for (_, file), header in zip(files, headers)]
    for (name_field, file), header, fact in zip(files[1:], headers[1:], facts[1:]):
        if fact.get("family_id") != facts[0].get("family_id"):
            raise RequestError(name_field, f"{file.name} is a {fact.get('family')} model and {primary.name} a "
                               f"{facts[0].get('family')} model: models of different families cannot be merged")
        _check_shapes(name_field, headers[0], header, file.name)
    target = Path(folder) / output_file_name(request, [f.model_name for _, f in files])
    if target.exists() and not request.overwrite:
        raise RequestError("custom_name", f"{target.name} already exists in the checkpoints folder; "
                           "choose another name or set overwrite")
    merge_plan = MergePlan(request, headers, target, files, inpainting=bool(facts[0].get("inpainting")))
    if request.vae is not None:
        merge_plan.vae, merge_plan.vae_keys = _vae_keys(registry, request.vae, headers[0])
    merge_plan.notes = [f"{h.path.name} is a pickle, which cannot be streamed: it was read whole (weights only) "
                        "and copied to a temporary .safetensors first" for h in pickled(merge_plan)]
    return merge_plan


def pickled(merge_plan: MergePlan) -> list[CheckpointHeader]:
    """The inputs (VAE included) that are torch pickles rather than safetensors."""
    return [h for h in (*merge_plan.headers, merge_plan.vae) if h is not None and h.format == "torch"]


def _facts(file: ModelFile, header: CheckpointHeader) -> dict:
    """Family and inpainting of an input: the listing's, or for a pickle (which the listing does not
    open) read from the names and shapes just loaded."""
    if header.format != "torch":
        return file.details
    spec = inspect_checkpoint(header)
    return {"family_id": spec.family.name, "family": spec.description, "inpainting": spec.inpainting}


def _single_file_header(name_field: str, file: ModelFile) -> CheckpointHeader:
    if file.path.is_dir():
        raise RequestError(name_field, f"{file.name} is a diffusers folder: the merger reads single-file "
                           "checkpoints (.safetensors, .ckpt, .pt) in the original layout")
    if "error" in file.details:
        raise RequestError(name_field, f"{file.name} is unreadable: {file.details['error']}")
    try:
        kind = sniff_format(file.path)
        if kind == "gguf":
            raise RequestError(name_field, f"{file.name} is a quantized GGUF file: its weights cannot be "
                               "merged; use the full-precision .safetensors it was made from")
        return read_header(file.path)  # a pickle: torch.load(weights_only=True), refused if it holds more
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
    recipe["is_inpainting"] = merge_plan.inpainting
    metadata = {"format": "pt", "sd_merge_recipe": json.dumps(recipe),
                "sd_merge_models": json.dumps(models)}
    try:
        count = write_merged(merge_plan, metadata, control, on_progress)
    except MergeInterrupted:
        return MergeResult(interrupted=True, seconds=time.monotonic() - started)
    registry.list("checkpoints", refresh=True)
    result = MergeResult(name=merge_plan.target.name, path=str(merge_plan.target), tensors=count,
                         seconds=time.monotonic() - started, warnings=list(merge_plan.notes))
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
    """Write the merged checkpoint to `merge_plan.target`, one tensor at a time; the number of tensors.
    Pickled inputs are first copied to temporary safetensors, one at a time (counted in the progress)."""
    request, primary = merge_plan.request, merge_plan.headers[0]
    keys = list(primary.shapes)
    clock = ProgressClock(len(keys) + sum(len(h.shapes) for h in pickled(merge_plan)), 1, on_progress)

    def tick() -> None:  # after each tensor written
        clock.step_done(0, clock.done + 1)
        if control is not None and control.interrupted:
            raise MergeInterrupted()

    with contextlib.ExitStack() as stack:
        headers = [*merge_plan.headers, merge_plan.vae]
        if pickled(merge_plan):  # a hidden folder beside the output: same disk, left out of the listing
            folder = tempfile.TemporaryDirectory(prefix=".merge-", dir=merge_plan.target.parent)
            temp = Path(stack.enter_context(folder))
            headers = [as_safetensors(h, temp / f"{i}.safetensors", tick) if h is not None and h.format == "torch"
                       else h for i, h in enumerate(headers)]
        *headers, vae_header = headers
        dtypes = {k: _output_dtype(headers[0].entries[k][0], request.save_as_half) for k in keys}
        sources = [stack.enter_context(TensorSource(h)) for h in headers]
        vae = stack.enter_context(TensorSource(vae_header)) if vae_header is not None else None
        out = stack.enter_context(atomic_path(merge_plan.target))

        def merged_tensors() -> Iterable[torch.Tensor]:
            for key in keys:
                yield _merged(key, request, sources, vae, merge_plan.vae_keys)
                for source, h in zip(sources, headers):
                    if key in h.entries:
                        source.release([key])
                tick()

        layout = {k: (dtypes[k], headers[0].shapes[k]) for k in keys}
        write_safetensors(out, layout, metadata, merged_tensors())
    return len(keys)


def write_safetensors(path: Path, layout: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None,
                      tensors: Iterable[torch.Tensor]) -> None:
    """A safetensors file written as `tensors` come (in `layout`'s order, cast to its dtype names):
    the header is known up front, so no tensor waits for another."""
    header, offset = {}, 0
    for key, (dtype_name, shape) in layout.items():
        size = _numel(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype_name]).element_size()
        header[key] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (dtype_name, _), tensor in zip(layout.values(), tensors, strict=True):
            tensor = tensor.to(SAFETENSORS_DTYPES[dtype_name]).contiguous()
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor


def as_safetensors(header: CheckpointHeader, path: Path, tick: Callable[[], None]) -> CheckpointHeader:
    """A pickled checkpoint copied to a safetensors file at `path` (its header returned): read once
    with weights only, each tensor dropped from memory once written; `tick` after each tensor."""
    state = torch_state_dict(header.path)
    unsupported = sorted({str(t.dtype) for t in state.values() if t.dtype not in DTYPE_NAMES})
    if unsupported:
        raise CheckpointError(f"{header.path.name}: tensors of type {', '.join(unsupported)} cannot be merged")
    layout = {k: (DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in state.items()}

    def drained() -> Iterable[torch.Tensor]:
        for key in layout:
            yield state.pop(key)
            tick()

    write_safetensors(path, layout, None, drained())
    return read_header(path)


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
