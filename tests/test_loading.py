"""Loading single-file checkpoints: the weights arrive intact, bad files are refused clearly."""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import threading
import time

import pytest
import torch
from conftest import make_engine
from safetensors.torch import load_file
from tiny import make_tiny_sd1, write_tiny_sd1_checkpoint

from pipelines.core.request import GenerationRequest
from pipelines.models.build import load_components
from pipelines.models.checkpoint_file import CheckpointError, read_header
from pipelines.models.inspection import inspect_checkpoint


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    return write_tiny_sd1_checkpoint(tmp_path_factory.mktemp("ck") / "fp32.safetensors", seed=3, dtype=None)


def test_every_weight_arrives_exactly(fp32_checkpoint):
    components = load_components(fp32_checkpoint)
    unet, vae, text_encoder = make_tiny_sd1(seed=3)
    for expected, loaded in ((unet, components.unet), (vae, components.vae),
                             (text_encoder, components.text_encoders[0])):
        want, got = expected.state_dict(), loaded.state_dict()
        assert set(want) == set(got)
        for key in want:
            assert torch.equal(want[key], got[key]), key
    assert not any(p.is_meta for m in components.modules() for p in m.parameters())


def test_loading_leaves_other_threads_weight_init_and_the_collector_as_they_were(fp32_checkpoint, tmp_path):
    """The loader skips random init for its meta modules only: a model (an upscaler, a LoRA
    layer) initialised in another thread meanwhile still gets real random weights, and the
    cyclic garbage collector paused for the load runs again afterwards, even after a failure."""
    from pipelines.models import build

    original_normal = torch.nn.init.normal_
    initialised = torch.zeros(1000)
    with build.empty_modules():
        meta_layer = torch.nn.Linear(8, 8)
        worker = threading.Thread(target=lambda: torch.nn.init.normal_(initialised))
        worker.start()
        worker.join()
    assert meta_layer.weight.is_meta
    assert initialised.std() > 0.5
    assert torch.nn.init.normal_ is original_normal
    load_components(fp32_checkpoint)
    assert gc.isenabled()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(fp32_checkpoint.read_bytes()[:100_000])
    with pytest.raises(CheckpointError):
        load_components(truncated)
    assert gc.isenabled()


def test_family_and_variant_are_read_from_the_file(models_dir):
    plain = inspect_checkpoint(read_header(models_dir / "Stable-diffusion" / "tiny.safetensors"))
    inpaint = inspect_checkpoint(read_header(
        models_dir / "Stable-diffusion" / "inpaint" / "tiny-inpainting.safetensors"))
    assert (plain.description, plain.inpainting, plain.native_resolution) == ("SD 1.x", False, 512)
    assert (inpaint.description, inpaint.inpainting) == ("SD 1.x inpainting", True)
    assert plain.unet_config["block_out_channels"] == [32, 64]
    assert plain.vae_config["block_out_channels"] == [32, 32, 32, 32]


