"""Tiny quantized denoiser files for tests (a helper module, not a test file): the tiny SD 3
transformer of `tiny_sd3` written as users get such files.

- GGUF as city96's converter writes it: SAI's single-file names without a prefix, the 2-D
  weights (the linear layers') quantized with the `gguf` package (Q8_0, Q4_0, ...), the rest
  F32; K-quants, which the `gguf` package cannot quantize, as valid random blocks.
- fp8 safetensors: weights of 2+ dimensions in float8 (e4m3fn or e5m2), the rest bf16, as
  `model.diffusion_model.*` with the VAE beside it (so the file loads without a separate VAE).
- NF4: a bitsandbytes-style file (packed weights with absmax / quant_map / quant_state).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

try:
    from tiny_sd3 import TinySD3, make_tiny_sd3, sd3_state_dicts
except ImportError:
    from tests.tiny_sd3 import TinySD3, make_tiny_sd3, sd3_state_dicts

GGUF_PREFIX = "model.diffusion_model."
# byte offsets of the float16 scale fields ("d", then "dmin" where the type has one) in a K-quant block
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def transformer_tensors(models: TinySD3) -> dict[str, torch.Tensor]:
    """The tiny transformer's tensors in SAI's layout, without a prefix (what GGUF files hold)."""
    state = sd3_state_dicts(models)["transformer"]
    return {k[len(GGUF_PREFIX):]: v.float() for k, v in state.items()}


def random_k_blocks(rows: int, columns: int, kind: str, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks with sane scales (random bytes elsewhere: any nibble is a value)."""
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * columns // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[kind]:
        scale = rng.uniform(0.001, 0.004, size=len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, columns // block * size)


def gguf_blocks(rows: int, columns: int, kind: str, seed: int = 0) -> np.ndarray:
    """A rows x columns weight as GGUF `kind` blocks: quantized by the `gguf` package from
    random values where it can, valid random blocks for the K-quants."""
    if kind in K_QUANT_SCALES:
        return random_k_blocks(rows, columns, kind, seed)
    values = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], kind: str = "Q8_0", arch: str = "sd3",
               quantize=None) -> Path:
    """A GGUF file of `tensors`: those `quantize(name, shape)` picks (default: 2-D weights whose
    rows divide into blocks) as `kind`, the rest F32. K-quants get random blocks."""
    qtype = gguf.GGMLQuantizationType[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    quantize = quantize or (lambda name, shape: len(shape) == 2 and shape[1] % block == 0)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, tensor in tensors.items():
        data = tensor.detach().float().numpy()
        if not quantize(name, tuple(data.shape)):
            writer.add_tensor(name, data)
            continue
        if kind in K_QUANT_SCALES:
            blocks = random_k_blocks(data.shape[0], data.shape[1], kind, seed=len(name))
        elif kind == "TQ1_0":
            blocks = gguf.quants.quantize(np.clip(np.sign(data), -1, 1), qtype)
        else:
            blocks = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def gguf_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the `gguf` package's own numpy code."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32))
    return out


def write_fp8(path: Path, models: TinySD3, fp8: torch.dtype = torch.float8_e4m3fn,
              rest: torch.dtype = torch.bfloat16) -> Path:
    """The transformer (+ VAE) as an fp8 single file: 2+-D tensors in `fp8`, 1-D ones in `rest`."""
    parts = sd3_state_dicts(models)
    state = {k: v.to(fp8 if v.dim() >= 2 and k.startswith(GGUF_PREFIX) else rest).contiguous()
             for k, v in {**parts["transformer"], **parts["vae"]}.items()}
    save_file(state, str(path), metadata={"sdui.native_resolution": "64"})
    return Path(path)


def write_nf4(path: Path, models: TinySD3 | None = None) -> Path:
    """A file laid out like bitsandbytes' NF4 checkpoints: each linear weight packed two 4-bit
    values a byte, with its absmax, quant_map and quant_state entries."""
    models = models or make_tiny_sd3()
    state = {}
    for key, value in sd3_state_dicts(models)["transformer"].items():
        if value.dim() == 2:
            state[key] = torch.zeros((value.numel() // 2, 1), dtype=torch.uint8)
            state[key + ".absmax"] = torch.ones(value.numel() // 64)
            state[key + ".quant_map"] = torch.linspace(-1, 1, 16)
            state[key + ".quant_state.bitsandbytes__nf4"] = torch.zeros(16, dtype=torch.uint8)
        else:
            state[key] = value.to(torch.bfloat16).contiguous()
    save_file(state, str(path))
    return Path(path)
