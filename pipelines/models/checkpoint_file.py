"""A checkpoint file as bytes: its format, its header, and its tensors read by name.

The format is sniffed from the content, never the file name: safetensors, GGUF (quantized
denoisers, read with the `gguf` package), a torch pickle/zip that only
`torch.load(weights_only=True)` may open, or a diffusers folder. The header (names, shapes,
dtypes, offsets, metadata) is all the listing ever reads.

Memory: a safetensors file is mapped once (private, read-only in practice). A tensor whose
dtype already is the run dtype stays a view of the mapping, so a model loaded at the
file's dtype costs no anonymous memory at all; a tensor is cast as it is read and the
file pages it came from are dropped from this process at once, so at no point do two
copies of a model (or of one component) live in RAM. A tensor to be cast is handed to the
kernel's read-ahead first, so a cold file is read in large chunks rather than page by page.
"""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from pipelines.models.families import DIFFUSERS_INDEX


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message says why, for the user."""


def sniff_format(path: Path) -> str:
    """'safetensors', 'gguf', 'torch' or 'diffusers' from the content; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        if (path / DIFFUSERS_INDEX).is_file():
            return "diffusers"
        raise CheckpointError(f"{path.name}: a folder without {DIFFUSERS_INDEX} is not a diffusers model")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"  # zip archive (torch.save) or legacy pickle
    raise CheckpointError(f"{path.name}: not a safetensors or PyTorch checkpoint file, nor a GGUF one")


def safetensors_data_start(path: Path) -> int:
    """Where a safetensors file's tensor data begins: after the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len


GGUF_MAGIC = b"GGUF"
# ComfyUI-GGUF's converter stores a tensor's real shape here when it had to reshape it for GGUF
GGUF_ORIG_SHAPE = "comfy.gguf.orig_shape."

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


@dataclass
class CheckpointHeader:
    path: Path
    format: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    # safetensors: name -> (dtype, begin, end) with offsets from the start of the file; GGUF: the
    # same with the GGML type's name ("Q4_0", "F16", ...) as the dtype
    entries: dict[str, tuple[str, int, int]] = field(default_factory=dict)


@contextlib.contextmanager
def no_gc():
    """Loading builds tens of thousands of objects (header entries, modules, tensors) and no
    garbage cycles; a full collection set off by them walks the whole heap, torch's and
    diffusers' half a million objects included (0.2 s, more than the rest of a warm load)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@no_gc()
def read_header(path: Path) -> CheckpointHeader:
    """Names, shapes and metadata. For safetensors this reads only the JSON header."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "diffusers":
        return CheckpointHeader(path, fmt, {}, diffusers_metadata(path))
    if fmt == "gguf":
        return read_gguf_header(path)
    if fmt == "safetensors":
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            size = path.stat().st_size
            metadata = header.pop("__metadata__", None) or {}
            shapes, entries, data_end = {}, {}, 0
            base = 8 + header_len
            for key, entry in header.items():
                shapes[key] = tuple(int(n) for n in entry["shape"])
                begin, end = (int(n) for n in entry["data_offsets"])
                entries[key] = (str(entry["dtype"]), base + begin, base + end)
                data_end = max(data_end, end)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path.name}: unreadable safetensors header ({exc})") from exc
        if base + data_end > size:
            raise CheckpointError(f"{path.name}: file is truncated ({size} bytes, header needs {base + data_end})")
        return CheckpointHeader(path, fmt, shapes, {str(k): str(v) for k, v in metadata.items()}, entries)
    state = torch_state_dict(path)
    return CheckpointHeader(path, fmt, {k: tuple(v.shape) for k, v in state.items()})


def read_gguf_header(path: Path) -> CheckpointHeader:
    """A GGUF file's tensor names with their shapes in torch's order (GGUF lists the innermost
    dimension first), each one's GGML type and byte range, and its text metadata: what
    `read_header` gives for safetensors, so family detection runs on it unchanged."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path, mode="r")
        # scalars and strings, and the shapes ComfyUI-GGUF kept (not e.g. a language model's vocabulary)
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if not name.startswith("GGUF.") and (field.types[:1] != [gguf.GGUFValueType.ARRAY]
                                                       or name.startswith(GGUF_ORIG_SHAPE))}
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path.name}: unreadable GGUF header ({exc})") from exc
    shapes, entries = {}, {}
    for tensor in reader.tensors:
        original = fields.get(GGUF_ORIG_SHAPE + tensor.name)
        shape = original if isinstance(original, list) else reversed(tensor.shape.tolist())
        shapes[tensor.name] = tuple(int(n) for n in shape)
        begin = int(tensor.data_offset)
        entries[tensor.name] = (tensor.tensor_type.name, begin, begin + int(tensor.n_bytes))
    metadata = {k: str(v) for k, v in fields.items()
                if not k.startswith(GGUF_ORIG_SHAPE) and isinstance(v, (str, int, float))}
    return CheckpointHeader(path, "gguf", shapes, metadata, entries)


