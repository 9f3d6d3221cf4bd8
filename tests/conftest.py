"""Shared fixtures: tiny checkpoints in the real single-file layout, and engines over them."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import tiny` from any test

from tiny import write_tiny_sd1_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """models/ with a plain and a 9-channel inpainting tiny SD 1.x checkpoint."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_sd1_checkpoint(root / "Stable-diffusion" / "tiny.safetensors", seed=0)
    write_tiny_sd1_checkpoint(root / "Stable-diffusion" / "inpaint" / "tiny-inpainting.safetensors",
                              seed=1, inpainting=True)
    return root


def make_engine(models_dir: Path, tmp: Path):
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    # fp32: tests compare pixels with diffusers and across code paths exactly; the `auto`
    # precision (bf16 on CPUs with AVX512-BF16/AMX) is tested in test_precision_memory.py
    return Engine(Paths(models_dir=models_dir, data_dir=tmp / "data", outdir=tmp / "outputs"),
                  EngineSettings(device="cpu", precision="full"))


@pytest.fixture(scope="session")
def engine(models_dir, tmp_path_factory):
    """One engine for the session (its model cache is what makes the suite fast)."""
    return make_engine(models_dir, tmp_path_factory.mktemp("engine"))


@pytest.fixture
def no_network(monkeypatch):
    """The Hub told to stay offline and every socket connection failing the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