def test_run_dtype_is_applied_while_loading(fp32_checkpoint):
    components = load_components(fp32_checkpoint, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert components.unet.dtype == torch.bfloat16
    assert components.text_encoders[0].dtype == torch.bfloat16
    assert components.vae.dtype == torch.float32


def test_channels_last_is_made_while_loading_with_the_same_values(fp32_checkpoint):
    plain = load_components(fp32_checkpoint, dtype=torch.bfloat16)
    nhwc = load_components(fp32_checkpoint, dtype=torch.bfloat16, unet_channels_last=True, vae_channels_last=True)
    for module in (nhwc.unet, nhwc.vae):
        convs = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in ((plain.unet, nhwc.unet), (plain.vae, nhwc.vae)):
        want, got = a.state_dict(), b.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_format_is_decided_by_content_not_name(fp32_checkpoint, tmp_path):
    disguised = tmp_path / "model.ckpt"
    shutil.copy(fp32_checkpoint, disguised)
    assert read_header(disguised).format == "safetensors"
    # a plain torch.save'd state dict loads through weights_only, with the same weights
    as_torch = tmp_path / "plain.ckpt"
    torch.save({"state_dict": load_file(fp32_checkpoint)}, as_torch)
    loaded = load_components(as_torch)
    reference = load_components(fp32_checkpoint)
    assert torch.equal(loaded.unet.conv_in.weight, reference.unet.conv_in.weight)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sdui-pwned",))


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = "/tmp/sdui-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    hostile = tmp_path / "evil.ckpt"
    with open(hostile, "wb") as f:
        pickle.dump({"state_dict": {"x": Exploit()}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        read_header(hostile)
    assert not os.path.exists(marker)


def test_garbage_and_truncated_files_are_refused(fp32_checkpoint, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a model" * 100)
    with pytest.raises(CheckpointError, match="not a safetensors or PyTorch"):
        read_header(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(fp32_checkpoint.read_bytes()[: fp32_checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(truncated)


def test_broken_checkpoint_fails_clearly_and_the_loaded_one_still_works(models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    good = root / "Stable-diffusion" / "tiny.safetensors"
    (root / "Stable-diffusion" / "broken.safetensors").write_bytes(good.read_bytes()[:100_000])
    engine = make_engine(root, tmp_path)
    request = GenerationRequest(prompt="x", steps=1, width=64, height=64, checkpoint="tiny.safetensors",
                                save_images=False)
    engine.generate(request)
    listed = {f.name: f for f in engine.list_checkpoints()}
    assert "truncated" in listed["broken.safetensors"].details["error"]
    with pytest.raises(CheckpointError, match="truncated"):
        engine.generate(request.replace(checkpoint="broken.safetensors"))
    assert len(engine.generate(request).images) == 1
    assert engine.default_checkpoint() != "broken.safetensors"


def test_the_default_checkpoint_is_a_general_model_not_an_inpainting_one_or_a_refiner(models_dir, tmp_path):
    from tiny import write_tiny_checkpoint

    root = tmp_path / "models"
    folder = root / "Stable-diffusion"
    folder.mkdir(parents=True)
    shutil.copy(models_dir / "Stable-diffusion" / "inpaint" / "tiny-inpainting.safetensors",
                folder / "a-inpainting.safetensors")
    write_tiny_checkpoint(folder / "b-refiner.safetensors", family="sdxl_refiner")
    engine = make_engine(root, tmp_path)
    assert [f.name for f in engine.list_checkpoints()][0] == "a-inpainting.safetensors"
    assert engine.default_checkpoint() == "a-inpainting.safetensors"  # nothing else: the first one
    shutil.copy(models_dir / "Stable-diffusion" / "tiny.safetensors", folder / "c.safetensors")
    engine.list_checkpoints(refresh=True)
    assert engine.default_checkpoint() == "c.safetensors"


def test_listing_never_hashes_and_the_hash_is_cached(models_dir, tmp_path):
    engine = make_engine(models_dir, tmp_path)
    files = {f.name: f for f in engine.list_checkpoints()}
    assert set(files) == {"tiny.safetensors", "inpaint/tiny-inpainting.safetensors"}
    assert files["tiny.safetensors"].short_hash is None
    engine.load_checkpoint("tiny.safetensors")
    import hashlib

    sha = hashlib.sha256((models_dir / "Stable-diffusion" / "tiny.safetensors").read_bytes()).hexdigest()
    listed = {f.name: f for f in engine.list_checkpoints()}
    assert listed["tiny.safetensors"].short_hash == sha[:10]
    # a new engine (a restart) reads the hash from the cache file instead of re-hashing
    again = {f.name: f for f in make_engine(models_dir, tmp_path).list_checkpoints()}
    assert again["tiny.safetensors"].short_hash == sha[:10]
    assert "tiny" in engine.loaded_checkpoints()[0]


def test_listing_notices_new_files(models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    engine = make_engine(root, tmp_path)
    before = [f.name for f in engine.list_checkpoints()]
    time.sleep(0.01)
    shutil.copy(root / "Stable-diffusion" / "tiny.safetensors", root / "Stable-diffusion" / "inpaint" / "new.safetensors")
    after = [f.name for f in engine.list_checkpoints()]
    assert "inpaint/new.safetensors" in after and "inpaint/new.safetensors" not in before


def test_loading_never_touches_the_network(fp32_checkpoint, no_network):
    components = load_components(fp32_checkpoint)
    assert components.tokenizers[0]("a cat").input_ids == [49406, 320, 2368, 49407]


def test_a_resolution_stated_in_the_metadata_is_the_default_size(tmp_path):
    small = write_tiny_sd1_checkpoint(tmp_path / "demo.safetensors", metadata={"sdui.native_resolution": "64"})
    spec = inspect_checkpoint(read_header(small))
    assert spec.native_resolution == 64
    spec_768 = inspect_checkpoint(read_header(write_tiny_sd1_checkpoint(
        tmp_path / "ft.safetensors", metadata={"modelspec.resolution": "768x768"})))
    assert spec_768.native_resolution == 768
    odd = write_tiny_sd1_checkpoint(tmp_path / "odd.safetensors", metadata={"modelspec.resolution": "huge"})
    assert inspect_checkpoint(read_header(odd)).native_resolution == 512
