"""A user with no checkpoint gets the shipped demo model: listed, labelled, sized, generating."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import write_tiny_sd1_checkpoint

DEMO_METADATA = {"sdui.demo": "true", "sdui.native_resolution": "64", "modelspec.resolution": "64x64",
                 "modelspec.title": "Demo: coloured shapes (64 px)",
                 "modelspec.trigger_phrase": "a red circle on a blue background"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    write_tiny_sd1_checkpoint(folder / "demo-shapes.safetensors", seed=3, metadata=DEMO_METADATA)
    return folder


def _engine(tmp: Path, demo_dir: Path):
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    return Engine(Paths(models_dir=tmp / "models", data_dir=tmp / "data", outdir=tmp / "outputs", demo_dir=demo_dir),
                  EngineSettings(device="cpu"))


def test_without_checkpoints_the_demo_is_the_default_and_generates_at_its_size(tmp_path, demo_dir):
    from pipelines.core.request import GenerationRequest

    engine = _engine(tmp_path, demo_dir)
    assert engine.default_checkpoint() == "demo-shapes.safetensors"
    assert engine.native_resolution(None) == 64
    result = engine.generate(GenerationRequest(prompt="a red circle on a blue background", steps=2, seed=1))
    assert result.images[0].size == (64, 64)
    assert "Model: demo-shapes" in result.infotexts[0]


def test_the_ui_labels_the_demo_and_drops_the_label_for_the_users_own_model(tmp_path, demo_dir):
    from webui.app import build_ui

    engine = _engine(tmp_path, demo_dir)
    webui = build_ui(engine).webui
    note = webui.components["demo_note"].value
    assert "Demo model" in note and "a red circle on a blue background" in note
    assert str(tmp_path / "models" / "Stable-diffusion") in note  # where the user's own models go
    assert webui.fields["txt2img"]["width"].value == 64

    write_tiny_sd1_checkpoint(tmp_path / "models" / "Stable-diffusion" / "mine.safetensors", seed=4)
    assert [f.name for f in engine.list_checkpoints()] == ["mine.safetensors"]  # the demo steps aside
    assert webui.demo_note("mine.safetensors") == ""
