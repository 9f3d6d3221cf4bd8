"""--gguf-dequantize-once: a GGUF denoiser's layers keep their decoded weights after the first
step where the model cache has room for them (counted in its size), and decode per step otherwise."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from pipelines.core.request import GenerationRequest
from pipelines.core.settings import EngineSettings
from pipelines.generate import flow_runner
from pipelines.models.device import choose_placement
from pipelines.models.gguf_dequant import fast_gguf_linear_class
from pipelines.models.manager import ModelManager

try:
    from tiny_flux import flux_state_dicts, make_tiny_flux, write_tiny_flux
    from tiny_quant import write_gguf
except ImportError:
    from tests.tiny_flux import flux_state_dicts, make_tiny_flux, write_tiny_flux
    from tests.tiny_quant import write_gguf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tiny = make_tiny_flux(seed=7, guidance=False)
    written = write_tiny_flux(tmp_path_factory.mktemp("once"), tiny)
    gguf = written.text_encoder_dir.parent / "flux1-schnell-Q8_0.gguf"
    write_gguf(gguf, flux_state_dicts(tiny)["transformer"], "Q8_0", arch="flux")
    (written.text_encoder_dir.parent / "VAE").mkdir(exist_ok=True)
    vae = written.text_encoder_dir.parent / "VAE" / "ae.safetensors"
    vae.write_bytes(written.vae.read_bytes())
    return gguf, written.text_encoder_dir, vae.parent


def manager(files, budget: int | None = None, once: bool = True) -> ModelManager:
    placement = choose_placement(EngineSettings(device="cpu", precision="full"))
    _, text_encoders, vaes = files
    return ModelManager(placement, budget, text_encoder_dir=text_encoders, vae_dir=vaes, gguf_dequantize_once=once)


def image(model) -> np.ndarray:
    request = GenerationRequest(prompt="a red circle", seed=3, steps=2, sampler="Euler", cfg_scale=1.0,
                                width=64, height=64)
    out = next(iter(flow_runner.run(model.components, torch.device("cpu"), request)))
    return np.asarray(out.images[0], dtype=np.float64)


def layers(model) -> list:
    return [m for m in model.components.unet.modules() if isinstance(m, fast_gguf_linear_class())]


def test_decoded_weights_are_kept_counted_and_give_the_same_image(files):
    per_step, once = manager(files, once=False).get("q8", files[0]), manager(files).get("q8", files[0])
    assert layers(once) and once.nbytes > per_step.nbytes  # the cache counts the decoded weights
    first = image(once)
    assert all(m.kept_weight is not None for m in layers(once))
    assert all(m.kept_weight is None for m in layers(per_step))
    assert np.array_equal(first, image(per_step)) and np.array_equal(image(once), first)


def test_where_the_decoded_weights_do_not_fit_it_decodes_per_step_and_says_why(files, caplog):
    loaded = manager(files).get("q8", files[0])
    tight = manager(files, budget=loaded.nbytes - 1)  # room for the quantized model, not for its decoded copy
    with caplog.at_level(logging.WARNING, logger="pipelines.models.manager"):
        model = tight.get("q8", files[0])
    image(model)
    assert all(m.kept_weight is None for m in layers(model))
    assert any("--gguf-dequantize-once needs" in r.getMessage() for r in caplog.records)


def test_the_flag_reaches_the_engines_model_cache_and_compile_keeps_its_cache_in_the_data_folder(tmp_path,
                                                                                               monkeypatch):
    from pipelines.core.settings import Paths
    from pipelines.engine_loading import model_manager
    from webui.cli import settings_from_args
    from webui.cli_flags import build_parser

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # empty: unset; the test's end restores the real one
    settings = settings_from_args(build_parser().parse_args(["--gguf-dequantize-once", "--compile"]))
    assert settings.gguf_dequantize_once and settings.compile
    paths = Paths(models_dir=tmp_path / "models", data_dir=tmp_path / "data", outdir=tmp_path / "out")
    built = model_manager(paths, settings, choose_placement(settings))
    assert built.gguf_dequantize_once
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "data" / "torch-compile")
