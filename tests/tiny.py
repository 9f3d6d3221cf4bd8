"""Tiny models and single-file checkpoints of every family for tests (a helper module, not a test file).

The configs follow each family's real conventions so a loader can infer the architecture
from tensor shapes alone, exactly as it must for real files; only the widths are tiny:
- SD 1.x: 8 heads per U-Net attention, conv ``proj_in``, CLIP-L layout (quick-GELU);
- SD 2.x: head width 64, linear ``proj_in``, open_clip layout (GELU) under ``cond_stage_model.model.``;
- SDXL: no attention on the first level, transformer depth per level (1, 1, 2), ``label_emb``
  (size/crop/target ids), CLIP-L + open_clip bigG with projection under ``conditioner.embedders.``;
- SDXL refiner: bigG only, attention on the middle level only, aesthetic-score ids.
All use the CLIP BPE vocabulary and special tokens, 77 positions and a factor-8 VAE.

    from tests.tiny import write_tiny_checkpoint   # or `from tiny import ...` under pytest
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", family="sdxl")
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from pipelines.models import export, families
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipelines.models import export, families

save_sd1_checkpoint = export.save_sd1_checkpoint

__all__ = [
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_CLIP_CONFIG",
    "make_tiny_sd1",
    "write_tiny_sd1_checkpoint",
    "TINY_FAMILIES",
    "make_tiny",
    "tiny_single_file_state_dict",
    "write_tiny_checkpoint",
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


TINY_OPEN_CLIP_CONFIG = dict(TINY_CLIP_CONFIG, num_hidden_layers=3, hidden_act="gelu")  # ViT-H / bigG style
TINY_BIGG_CONFIG = dict(TINY_OPEN_CLIP_CONFIG, projection_dim=64)

TINY_SD2_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    block_out_channels=(64, 128),
    attention_head_dim=(1, 2),  # head width 64, like SD 2.x
    use_linear_projection=True,
)

TINY_SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
    cross_attention_dim=128,  # CLIP-L width + bigG width (SDXL: 768 + 1280)
    attention_head_dim=(1, 1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,  # SDXL: 256
    projection_class_embeddings_input_dim=64 + 6 * 32,  # pooled bigG + 6 time ids
    norm_num_groups=32,
)

TINY_REFINER_UNET_CONFIG = dict(
    TINY_SDXL_UNET_CONFIG,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=2,  # the middle block inherits the last level's depth
    cross_attention_dim=64,  # bigG only (refiner: 1280)
    attention_head_dim=(1, 1, 1),
    projection_class_embeddings_input_dim=64 + 5 * 32,  # pooled bigG + 5 ids (size, crop, aesthetic)
)

# family -> (U-Net config, VAE scaling factor, [(single-file prefix, layout, CLIP config, with projection)])
TINY_FAMILIES = {
    "sd1": (TINY_UNET_CONFIG, 0.18215, [(families.CLIP_PREFIX, "hf_clip", TINY_CLIP_CONFIG, False)]),
    "sd2": (TINY_SD2_UNET_CONFIG, 0.18215, [(families.OPEN_CLIP_PREFIX, "open_clip", TINY_OPEN_CLIP_CONFIG, False)]),
    "sdxl": (TINY_SDXL_UNET_CONFIG, 0.13025, [
        (families.SDXL_CLIP_L_PREFIX, "hf_clip", TINY_CLIP_CONFIG, False),
        (families.SDXL_CLIP_G_PREFIX, "open_clip", TINY_BIGG_CONFIG, True),
    ]),
    "sdxl_refiner": (TINY_REFINER_UNET_CONFIG, 0.13025, [
        (families.REFINER_CLIP_G_PREFIX, "open_clip", TINY_BIGG_CONFIG, True),
    ]),
}


def make_tiny(family: str = "sd1", seed: int = 0, inpainting: bool = False):
    """``(unet, vae, [text encoders])`` of a tiny model of ``family``, random weights from ``seed``.

    The global torch RNG is left untouched. ``inpainting=True`` gives the U-Net 9 input channels.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config, scaling, encoders = TINY_FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**dict(unet_config, in_channels=9 if inpainting else 4))
        vae = AutoencoderKL(**dict(TINY_VAE_CONFIG, scaling_factor=scaling))
        text_encoders = []
        for _, _, config, projection in encoders:
            cls = CLIPTextModelWithProjection if projection else CLIPTextModel
            text_encoders.append(cls(CLIPTextConfig(**config)).eval())
    return unet.eval(), vae.eval(), text_encoders


def tiny_single_file_state_dict(family: str, unet, vae, text_encoders) -> dict:
    _, _, encoders = TINY_FAMILIES[family]
    return export.single_file_state_dict(
        unet, vae, [(prefix, layout, module) for (prefix, layout, _, _), module in zip(encoders, text_encoders)])


def write_tiny_checkpoint(
    path,
    family: str = "sd1",
    seed: int = 0,
    inpainting: bool = False,
    dtype: torch.dtype | None = torch.float16,
    metadata: dict[str, str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a tiny single-file ``.safetensors`` checkpoint of ``family`` in its original layout.

    ``extra`` adds tensors as they are (e.g. ``model_ema.*`` copies of a full checkpoint).
    """
    unet, vae, text_encoders = make_tiny(family, seed=seed, inpainting=inpainting)
    state = tiny_single_file_state_dict(family, unet, vae, text_encoders)
    state.update(extra or {})
    return export.save_checkpoint(path, state, metadata, dtype)
