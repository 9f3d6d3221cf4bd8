"""GGUF weights decoded per step: diffusers' decoder against ours, next to the matmul they feed.

    python bench/gguf_dequant.py                           # Flux / SD 3 shapes, 1 and 2 threads
    python bench/gguf_dequant.py --types Q4_0 Q8_0 --shapes 3072x3072 --threads 2 --repeat 5
    python bench/gguf_dequant.py --block                   # + one Flux double block, and a step from it

For each type and weight shape (out x in) it times, interleaved (one of each in turn, the best
of `--repeat`, so a busy machine slows all three alike): diffusers' `dequantize_gguf_tensor`
plus the cast to the run dtype (what `GGUFLinear` does each step), `gguf_dequant.dequantize`
(ours), and the matmul of the decoded weight with a (1, tokens, in) activation in the run
dtype. Ratios: diffusers / ours, and each decoder's share of decode + matmul. `--block` adds a
Flux double block (12 GGUF linear layers, 3072 wide) built with random blocks, timed as one
forward with diffusers' layer, ours, and ours with the weights kept decoded. The load average
is printed at the start and the end. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.models.gguf_dequant import dequantize, use_fast_dequantize  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from tiny_quant import K_QUANT_SCALES  # noqa: E402  (the tests' helper: where a K block's scales are)

TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
SHAPES = ("3072x3072", "12288x3072", "3072x12288")  # Flux / SD 3.5 large: attention, MLP up, MLP down


def random_blocks(rows: int, columns: int, kind: str, seed: int = 0) -> torch.Tensor:
    """A GGUF weight's raw bytes (rows x bytes per row) with valid small scales."""
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * columns // block, size), dtype=np.uint8)
    offsets = K_QUANT_SCALES.get(kind, (0, 2) if kind in ("Q4_1", "Q5_1") else (0,))  # d (and m) lead the others
    for offset in offsets:
        blocks[:, offset:offset + 2] = rng.uniform(0.001, 0.004, len(blocks)).astype(np.float16).view(
            np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(rows, columns // block * size))


def best_of(functions: dict, repeat: int) -> dict[str, float]:
    """Each function's best time in seconds, run in turn `repeat` times (after one warm-up)."""
    times = {name: float("inf") for name in functions}
    for name, function in functions.items():
        function()
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def weight_row(kind: str, shape: str, tokens: int, dtype: torch.dtype, repeat: int) -> str:
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    rows, columns = (int(n) for n in shape.split("x"))
    qtype = gguf.GGMLQuantizationType[kind]
    weight = GGUFParameter(random_blocks(rows, columns, kind), quant_type=qtype)
    activation = torch.randn(1, tokens, columns, dtype=dtype)
    decoded = dequantize(weight, qtype, dtype)
    reused = torch.empty_like(decoded)  # as the layer decodes: into a buffer reused from layer to layer
    times = best_of({"diffusers": lambda: dequantize_gguf_tensor(weight).to(dtype),
                     "ours": lambda: dequantize(weight, qtype, dtype, out=reused),
                     "matmul": lambda: torch.nn.functional.linear(activation, decoded)}, repeat)
    old, new, matmul = times["diffusers"], times["ours"], times["matmul"]
    return (f"{kind:5s} {shape:>11s}  diffusers {old * 1e3:7.1f} ms  ours {new * 1e3:6.1f} ms  "
            f"matmul {matmul * 1e3:7.1f} ms  x{old / new:4.1f} faster  decode share "
            f"{old / (old + matmul):4.0%} -> {new / (new + matmul):4.0%}")


def linear_weights(module: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def step_factor() -> float:
    """A Flux step's linear weights (19 double blocks, 38 single ones) in double blocks: the
    step estimate scales the block's time by its share of the weights decoded."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    with torch.device("meta"):
        double = linear_weights(FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128))
        single = linear_weights(FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128))
    return (19 * double + 38 * single) / double


def block_rows(kind: str, tokens: int, dtype: torch.dtype, repeat: int) -> list[str]:
    """One Flux double block (3072 wide, 24 heads; 512 text tokens beside the image ones) with
    its linear layers as GGUF `kind`: a forward with diffusers' layer, ours, ours kept decoded;
    a step estimated from it by the share of the weights (`step_factor`)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    qtype = gguf.GGMLQuantizationType[kind]
    block = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(dtype)
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = GGUFLinear(child.in_features, child.out_features, child.bias is not None, compute_dtype=dtype)
                blocks = random_blocks(child.out_features, child.in_features, kind)
                layer.weight = GGUFParameter(blocks, quant_type=qtype)
                layer.bias = child.bias
                setattr(parent, name, layer.requires_grad_(False))
    image = torch.randn(1, tokens, 3072, dtype=dtype)
    text = torch.randn(1, 512, 3072, dtype=dtype)
    temb = torch.randn(1, 3072, dtype=dtype)

    def forward():
        with torch.no_grad():
            block(image, text, temb)

    rows, factor = [], step_factor()
    for label, setup in (("diffusers", None), ("ours", False), ("ours, kept decoded", True)):
        if setup is not None:
            use_fast_dequantize(block, keep_dequantized=setup)
        seconds = best_of({label: forward}, repeat)[label]
        rows.append(f"Flux double block {kind} ({tokens} image tokens), {label:18s} {seconds:6.2f} s "
                    f"(a whole step ~ {seconds * factor:5.0f} s)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tokens", type=int, default=4096, help="activation rows (4096: 1024x1024 Flux)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block", action="store_true", help="also time one Flux double block")
    parser.add_argument("--block-tokens", type=int, default=1024, help="image tokens there (1024: 512x512)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.dtype}, {args.tokens} tokens")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"-- {threads} thread(s)")
        for kind in args.types:
            for shape in args.shapes:
                print(weight_row(kind, shape, args.tokens, dtype, args.repeat), flush=True)
        if args.block:
            for kind in args.types:
                print("\n".join(block_rows(kind, args.block_tokens, dtype, args.repeat)), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
