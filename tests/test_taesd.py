"""Tiny autoencoders (TAESD / TAESDXL) from models/VAE-approx: the file layouts people have,
read into diffusers' AutoencoderTiny offline, decoding exactly as the model they were saved from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.core.settings import MODEL_KINDS, Paths
from pipelines.models import taesd
from pipelines.models.checkpoint_file import CheckpointError

# a tiny decoder of TAESD's shape: 4 levels (x8), blocks per level as TAESD's (3, 3, 3, 1), 8 wide
TINY = {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
        "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (3, 3, 3, 1)}


def tiny_autoencoder(seed=0):
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(**TINY).eval()


def original_layout(model) -> dict[str, torch.Tensor]:
    """The decoder as madebyollin's taesd.py saves it (taesd_decoder.pth): layer N+1 (index 0 is
    the weightless clamp), no prefix."""
    out = {}
    for name, tensor in model.decoder.state_dict().items():
        index, _, rest = name.removeprefix("layers.").partition(".")
        out[f"{int(index) + 1}.{rest}"] = tensor.clone()
    return out


def write(path, state, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3


@pytest.mark.parametrize("layout,file_name", [
    ("original", "taesd_decoder.pth"),
    ("original", "taesdxl_decoder.safetensors"),
    ("prefixed", "taesd_decoder.pth"),
    ("diffusers", "taesdxl/diffusion_pytorch_model.safetensors"),
])
def test_each_layout_decodes_like_the_model_it_came_from(tmp_path, layout, file_name):
    model = tiny_autoencoder()
    state = {"original": original_layout(model),
             "prefixed": {f"decoder.{k}": v for k, v in original_layout(model).items()},
             "diffusers": {k: v.clone() for k, v in model.state_dict().items()}}[layout]
    path = write(tmp_path / "VAE-approx" / file_name, state, "safetensors" if file_name.endswith("safetensors") else "pt")

    loaded = taesd.load_taesd(path, file_name)
    assert loaded.fits("sdxl" if "taesdxl" in file_name else "sd1")
    with torch.no_grad():
        expected = model.decode(LATENTS).sample  # in [-1, 1]
        assert torch.equal(loaded.decode_samples(LATENTS), expected)
    images = loaded.decode(LATENTS)
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"
    want = ((expected.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack([np.asarray(i) for i in images]), want.astype(np.uint8))
    assert np.array_equal(np.asarray(loaded.decode_preview(LATENTS)), want[0].astype(np.uint8))


def test_a_bf16_channels_last_decode_is_within_a_level_of_fp32(tmp_path):
    """How a CPU with bf16 runs TAESD (the U-Net's dtype, NHWC): the same images give or take a level."""
    path = write(tmp_path / "VAE-approx" / "taesd_decoder.pth", original_layout(tiny_autoencoder(seed=4)), "pt")
    full = taesd.load_taesd(path)
    fast = taesd.load_taesd(path, dtype=torch.bfloat16, channels_last=True)
    assert next(fast.model.parameters()).dtype == torch.bfloat16 and fast.channels_last
    a = np.stack([np.asarray(i, dtype=np.int16) for i in full.decode(LATENTS)])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in fast.decode(LATENTS)])
    assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 8


def test_the_real_taesd_shape_is_read_from_the_tensors():
    from diffusers import AutoencoderTiny

    shapes = {k: tuple(v.shape) for k, v in AutoencoderTiny().state_dict().items() if k.startswith("decoder.")}
    shape = taesd.decoder_shape(shapes)
    assert shape == taesd.DecoderShape(4, 3, (64, 64, 64, 64), (3, 3, 3, 1))


def test_family_comes_from_the_name(tmp_path):
    model = tiny_autoencoder()
    names = ["taesdxl_decoder.pth", "taesd_encoder.pth", "taesd_decoder.pth", "taesd3_decoder.pth"]
    paths = [write(tmp_path / n, original_layout(model), "pt") for n in names]
    assert taesd.pick_taesd(paths, "sdxl") == paths[0]
    assert taesd.pick_taesd(paths, "sd1") == paths[2]  # never the encoder, never TAESD3's
    assert taesd.pick_taesd(paths, "sd2") == paths[2]
    assert taesd.pick_taesd(paths[1:], "sdxl") is None
    assert taesd.load_taesd(paths[0]).fits("sdxl") and not taesd.load_taesd(paths[0]).fits("sd1")
    assert taesd.describe_taesd(paths[2])["families"] == ["sd1", "sd2"]
    unnamed = write(tmp_path / "fast_preview.pth", original_layout(model), "pt")
    details = taesd.describe_taesd(unnamed)
    assert details["families"] == [] and "taesdxl" in details["error"]


def test_files_that_are_not_taesd_decoders_are_refused_by_name(tmp_path):
    encoder_only = {f"{k}": v for k, v in tiny_autoencoder().encoder.state_dict().items()}
    path = write(tmp_path / "taesd_encoder.pth", {k.removeprefix("layers."): v for k, v in encoder_only.items()}, "pt")
    with pytest.raises(CheckpointError, match="taesd_encoder.pth"):
        taesd.load_taesd(path)
    junk = write(tmp_path / "taesd_decoder.safetensors", {"weight": torch.zeros(3)}, "safetensors")
    with pytest.raises(CheckpointError, match="taesd_decoder.safetensors"):
        taesd.load_taesd(junk)
    with pytest.raises(CheckpointError):
        taesd.describe_taesd(junk)


def test_vae_approx_is_a1111s_folder(tmp_path):
    assert Paths(models_dir=tmp_path).folder("vae_approx") == tmp_path / "VAE-approx"
    assert {".pth", ".safetensors"} <= set(MODEL_KINDS["vae_approx"].extensions)


def test_decode_runs_in_the_models_dtype():
    loaded = taesd.TinyAutoencoder(tiny_autoencoder().to(torch.bfloat16), ("sd1", "sd2"))
    image = loaded.decode_preview(LATENTS.double())
    assert image.size == (64, 64)
