"""Tiny SD 1.x models and single-file checkpoints for tests (a helper module, not a test file).

The configs follow real SD 1.x conventions (8 attention heads per U-Net attention,
conv ``proj_in``, CLIP BPE vocabulary and special tokens, 77 positions, quick-GELU,
a factor-8 VAE with scaling factor 0.18215) so a loader can infer the architecture
from tensor shapes alone, exactly as it must for real files; only the widths are tiny.

    from tests.tiny import write_tiny_sd1_checkpoint   # or `from tiny import ...` under pytest
    path = write_tiny_sd1_checkpoint(tmp_path / "tiny.safetensors")
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from pipelines.export import save_sd1_checkpoint
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipelines.export import save_sd1_checkpoint

__all__ = [
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_CLIP_CONFIG",
    "make_tiny_sd1",
    "write_tiny_sd1_checkpoint",
]

TINY_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,  # SD 1.x quirk: this is the number of heads (8), not their width
    norm_num_groups=32,
    use_linear_projection=False,
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),  # 4 levels -> 3 downsamplings -> factor 8
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

TINY_CLIP_CONFIG = dict(
    vocab_size=49408,  # the real CLIP BPE vocabulary
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,  # head width 64, like CLIP
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def make_tiny_sd1(seed: int = 0, inpainting: bool = False):
    """Return ``(unet, vae, text_encoder)`` in eval mode with random weights from ``seed``.

    Default initialisation: the noise prediction is about unit scale, and 20 steps of
    Euler / DPM++ 2M at CFG 7 stay finite (fp32 and bf16) with images in about [-1.6, 1.6].
    The global torch RNG is left untouched.  ``inpainting=True`` gives the U-Net 9 input
    channels (4 latent + 1 mask + 4 masked-image latent).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_cfg = dict(TINY_UNET_CONFIG, in_channels=9 if inpainting else 4)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_CONFIG))
    return unet.eval(), vae.eval(), text_encoder.eval()


def write_tiny_sd1_checkpoint(
    path,
    seed: int = 0,
    inpainting: bool = False,
    dtype: torch.dtype | None = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a tiny SD 1.x single-file ``.safetensors`` checkpoint (original LDM layout)."""
    unet, vae, text_encoder = make_tiny_sd1(seed=seed, inpainting=inpainting)
    return save_sd1_checkpoint(path, unet, vae, text_encoder, metadata=metadata, dtype=dtype)
