"""Model configurations of the demo model (and of the tiny preset the tests use).

All of them follow the SD 1.x conventions the project's loader infers from tensor shapes
(``pipelines/models/architecture.py``): 32 norm groups, 8 heads per U-Net attention, conv ``proj_in``,
a CLIP text encoder with head width 64, quick-GELU, the real 49408-token vocabulary and
77 positions, a factor-8 KL autoencoder with 4 latent channels and a mid-block attention,
latent scaling factor 0.18215 (the VAE is normalised so that this holds, see
``normalise_vae_latents``).
"""

from __future__ import annotations

import math

import torch

SD1_SCALING_FACTOR = 0.18215

VAE_CONFIGS = {
    # 64 channels at every level: two channels per norm group (the loader fixes 32 groups), so the
    # final GroupNorms of encoder and decoder can carry absolute colour (one channel per group
    # normalises a flat background away; measured: far slower learning of flat colours)
    "demo": dict(block_out_channels=(64, 64, 64, 64), layers_per_block=1),
    "tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
}
UNET_CONFIGS = {
    "demo": dict(block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=128,
                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
TEXT_CONFIGS = {
    "demo": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1),
}


def vae_config(size: str) -> dict:
    levels = len(VAE_CONFIGS[size]["block_out_channels"])
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=SD1_SCALING_FACTOR,
        **VAE_CONFIGS[size],
    )


def unet_config(size: str) -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        attention_head_dim=8,  # SD 1.x: the number of heads
        norm_num_groups=32,
        use_linear_projection=False,
        **UNET_CONFIGS[size],
    )


def text_config(size: str) -> dict:
    cfg = TEXT_CONFIGS[size]
    return dict(
        vocab_size=49408,
        max_position_embeddings=77,
        num_attention_heads=max(1, cfg["hidden_size"] // 64),  # head width 64, as the loader assumes
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **cfg,
    )


def build_vae(size: str, seed: int):
    from diffusers import AutoencoderKL  # heavy: the configurations above need no diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(size))
    # Start the posterior narrow (std ~0.05 instead of 1): with SD's tiny KL weight the
    # log-variance would otherwise take thousands of steps to fall, and until then the
    # sampled latents drown the encoder's signal in unit noise (measured: 11.8 dB PSNR
    # after 4600 images with the default init).
    n = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[n:] *= 0.1
        vae.quant_conv.bias[n:] = -6.0
    return vae


def build_unet_and_text(size: str, seed: int):
    from diffusers import UNet2DConditionModel  # heavy: the configurations need no diffusers
    from transformers import CLIPTextConfig, CLIPTextModel  # heavy: nor transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size))
        text = CLIPTextModel(CLIPTextConfig(**text_config(size)))
    return unet, text


@torch.no_grad()
def normalise_vae_latents(vae, latent_std: float, target: float = SD1_SCALING_FACTOR) -> float:
    """Rescale the VAE's latent space in its weights so ``latent * target`` has unit std.

    The encoder's ``quant_conv`` (1x1 conv giving mean and log-variance) is scaled by ``c``
    on its mean channels and its log-variance bias shifted by ``2 ln c``; the decoder's
    ``post_quant_conv`` is scaled by ``1 / c`` on its input channels. Both are linear, so
    encode -> decode is unchanged, and every SD 1.x loader's 0.18215 is right for this VAE.
    Returns ``c``.
    """
    c = 1.0 / (latent_std * target)
    n = vae.config.latent_channels
    vae.quant_conv.weight[:n] *= c
    vae.quant_conv.bias[:n] *= c
    vae.quant_conv.bias[n:] += 2 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c
