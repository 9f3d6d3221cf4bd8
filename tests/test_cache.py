"""The loaded-model cache: weights straight from the mapped file, flat RSS over many switches,
eviction within the budget, and a broken file that leaves the cache as it was."""

from __future__ import annotations

import gc
import os
import sys

import psutil
import pytest
import torch
from tiny import write_tiny_checkpoint

from pipelines.core.settings import EngineSettings
from pipelines.models.build import load_components
from pipelines.models.checkpoint_file import CheckpointError
from pipelines.models.device import choose_placement
from pipelines.models.manager import ModelManager


def mapped_ranges(path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == str(path):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_weights_are_views_of_the_file_at_its_own_dtype(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "fp16.safetensors", family="sdxl", dtype=torch.float16)
    components = load_components(path, dtype=torch.float16)
    ranges = mapped_ranges(path.resolve())
    assert ranges, "the file is not mapped"
    params = [p for m in components.modules() for p in m.parameters()]
    inside = [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params]
    # everything but the few tensors a conversion must copy (the bigG projection transposed)
    assert sum(inside) >= len(params) - 2, f"{len(params) - sum(inside)} of {len(params)} weights were copied"
    # cast on the way: at fp32 nothing points into the file any more, and the mapping is gone
    del components, params
    gc.collect()
    components = load_components(path, dtype=torch.float32)
    assert components.unet.dtype == torch.float32
    gc.collect()
    assert not mapped_ranges(path.resolve())


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.skipif(sys.platform != "linux", reason="RSS accounting checked on Linux")
def test_rss_stays_flat_over_20_switches(tmp_path):
    paths = [
        write_tiny_checkpoint(tmp_path / "a.safetensors", family="sd1", seed=1),
        write_tiny_checkpoint(tmp_path / "b.safetensors", family="sd2", seed=2),
        write_tiny_checkpoint(tmp_path / "c.safetensors", family="sdxl", seed=3),
    ]
    placement = choose_placement(EngineSettings(device="cpu", precision="full"))
    sizes = [load_components(p, probe=False).nbytes() for p in paths]
    # room for two of them, never three: cycling through all three evicts on every switch
    manager = ModelManager(placement, budget_bytes=sum(sizes) - min(sizes) // 2)
    for i in (0, 1, 2):  # the first round: everything loaded once, caches warmed
        manager.get(paths[i].name, paths[i])
    baseline = rss()
    peak = baseline
    loads = 0
    for switch in range(20):
        i = switch % 3
        before = manager.loaded_names()
        manager.get(paths[i].name, paths[i])
        loads += paths[i].name not in before
        assert manager.cached_bytes() <= manager.budget_bytes
        peak = max(peak, rss())
    assert loads >= 10, f"the budget should have forced reloads (only {loads})"
    assert peak <= baseline * 1.05, f"RSS grew from {baseline >> 20} MiB to {peak >> 20} MiB"


def test_a_cached_model_is_returned_as_is_and_lru_order_holds(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a.safetensors", seed=1)
    b = write_tiny_checkpoint(tmp_path / "b.safetensors", seed=2)
    manager = ModelManager(choose_placement(EngineSettings(device="cpu")), budget_bytes=1 << 40)
    first = manager.get("a", a)
    manager.get("b", b)
    assert manager.get("a", a) is first
    assert manager.loaded_names() == ["a", "b"]  # most recent first
    memory = manager.memory()
    assert memory["cache_bytes"] == sum(m["bytes"] for m in memory["models"]) > 0
    assert memory["process_rss_bytes"] > 0
    assert manager.unload("b") and manager.loaded_names() == ["a"]
    manager.unload_all()
    assert manager.loaded_names() == [] and manager.cached_bytes() == 0


def test_a_broken_file_evicts_nothing(tmp_path):
    good = write_tiny_checkpoint(tmp_path / "good.safetensors", seed=1)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, lora)
    # a budget so small that any new load would evict the good model
    manager = ModelManager(choose_placement(EngineSettings(device="cpu")), budget_bytes=1)
    model = manager.get("good", good)
    for bad in (broken, lora):
        with pytest.raises((CheckpointError, ValueError)):
            manager.get(bad.name, bad)
        assert manager.loaded_names() == ["good"]
    assert manager.get("good", good) is model


def test_hash_on_request_runs_in_the_background_with_progress(tmp_path):
    import hashlib

    from conftest import make_engine

    models = tmp_path / "models"
    path = write_tiny_checkpoint(models / "Stable-diffusion" / "x.safetensors", seed=1)
    engine = make_engine(models, tmp_path)
    assert engine.list_checkpoints()[0].short_hash is None  # listing never hashes
    seen = []
    thread = engine.registry.hash_in_background("checkpoints", "x.safetensors", seen.append)
    thread.join(30)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    assert engine.registry.hash_progress("checkpoints", "x.safetensors") is None  # done
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert engine.list_checkpoints()[0].short_hash == sha[:10]
    assert engine.registry.hash_in_background("checkpoints", "x.safetensors") is None  # cached: nothing to do
