"""pipelines.models.export writes the original (LDM / A1111) SD 1.x layout.

The reference for "original layout" is diffusers' own single-file converter: whatever we
export must convert back to the exact tensors we started from.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

try:
    from tests.tiny import TINY_CLIP_CONFIG, make_tiny_sd1, write_tiny_sd1_checkpoint
except ImportError:  # plain `pytest` puts tests/ itself on sys.path (no __init__.py)
    from tiny import TINY_CLIP_CONFIG, make_tiny_sd1, write_tiny_sd1_checkpoint

# after tests.tiny, which makes a source checkout importable without `pip install -e .`
from pipelines.models.export import save_sd1_checkpoint, sd1_single_file_state_dict  # noqa: E402
from pipelines.models.families import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX  # noqa: E402
from pipelines.models.ldm_layout import clip_to_ldm, unet_to_ldm, vae_to_ldm  # noqa: E402

POSITION_IDS = "text_model.embeddings.position_ids"


def _assert_same(got: dict, want: dict, what: str, values: bool = True) -> None:
    assert set(got) == set(want), (
        f"{what}: missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
    )
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, f"{what}: {key} {tuple(got[key].shape)} != {tuple(tensor.shape)}"
        if values:
            assert got[key].dtype == tensor.dtype, key
            assert torch.equal(got[key], tensor), f"{what}: {key} differs"


def _clip_back(single_file: dict, text_encoder) -> dict:
    """diffusers' CLIP conversion, then the names the installed transformers uses."""
    back = convert_ldm_clip_checkpoint(single_file)
    pos = back.pop(POSITION_IDS)
    assert pos.dtype == torch.int64
    assert torch.equal(pos, torch.arange(pos.shape[1]).unsqueeze(0))
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
    return back


def _round_trip(unet, vae, text_encoder, values: bool = True) -> dict:
    single = sd1_single_file_state_dict(unet, vae, text_encoder)
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)
    assert all(k.startswith(prefixes) for k in single)
    _assert_same(convert_ldm_unet_checkpoint(single, unet.config), unet.state_dict(), "U-Net", values)
    _assert_same(convert_ldm_vae_checkpoint(single, vae.config), vae.state_dict(), "VAE", values)
    _assert_same(_clip_back(single, text_encoder), text_encoder.state_dict(), "CLIP", values)
    return single


@pytest.mark.parametrize("inpainting", [False, True])
def test_tiny_round_trips_through_diffusers_converter(inpainting):
    unet, vae, text_encoder = make_tiny_sd1(seed=0, inpainting=inpainting)
    single = _round_trip(unet, vae, text_encoder)
    assert single[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1] == (9 if inpainting else 4)
    # LDM VAE attention is 1x1 conv, diffusers' is linear.
    assert single[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert single[CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"].shape == (49408, 64)


def test_larger_config_round_trips():
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=2,
        cross_attention_dim=48,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),  # channel changes: nin_shortcut in encoder and decoder
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**dict(TINY_CLIP_CONFIG, vocab_size=1000, hidden_size=48,
                                                       bos_token_id=998, eos_token_id=999, pad_token_id=999)))
    single = _round_trip(unet, vae, text_encoder)
    ldm_unet = {k[len(UNET_PREFIX):]: v for k, v in single.items() if k.startswith(UNET_PREFIX)}
    assert ldm_unet["input_blocks.1.1.proj_in.weight"].ndim == 2  # linear projection kept as is
    assert "input_blocks.1.1.transformer_blocks.1.attn2.to_k.weight" in ldm_unet
    assert "output_blocks.5.2.conv.weight" in ldm_unet  # last layer of level 1 carries the upsampler
    assert "output_blocks.2.1.conv.weight" in ldm_unet  # level 0 of the decoder has no attention
    assert not any(k.startswith("output_blocks.8.2") for k in ldm_unet)  # no upsampler at full resolution
    ldm_vae = {k[len(VAE_PREFIX):] for k in single if k.startswith(VAE_PREFIX)}
    assert {"decoder.up.0.block.0.nin_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight",
            "decoder.up.2.upsample.conv.weight", "decoder.up.1.block.2.conv2.weight"} <= ldm_vae
    assert not any(k.startswith("decoder.up.0.upsample") for k in ldm_vae)


