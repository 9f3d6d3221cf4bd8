"""GGUF denoiser files (city96's / ComfyUI-GGUF's, as Forge and ComfyUI users share them):
which quantization types a file uses, whether we can compute with them, and its tensors as
diffusers' GGUF loader takes them, still quantized.

A GGUF file holds one module's weights in its original (single-file) layout, without the
`model.diffusion_model.` prefix, each tensor either plain (F32, F16, BF16) or quantized in
GGML blocks (Q4_0 .. Q8_0, the K-quants Q2_K .. Q6_K, ...). Quantized tensors stay as bytes,
views of the file's private mapping, wrapped in diffusers' `GGUFParameter`; diffusers'
`GGUFLinear` (with our decoders: `gguf_dequant`) dequantizes one layer's weight at a time when
it runs.
"""

from __future__ import annotations

import math
from collections import Counter

import gguf
import torch

from pipelines.models.checkpoint_file import CheckpointError, CheckpointHeader, gguf_tensor

GGUF_FORMAT = "gguf"
PLAIN_TYPES = ("F32", "F16", "BF16")  # stored at full or half precision: no blocks to decode
FLOAT_TYPES = ("F32", "F16")  # what diffusers loads as ordinary tensors (BF16 it decodes per layer)


def is_gguf(header: CheckpointHeader) -> bool:
    return header.format == GGUF_FORMAT


def quant_types(header: CheckpointHeader) -> Counter:
    """How many tensors of the file each GGML type holds ("Q4_0": 570, "F32": 12, ...)."""
    return Counter(entry[0] for entry in header.entries.values())


def main_quant_type(header: CheckpointHeader) -> str:
    """The type most of the weights' bytes are stored in: what the listing calls the file
    ("Q4_0"), as its name usually does too."""
    sizes: Counter = Counter()
    for kind, begin, end in header.entries.values():
        sizes[kind] += end - begin
    return sizes.most_common(1)[0][0] if sizes else "F32"


def supported_quant_types() -> frozenset[str]:
    """The GGML types diffusers can dequantize, and the plain ones."""
    # heavy: diffusers' GGUF module imports the quantizer machinery
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return frozenset({t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | set(PLAIN_TYPES))


def check_quant_types(header: CheckpointHeader) -> None:
    """A CheckpointError naming the file and the type when a tensor uses a GGML type we cannot
    compute with (e.g. the ternary TQ1_0 or the IQ2/IQ3 i-quants)."""
    supported = supported_quant_types()
    unknown = {kind: n for kind, n in quant_types(header).items() if kind not in supported}
    if unknown:
        kind, count = next(iter(unknown.items()))
        example = next(k for k, e in header.entries.items() if e[0] == kind)
        known = ", ".join(sorted(supported - set(PLAIN_TYPES)))
        raise CheckpointError(
            f"{header.path.name}: GGUF quantization type {kind} ({count} tensors, e.g. {example}) is not "
            f"supported; supported: {known}, F16, BF16, F32. Use a file quantized as Q8_0, Q5_K_M or Q4_K_S")


def decoded_per_layer(kind: str, shape) -> bool:
    """Whether a tensor stays as blocks that its linear layer decodes when it runs: 2-D and
    quantized (or BF16). F32 / F16 ones and the rest (convolutions, 1-D) load as plain tensors."""
    return kind not in FLOAT_TYPES and len(shape) == 2


def quantized_state(header: CheckpointHeader, prefix: str = "") -> dict[str, torch.Tensor]:
    """The file's tensors under `prefix`, names without it, for diffusers' GGUF loader: 2-D
    quantized or BF16 weights (the linear layers') as `GGUFParameter`s viewing the file, F32 and
    F16 as views, and the few quantized tensors that are not a linear layer's weight
    (convolutions, 1-D ones) dequantized, since only linear layers compute from blocks."""
    # heavy: diffusers' GGUF parameter type, only when loading
    from diffusers.quantizers.gguf.utils import GGUFParameter

    check_quant_types(header)
    state = {}
    for tensor in gguf.GGUFReader(header.path, mode="c").tensors:  # "c": private, writable, never written back
        if not tensor.name.startswith(prefix):
            continue
        name, kind = tensor.name[len(prefix):], tensor.tensor_type.name
        shape = header.shapes[tensor.name]
        if not decoded_per_layer(kind, shape):
            state[name] = gguf_tensor(tensor, header)
        else:
            state[name] = GGUFParameter(torch.from_numpy(tensor.data), quant_type=tensor.tensor_type)
    return state


def stored_bytes(header: CheckpointHeader, keys, compute_itemsize: int) -> int:
    """What these tensors take in memory once loaded: quantized (and BF16) linear weights their
    bytes as stored, F32/F16 ones and those dequantized at load (not 2-D) the compute dtype's."""
    total = 0
    for key in keys:
        kind, begin, end = header.entries[key]
        shape = header.shapes[key]
        total += (end - begin) if decoded_per_layer(kind, shape) else math.prod(shape) * compute_itemsize
    return total


def decoded_bytes(header: CheckpointHeader, keys, compute_itemsize: int) -> int:
    """What keeping these tensors' linear weights decoded adds (`--gguf-dequantize-once`):
    each weight its layer decodes, at the compute dtype, beside its blocks. Flux in bf16:
    about 24 GB more, beside a Q4_0 file's 6.8 GB."""
    return sum(math.prod(header.shapes[key]) * compute_itemsize for key in keys
               if decoded_per_layer(header.entries[key][0], header.shapes[key]))
