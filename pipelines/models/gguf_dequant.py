"""GGUF blocks to weights, fast on the CPU: what each GGUF linear layer runs on every step.

diffusers' torch port of the GGML decoders (`dequantize_gguf_tensor`) computes in float16
(rounding each product, then again to bf16), unpacks the bits through many small broadcast
ops on strided views of 16-32 byte fields (short rows: scalar loops), each allocating a fresh
full-size tensor (page faults on every pass), and casts to the run dtype as one more pass.
Measured (bench/gguf_dequant.py, 2-core CPU, one thread): a 12288x3072 Q4_0 weight took 371
ms to decode, as long as its bf16 matmul with 4096 tokens (412 ms); at 512x512 Flux (1024
tokens) decoding was three quarters of each layer's time. Ours: 95 ms.

Here each type is decoded as the `gguf` package's numpy code does it (float32 scales, the
same products and sums in the same order, so the float32 result is bit-identical to
`gguf.quants.dequantize`), with fewer passes: the packed quants are unpacked into one uint8
tensor of the values, converted to float32 once, scaled and offset in place, and cast to the
run dtype once. Rounding to bf16 / fp16 happens only in that last cast, as it would from the
reference's float32. Types without a fast decoder here fall back to diffusers' own.

`fast_gguf_linear_class()` is diffusers' `GGUFLinear` running these decoders, with an
optional `keep_dequantized` mode (each layer decoded once, on its first step, and kept in the
run dtype: steps as fast as a bf16 model, memory as a bf16 model - the trade-off GGUF files
are usually chosen to avoid, so it is only ever switched on explicitly).
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache

import gguf
import torch

QK_K = 256  # values in a K-quant super-block
Q = gguf.GGMLQuantizationType


class Scratch:
    """Buffers reused from one layer's decode to the next: a fresh 150 MB tensor costs its page
    faults every time (measured: a float32 copy 59 ms into a new tensor, 21 ms into a reused
    one), so the unpacked quants, their float32 values and the decoded weight a layer drops
    after its matmul live here, about 8 bytes a value of the largest weight (Flux's 15360x3072:
    380 MB). One set for the process, not one a thread (a server's many threads would each
    hold one): `lock` is held while they are in use. `release_scratch()` gives them back."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.lock = threading.RLock()

    def take(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count, key = math.prod(shape), (name, dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = self.buffers[key] = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count].view(shape)


SCRATCH = Scratch()


def release_scratch() -> None:
    """Drop the decode buffers (when no GGUF model is loaded any more)."""
    with SCRATCH.lock:
        SCRATCH.buffers.clear()


# --- the pieces every decoder shares ------------------------------------------------------------

def half_scale(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field at byte `offset` of each block, as float32, shape (blocks, 1)."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k) uint8: the low nibbles, then the high ones (GGML's order
    within a group: the first k values in the low halves, the next k in the high halves)."""
    packed = packed.contiguous()  # the fields of a block are short: ops on a strided view run 2x slower
    out = SCRATCH.take("quants", (*packed.shape[:-1], 2, packed.shape[-1]), torch.uint8, packed.device)
    torch.bitwise_and(packed, 0x0F, out=out[..., 0, :])
    torch.bitwise_right_shift(packed, 4, out=out[..., 1, :])
    return out


def high_bits(packed: torch.Tensor, count: int, width: int = 1) -> torch.Tensor:
    """(..., k) bytes -> (..., count, k): field i is bits [i*width, (i+1)*width) of each byte,
    moved up to bit 4 (the high bits that go on top of a nibble)."""
    packed = packed.contiguous()  # as in `nibbles`
    out = SCRATCH.take("high", (*packed.shape[:-1], count, packed.shape[-1]), torch.uint8, packed.device)
    for i in range(count):
        torch.bitwise_right_shift(packed, i * width, out=out[..., i, :])
    return out.bitwise_and_((1 << width) - 1).bitwise_left_shift_(4)


def scaled(quants: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None, *,
           offset: int = 0) -> torch.Tensor:
    """float32 `(quants - offset) * scale (+ shift)`, the reference's order of operations,
    computed in place on one float32 copy of the quants (`quants`, unsigned, are changed when
    there is an `offset`). The result is a scratch buffer: the caller copies it out before the
    next decode."""
    if offset:  # on the bytes (a quarter of the float32 traffic): q - offset wraps to the right int8
        quants = quants.sub_(offset).view(torch.int8)
    values = SCRATCH.take("values", quants.shape, torch.float32, quants.device).copy_(quants)
    values.mul_(scale)
    if shift is not None:
        values.add_(shift)
    return values


# --- the block types ---------------------------------------------------------------------------

def q8_0(blocks: torch.Tensor) -> torch.Tensor:  # d, 32 x int8
    return scaled(blocks[:, 2:].view(torch.int8), half_scale(blocks, 0))


def q4_0(blocks: torch.Tensor) -> torch.Tensor:  # d, 16 bytes of nibbles; q - 8
    return scaled(nibbles(blocks[:, 2:]).view(-1, 32), half_scale(blocks, 0), offset=8)


def q4_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, 16 bytes of nibbles; d * q + m
    return scaled(nibbles(blocks[:, 4:]).view(-1, 32), half_scale(blocks, 0), half_scale(blocks, 2))


def five_bit(low: torch.Tensor, high_bytes: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1's quants: the nibbles with the fifth bits of the 32-bit `qh` field (bit j
    for value j, little-endian) on top."""
    quants = nibbles(low).view(-1, 32)
    quants |= high_bits(high_bytes.unsqueeze(-1), 8).view(-1, 32)  # (blocks, byte, bit): value byte * 8 + bit
    return quants


def q5_0(blocks: torch.Tensor) -> torch.Tensor:  # d, qh, 16 bytes of nibbles; q - 16
    return scaled(five_bit(blocks[:, 6:], blocks[:, 2:6]), half_scale(blocks, 0), offset=16)


def q5_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, qh, 16 bytes of nibbles; d * q + m
    return scaled(five_bit(blocks[:, 8:], blocks[:, 4:8]), half_scale(blocks, 0), half_scale(blocks, 2))


def k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's per-32-value scales and mins, float32 (blocks, 8, 1): d * sc and dmin * m
    with the 6-bit sc and m unpacked from the 12 bytes after d and dmin."""
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    d, m, m_d = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    scale = (half_scale(blocks, 0) * sc.float()).unsqueeze(-1)
    shift = (half_scale(blocks, 2) * mins.float()).unsqueeze(-1)
    return scale, shift


def q4_k(blocks: torch.Tensor) -> torch.Tensor:  # d, dmin, scales, 128 bytes: 4 x (32 low, 32 high)
    scale, shift = k_scales(blocks)
    quants = nibbles(blocks[:, 16:].reshape(-1, 4, 32)).view(-1, 8, 32)
    return scaled(quants, scale, shift.neg()).view(-1, QK_K)


def q5_k(blocks: torch.Tensor) -> torch.Tensor:  # as Q4_K with 32 bytes of fifth bits before the nibbles
    scale, shift = k_scales(blocks)
    quants = nibbles(blocks[:, 48:].reshape(-1, 4, 32)).view(-1, 8, 32)
    quants |= high_bits(blocks[:, 16:48], 8)
    return scaled(quants, scale, shift.neg()).view(-1, QK_K)


def q6_k(blocks: torch.Tensor) -> torch.Tensor:  # 128 bytes low nibbles, 64 of 2-bit highs, 16 int8 scales, d
    scale = half_scale(blocks, 208) * blocks[:, 192:208].contiguous().view(torch.int8).float()
    quants = nibbles(blocks[:, :128].reshape(-1, 2, 64)).view(-1, 8, 32)
    quants |= high_bits(blocks[:, 128:192].reshape(-1, 2, 32), 4, width=2).view(-1, 8, 32)
    return scaled(quants.view(-1, 16, 16), scale.unsqueeze(-1), offset=32).view(-1, QK_K)


DECODERS = {Q.Q8_0: q8_0, Q.Q4_0: q4_0, Q.Q4_1: q4_1, Q.Q5_0: q5_0, Q.Q5_1: q5_1,
            Q.Q4_K: q4_k, Q.Q5_K: q5_k, Q.Q6_K: q6_k}
FAST_TYPES = frozenset(t.name for t in DECODERS) | {"BF16"}


def dequantize(weight: torch.Tensor, quant_type, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """A GGUF weight (its raw bytes, rows x bytes per row, as `GGUFParameter` holds them) as
    a `dtype` tensor of its real shape: float32 values equal to `gguf.quants.dequantize`'s,
    rounded once to `dtype`; written into `out` when given (a tensor of that shape and dtype),
    else a new tensor. Types without a decoder here go through diffusers' own."""
    quant_type = Q(quant_type)
    raw = (weight.as_tensor() if hasattr(weight, "as_tensor") else weight).view(torch.uint8)  # no subclass overhead
    block_size, type_size = gguf.GGML_QUANT_SIZES[quant_type]
    shape = (*raw.shape[:-1], raw.shape[-1] // type_size * block_size)
    with SCRATCH.lock:
        if quant_type == Q.BF16:  # stored as bf16 already: a view, then one cast or copy
            values = raw.view(torch.bfloat16)
        else:
            blocks = raw.reshape(-1, type_size)
            decoder = DECODERS.get(quant_type)
            values = decoder(blocks) if decoder else diffusers_decoder(quant_type)(blocks, block_size, type_size)
        values = values.reshape(shape)
        return out.copy_(values) if out is not None else values.to(dtype, copy=True)  # never a view of scratch


def diffusers_decoder(quant_type):
    """diffusers' decoder of a type without one here (Q2_K, Q3_K, IQ4_NL, IQ4_XS)."""
    # heavy: diffusers' GGUF module, only for those rarer types
    from diffusers.quantizers.gguf.utils import dequantize_functions

    return dequantize_functions[quant_type]


# --- the layer -----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def fast_gguf_linear_class():
    """diffusers' `GGUFLinear` decoding with `dequantize` (CUDA with diffusers' kernels keeps
    its own path). With `keep_dequantized` set, the decoded weight is kept after the first
    step (a plain attribute: not in the state dict, and decoded again if the device moved)."""
    # heavy: diffusers' GGUF layer, only when a GGUF file is loaded
    from diffusers.quantizers.gguf.utils import GGUFLinear

    class FastGGUFLinear(GGUFLinear):
        keep_dequantized = False
        kept_weight: torch.Tensor | None = None

        def forward_native(self, inputs: torch.Tensor) -> torch.Tensor:
            bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
            quant_type, dtype = self.weight.quant_type, self.compute_dtype
            if self.keep_dequantized:
                kept = self.kept_weight
                if kept is None or kept.device != self.weight.device or kept.dtype != dtype:
                    kept = self.kept_weight = dequantize(self.weight, quant_type, dtype)
                return torch.nn.functional.linear(inputs, kept, bias)
            with SCRATCH.lock:  # the decoded weight is a scratch buffer until the matmul is done
                out = SCRATCH.take("weight", (self.out_features, self.in_features), dtype, self.weight.device)
                return torch.nn.functional.linear(inputs, dequantize(self.weight, quant_type, dtype, out=out), bias)

    return FastGGUFLinear


def use_fast_dequantize(model: torch.nn.Module, keep_dequantized: bool = False) -> int:
    """Make every diffusers `GGUFLinear` of `model` decode with `dequantize` (its class
    swapped for the subclass: nothing else in the layer changes), keeping the decoded weights
    when `keep_dequantized`. Returns how many layers were switched."""
    layer_class = fast_gguf_linear_class()
    base = layer_class.__mro__[1]
    count = 0
    for module in model.modules():
        if isinstance(module, base):
            module.__class__ = layer_class
            module.keep_dequantized = keep_dequantized
            module.kept_weight = None
            count += 1
    return count