def test_sd15_shaped_names_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig())  # CLIP ViT-L/14 text tower defaults
    single = _round_trip(unet, vae, text_encoder, values=False)
    ldm_unet = unet_to_ldm(unet.state_dict(), unet.config)
    ldm_vae = vae_to_ldm(vae.state_dict(), vae.config)
    # Counts of a real SD 1.5 file (v1-5-pruned-emaonly): 686 + 248 + 197.
    assert len(ldm_unet) == 686
    assert len(ldm_vae) == 248
    assert sum(k.startswith(CLIP_PREFIX) for k in single) == 197
    shapes = {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.2.weight": (4, 320, 3, 3),
        "time_embed.0.weight": (1280, 320),
    }
    for key, shape in shapes.items():
        assert tuple(ldm_unet[key].shape) == shape, key
    vae_shapes = {
        "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.norm.weight": (512,),
        "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "quant_conv.weight": (8, 8, 1, 1),
    }
    for key, shape in vae_shapes.items():
        assert tuple(ldm_vae[key].shape) == shape, key
    assert tuple(single[CLIP_PREFIX + POSITION_IDS].shape) == (1, 77)
    assert CLIP_PREFIX + "text_model.encoder.layers.11.mlp.fc2.weight" in single


def test_clip_to_ldm_accepts_wrapped_and_flat_names():
    flat = {"embeddings.position_embedding.weight": torch.zeros(5, 2), "final_layer_norm.bias": torch.zeros(2)}
    wrapped = {"text_model." + k: v for k, v in flat.items()}
    assert clip_to_ldm(flat).keys() == clip_to_ldm(wrapped).keys()
    assert clip_to_ldm(flat)[POSITION_IDS].tolist() == [[0, 1, 2, 3, 4]]


def test_unknown_tensor_is_an_error_not_a_silent_drop():
    unet, vae, _ = make_tiny_sd1()
    sd = dict(unet.state_dict(), **{"something_new.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="something_new"):
        unet_to_ldm(sd, unet.config)
    with pytest.raises(KeyError):
        vae_to_ldm(dict(vae.state_dict(), **{"decoder.extra.weight": torch.zeros(1)}), vae.config)


def test_written_file(tmp_path):
    path = write_tiny_sd1_checkpoint(tmp_path / "sub" / "tiny.safetensors", seed=3, inpainting=True,
                                     metadata={"modelspec.title": "tiny"})
    assert path.is_file() and path.stat().st_size < 12_000_000
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temp file left
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"modelspec.title": "tiny"}
        keys = set(f.keys())
        assert f.get_tensor(UNET_PREFIX + "input_blocks.0.0.weight").shape == (32, 9, 3, 3)
        assert f.get_tensor(CLIP_PREFIX + POSITION_IDS).dtype == torch.int64
        dtypes = {f.get_tensor(k).dtype for k in keys if k != CLIP_PREFIX + POSITION_IDS}
    assert dtypes == {torch.float16}
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}

    # Same seed, same bytes; fp32 export keeps the exact weights.
    again = write_tiny_sd1_checkpoint(tmp_path / "again.safetensors", seed=3, inpainting=True,
                                      metadata={"modelspec.title": "tiny"})
    assert again.read_bytes() == path.read_bytes()
    unet, vae, te = make_tiny_sd1(seed=3, inpainting=True)
    full = save_sd1_checkpoint(tmp_path / "fp32.safetensors", unet, vae, te)
    with safe_open(str(full), "pt") as f:
        w = f.get_tensor(VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight")
    assert torch.equal(w[:, :, 0, 0], vae.state_dict()["decoder.mid_block.attentions.0.to_out.0.weight"])


def test_save_rejects_bad_arguments(tmp_path):
    unet, vae, te = make_tiny_sd1()
    with pytest.raises(ValueError):
        save_sd1_checkpoint(tmp_path / "x.ckpt", unet, vae, te)
    with pytest.raises(TypeError):
        save_sd1_checkpoint(tmp_path / "x.safetensors", unet, vae, te, metadata={"steps": 20})
