"""Flux files dropped into the usual folders give images through the engine, with the infotext Forge
users know; a file that cannot load (parts missing, too big for the memory) says why and leaves the
loaded model working."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_engine
from tiny_flux import make_tiny_flux, write_tiny_flux

from pipelines.core import infotext
from pipelines.core.request import GenerationRequest
from pipelines.models.checkpoint_file import CheckpointError


@pytest.fixture(scope="module")
def flux_engine(tmp_path_factory):
    """models/ as a Forge user has it: BFL's bare flux1-dev beside an all-in-one file, ae.safetensors in
    VAE/, clip_l, t5xxl and T5's tokenizer in text_encoder/."""
    root = tmp_path_factory.mktemp("flux-models")
    files = write_tiny_flux(tmp_path_factory.mktemp("flux-files"), make_tiny_flux(seed=7))
    for folder in ("Stable-diffusion", "VAE"):
        (root / folder).mkdir()
    shutil.copy(files.all_in_one, root / "Stable-diffusion" / "flux_aio.safetensors")
    shutil.copy(files.bare, root / "Stable-diffusion" / "flux1-dev.safetensors")
    shutil.copy(files.vae, root / "VAE" / "ae.safetensors")
    shutil.copytree(files.text_encoder_dir, root / "text_encoder")
    return make_engine(root, tmp_path_factory.mktemp("flux-engine"))


def generate(engine, **fields):
    base = dict(prompt="a red circle", seed=3, steps=3, sampler="Euler", cfg_scale=1.0, width=64, height=64,
                save_images=False)
    return engine.generate(GenerationRequest(**{**base, **fields}))


def test_flux_files_are_listed_and_make_an_image_with_forges_infotext_that_round_trips(flux_engine):
    listed = flux_engine.find_checkpoint("flux1-dev.safetensors")
    assert listed is not None and listed.details["family_id"] == "flux"
    assert listed.details["variant"] == "Flux.1 dev"
    result = generate(flux_engine, checkpoint="flux1-dev.safetensors", distilled_cfg_scale=5.0)
    image = np.asarray(result.images[0], dtype=np.float64)
    assert result.images[0].size == (64, 64) and image.std() > 1
    assert "CFG scale: 1, Distilled CFG Scale: 5, Seed: 3" in result.infotexts[0]  # where Forge writes it
    fields = infotext.request_fields_from_infotext(result.infotexts[0])
    assert fields["distilled_cfg_scale"] == 5.0 and fields["cfg_scale"] == 1.0
    again = generate(flux_engine, checkpoint="flux1-dev.safetensors", **{k: fields[k] for k in (
        "prompt", "seed", "steps", "sampler", "cfg_scale", "distilled_cfg_scale", "width", "height")})
    assert np.array_equal(np.asarray(again.images[0], dtype=np.float64), image)  # the text gives the image back


def test_bare_transformer_pairs_with_ae_and_matches_the_all_in_one_file(flux_engine):
    bare = generate(flux_engine, checkpoint="flux1-dev.safetensors", shift=2.0)
    whole = generate(flux_engine, checkpoint="flux_aio.safetensors", shift=2.0)
    assert np.array_equal(np.asarray(bare.images[0]), np.asarray(whole.images[0]))  # the same weights, split
    assert "Shift: 2," in whole.infotexts[0]


def test_missing_encoders_and_a_file_too_big_are_refused_and_the_loaded_model_keeps_working(
        flux_engine, tmp_path, monkeypatch):
    flux_engine.manager.unload_all()  # earlier tests loaded flux1-dev: it is to be loaded again here
    generate(flux_engine, checkpoint="flux_aio.safetensors")
    shutil.move(flux_engine.paths.folder("text_encoders"), tmp_path / "moved")  # clip_l and t5xxl gone
    try:
        with pytest.raises(CheckpointError) as error:
            generate(flux_engine, checkpoint="flux1-dev.safetensors")
    finally:
        shutil.move(tmp_path / "moved", flux_engine.paths.folder("text_encoders"))
    message = str(error.value)
    assert "flux1-dev.safetensors" in message and "clip_l" in message and "t5xxl" in message
    assert "text_encoder" in message
    assert flux_engine.manager.loaded_names() == ["flux_aio.safetensors"]

    manager, models = flux_engine.manager, flux_engine.paths.folder("checkpoints").parent
    bare = models / "Stable-diffusion" / "flux1-dev.safetensors"
    parts = [bare, models / "VAE" / "ae.safetensors", *(models / "text_encoder").glob("*.safetensors")]
    # room for everything but half the transformer (fp32 files, run in fp32): a 24 GB machine and dev's bf16
    # files, scaled down; a Q8_0 file (a quarter of the fp32 transformer) would fit
    room = sum(p.stat().st_size for p in parts) - bare.stat().st_size // 2
    monkeypatch.setattr(type(manager), "room_bytes", lambda self: room)
    with pytest.raises(CheckpointError, match=r"flux1-dev.safetensors needs about .* MB of memory .* "
                                              r"a GGUF Q8_0 file of it \(about .* MB\) would fit"):
        generate(flux_engine, checkpoint="flux1-dev.safetensors")
    assert "flux_aio.safetensors" in manager.loaded_names()
    assert generate(flux_engine, checkpoint="flux_aio.safetensors").images  # still loaded, still working


def test_low_memory_mode_runs_flux_and_gives_the_same_image(flux_engine):
    """The mode a job falls back to when its memory plan does not fit (VAE tiling, sliced attention or
    chunked feed-forward where the transformer has them: Flux's has neither)."""
    from pipelines.models import memory

    first = generate(flux_engine, checkpoint="flux_aio.safetensors")
    components = flux_engine.manager.loaded("flux_aio.safetensors").components
    with memory.low_memory(components, flux_engine.manager.placement):
        low = generate(flux_engine, checkpoint="flux_aio.safetensors")
    assert np.array_equal(np.asarray(low.images[0]), np.asarray(first.images[0]))


def test_flux_vae_chosen_from_models_vae_is_read_with_fluxs_scaling(flux_engine):
    baked = generate(flux_engine, checkpoint="flux_aio.safetensors")
    chosen = generate(flux_engine, checkpoint="flux_aio.safetensors", vae="ae.safetensors")
    assert np.array_equal(np.asarray(chosen.images[0]), np.asarray(baked.images[0]))  # the same weights as inside
    assert "VAE: ae.safetensors" in chosen.infotexts[0]