def read_json(path: Path) -> dict:
    """A JSON file of a diffusers folder; CheckpointError naming it when unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(path).parent.name}/{Path(path).name}: unreadable ({exc})") from exc


def diffusers_metadata(folder: Path) -> dict[str, str]:
    """What a diffusers folder says about itself, in the shape of safetensors metadata."""
    index = read_json(Path(folder) / DIFFUSERS_INDEX)
    return {"diffusers.pipeline": str(index.get("_class_name", ""))}


def torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt file, opened with `weights_only` (never an arbitrary pickle)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # weights_only refuses arbitrary pickles: never retry without it
        raise CheckpointError(
            f"{path.name}: refused to load: it is not a plain weights file "
            f"(only tensors are allowed in .ckpt/.pt files; convert it to .safetensors). Detail: {exc}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


class TensorSource:
    """Reads tensors by name from a checkpoint: views of a private mmap for safetensors; GGUF
    tensors dequantized (a full-precision copy: `models.gguf_files` keeps them quantized)."""

    def __init__(self, header: CheckpointHeader):
        self.header = header
        self._map: mmap.mmap | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._gguf: dict | None = None

    def __enter__(self) -> TensorSource:
        if self.header.format == "gguf":
            self._gguf = {t.name: t for t in gguf.GGUFReader(self.header.path, mode="c").tensors}
        elif self.header.format == "safetensors":
            with open(self.header.path, "rb") as f:
                # ACCESS_COPY: a private mapping, so torch gets a writable buffer and nothing
                # can ever write back to the user's file
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        else:
            self._state = torch_state_dict(self.header.path)
        return self

    def __exit__(self, *exc) -> None:
        # tensors still viewing the mapping keep it alive; it is unmapped when the last one goes
        self._map = None
        self._state = None
        self._gguf = None

    def get(self, key: str, dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
        """The tensor: a view of the file, or, if `dtype` differs (floating point only) or a 4-D
        weight is wanted channels-last, a copy made in one pass whose file pages are dropped
        from this process at once."""
        tensor = self._view(key)
        cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
        relayout = channels_last and tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last)
        if cast or relayout:
            self._read_ahead(key)
            tensor = tensor.to(dtype=dtype if cast else tensor.dtype,
                               memory_format=torch.channels_last if relayout else torch.preserve_format)
            self.release([key])
        return tensor

    def _view(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        if self._gguf is not None:
            return gguf_tensor(self._gguf[key], self.header)
        dtype_name, begin, end = self.header.entries[key]
        shape = self.header.shapes[key]
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{self.header.path.name}: tensor {key} has unsupported dtype {dtype_name}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if begin % itemsize:  # a misaligned tensor (very old writers): copy just this one
            return torch.frombuffer(bytearray(self._map[begin:end]), dtype=dtype).reshape(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=begin).reshape(shape)

    def _read_ahead(self, key: str) -> None:
        """Have the kernel read a tensor about to be cast in one go, not page fault by page fault
        (a view that stays a view is left to be read when first used)."""
        if self._map is None or key not in self.header.entries or not hasattr(mmap, "MADV_WILLNEED"):
            return
        _, begin, end = self.header.entries[key]
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_WILLNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def with_prefix(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {k: self.get(k, dtype) for k in self.header.shapes if k.startswith(prefix)}

    def release(self, keys) -> None:
        """Drop the file pages of these tensors from this process (they were copied by a cast).

        On a private file mapping MADV_DONTNEED only forgets the pages: a later read of the
        same range faults them in again from the file, so this is safe even if a view of
        one of these tensors is still in use.
        """
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for key in keys:
            entry = self.header.entries.get(key)
            if entry is None:
                continue
            start = -(-entry[1] // page) * page
            stop = entry[2] // page * page
            if stop > start:
                try:
                    self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
                except (OSError, ValueError):
                    return


def gguf_tensor(tensor, header: CheckpointHeader) -> torch.Tensor:
    """One GGUF tensor at full precision in torch's shape: a view of the file for F32 and F16,
    else dequantized by the `gguf` package (float32), or a CheckpointError naming the type."""
    shape = header.shapes[tensor.name]
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(tensor.data).reshape(shape)
    try:
        values = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError as exc:
        raise CheckpointError(f"{header.path.name}: tensor {tensor.name} is stored as {kind.name}, "
                              "a GGUF type this program cannot read") from exc
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
