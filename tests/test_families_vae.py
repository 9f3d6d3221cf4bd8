"""VAE selection: baked in, a `<checkpoint>.vae.*` sidecar ("Automatic"), or a models/VAE file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_engine
from safetensors.torch import save_file
from tiny import write_tiny_checkpoint

from pipelines.core.request import GenerationRequest, RequestError
from pipelines.models.build import load_vae
from pipelines.models.ldm_layout import vae_to_ldm


def tiny_vae(seed: int, scaling: float = 0.18215):
    from diffusers import AutoencoderKL
    from tiny import TINY_VAE_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**dict(TINY_VAE_CONFIG, scaling_factor=scaling)).eval()


@pytest.fixture(scope="module")
def vae_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-models")
    ckpts = root / "Stable-diffusion"
    write_tiny_checkpoint(ckpts / "plain.safetensors", seed=0)
    write_tiny_checkpoint(ckpts / "withvae.safetensors", seed=0)
    sidecar = tiny_vae(5)
    save_file({k: v.contiguous() for k, v in vae_to_ldm(sidecar.state_dict(), sidecar.config).items()},
              ckpts / "withvae.vae.safetensors")
    write_tiny_checkpoint(ckpts / "xl.safetensors", family="sdxl", seed=2)
    vaes = root / "VAE"
    vaes.mkdir()
    # an A1111-style .vae.pt in the VAE folder: a torch file with a state_dict, LDM names
    ldm = tiny_vae(6)
    torch.save({"state_dict": vae_to_ldm(ldm.state_dict(), ldm.config)}, vaes / "anime.vae.pt")
    # a diffusers-layout file (e.g. a renamed diffusion_pytorch_model.safetensors)
    save_file(tiny_vae(7).state_dict(), vaes / "diffusers-vae.safetensors")
    return root


@pytest.fixture(scope="module")
def vae_engine(vae_models, tmp_path_factory):
    return make_engine(vae_models, tmp_path_factory.mktemp("vae-engine"))


def req(**fields) -> GenerationRequest:
    base = dict(prompt="a red circle", steps=2, width=64, height=64, seed=3, sampler="Euler",
                save_images=False, checkpoint="withvae.safetensors")
    return GenerationRequest(**{**base, **fields})


def pixels(result):
    return np.asarray(result.images[0], dtype=np.int16)


def test_listings(vae_engine):
    checkpoints = {f.name: f for f in vae_engine.list_checkpoints()}
    assert set(checkpoints) == {"plain.safetensors", "withvae.safetensors", "xl.safetensors"}  # sidecar hidden
    assert checkpoints["withvae.safetensors"].details["sidecar_vae"] == "withvae.vae.safetensors"
    assert checkpoints["plain.safetensors"].details["sidecar_vae"] is None
    # in models/VAE a ".vae." name is a VAE like any other
    assert vae_engine.vae_choices() == ["Automatic", "None", "anime.vae.pt", "diffusers-vae.safetensors"]


@pytest.mark.parametrize("seed, name, layout", [(6, "anime.vae.pt", "ldm"), (7, "diffusers-vae.safetensors", "diffusers")])
def test_vae_files_load_exactly(vae_models, seed, name, layout):
    loaded = load_vae(vae_models / "VAE" / name, torch.float32, 0.18215)
    want = tiny_vae(seed).state_dict()
    got = loaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want), layout


def test_choices_change_the_image_and_the_infotext(vae_engine):
    baked = vae_engine.generate(req(vae="None"))
    automatic = vae_engine.generate(req(vae="Automatic"))
    default = vae_engine.generate(req())  # vae=None means Automatic
    chosen = vae_engine.generate(req(vae="anime.vae.pt"))
    by_stem = vae_engine.generate(req(vae="diffusers-vae"))
    assert not np.array_equal(pixels(baked), pixels(automatic))
    assert np.array_equal(pixels(automatic), pixels(default))
    assert not np.array_equal(pixels(chosen), pixels(automatic))
    assert "VAE: withvae.vae.safetensors" in automatic.infotexts[0]
    assert "VAE: anime.vae.pt" in chosen.infotexts[0]
    assert "VAE: diffusers-vae.safetensors" in by_stem.infotexts[0]
    assert "VAE:" not in baked.infotexts[0]
    # a checkpoint without a sidecar: Automatic is the baked-in VAE
    plain = vae_engine.generate(req(checkpoint="plain.safetensors"))
    assert np.array_equal(pixels(plain), pixels(baked))  # same weights (seed 0), same baked VAE


def test_vaes_are_cached_apart_from_checkpoints(vae_engine):
    vae_engine.generate(req(vae="anime.vae.pt"))
    memory = vae_engine.cache_memory()
    assert "anime.vae.pt" in [v["name"] for v in memory["vaes"]]
    assert memory["cache_bytes"] >= sum(m["bytes"] for m in memory["models"]) + sum(v["bytes"] for v in memory["vaes"])
    loaded_before = vae_engine.loaded_checkpoints()
    vae_engine.generate(req(vae="diffusers-vae.safetensors"))
    assert vae_engine.loaded_checkpoints() == loaded_before  # switching VAE never reloads the checkpoint


def test_sdxl_checkpoint_gets_its_scaling_factor_on_a_separate_vae(vae_engine):
    result = vae_engine.generate(req(checkpoint="xl.safetensors", vae="anime.vae.pt"))
    assert np.isfinite(pixels(result)).all()
    scalings = {round(v.module.config.scaling_factor, 5) for v in vae_engine.manager._vaes.values()}
    assert 0.13025 in scalings


def test_unknown_vae_names_the_field(vae_engine):
    with pytest.raises(RequestError) as err:
        vae_engine.generate(req(vae="../../etc/passwd"))
    assert err.value.field == "vae" and "anime.vae.pt" in err.value.message
