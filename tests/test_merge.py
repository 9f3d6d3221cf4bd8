"""The checkpoint merger (A1111's Checkpoint Merger): through the engine, the API and the Merge tab.

Tiny SD 1.x / SD 2.x checkpoints in a models folder of this module's own (merged files are
written into it, so the session's shared folder stays as other tests expect it)."""

from __future__ import annotations

import json

import gradio as gr
import pytest
import torch
from conftest import make_engine
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import save_file
from test_webui import FakeEngine
from tiny import make_tiny, tiny_single_file_state_dict, write_tiny_checkpoint

from pipelines.core.fileio import sha256_file
from pipelines.core.hosted_limits import CPU_LIMITS
from pipelines.core.merge_request import MergeRequest
from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest, RequestError
from pipelines.core.settings import EngineSettings, Paths
from pipelines.engine import Engine
from webui.api import create_app
from webui.app import build_ui

M = 0.25


@pytest.fixture(scope="module")
def merge_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_models")
    ckpt = root / "Stable-diffusion"
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        write_tiny_checkpoint(ckpt / f"{name}.safetensors", seed=seed, dtype=torch.float32)
    write_tiny_checkpoint(ckpt / "other" / "sd2.safetensors", family="sd2", seed=3)
    write_tiny_checkpoint(ckpt / "a-inpainting.safetensors", seed=4, inpainting=True)
    unet, vae, encoders = make_tiny("sd1", seed=5)
    state = tiny_single_file_state_dict("sd1", unet, vae, encoders)
    vae_state = {k[len("first_stage_model."):]: v.contiguous() for k, v in state.items()
                 if k.startswith("first_stage_model.")}
    (root / "VAE").mkdir()
    save_file(vae_state, str(root / "VAE" / "tiny-vae.safetensors"))
    return root


@pytest.fixture(scope="module")
def merge_engine(merge_models, tmp_path_factory):
    return make_engine(merge_models, tmp_path_factory.mktemp("merge_engine"))


def tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open is no dict


def inputs(models, *names):
    return [tensors(models / "Stable-diffusion" / f"{n}.safetensors")[0] for n in names]


def test_weighted_sum_is_the_weighted_mean_exactly_in_fp32(merge_engine, merge_models):
    seen = []
    result = merge_engine.merge_checkpoints(
        MergeRequest("a.safetensors", "b", interp_method="Weighted sum", multiplier=M, save_as_half=False,
                     custom_name="ws"), on_progress=seen.append)
    assert result.name == "ws.safetensors" and not result.interrupted
    merged, meta = tensors(result.path)
    a, b = inputs(merge_models, "a", "b")
    assert set(merged) == set(a)
    for key, value in merged.items():
        if not a[key].is_floating_point():  # position ids and the like: copied from A
            assert torch.equal(value, a[key]), key
            continue
        assert value.dtype == torch.float32, key
        assert torch.equal(value, a[key] * (1 - M) + b[key] * M), key
    assert seen and seen[-1].fraction == 1.0 and seen[-1].steps == len(a)
    recipe = json.loads(meta["sd_merge_recipe"])
    sha_a = sha256_file(merge_models / "Stable-diffusion" / "a.safetensors")
    sha_b = sha256_file(merge_models / "Stable-diffusion" / "b.safetensors")
    assert recipe["primary_model_hash"] == sha_a and recipe["secondary_model_hash"] == sha_b
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == M
    assert recipe["tertiary_model_hash"] is None and recipe["save_as_half"] is False
    models = json.loads(meta["sd_merge_models"])
    assert models[sha_a]["name"] == "a.safetensors" and models[sha_b]["name"] == "b.safetensors"
    # listed at once, with its family, and it loads and generates
    listed = merge_engine.find_checkpoint("ws")
    assert listed is not None and listed.details.get("family_id") == merge_engine.find_checkpoint("a").details[
        "family_id"]
    out = merge_engine.generate(GenerationRequest(prompt="a cat", checkpoint="ws.safetensors", steps=2, width=64,
                                                  height=64, seed=1, save_images=False))
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    assert "Model: ws" in out.infotexts[0]


def test_add_difference_in_half_precision(merge_engine, merge_models):
    result = merge_engine.merge_checkpoints(
        MergeRequest("a", "b", "c", interp_method="Add difference", multiplier=0.5, custom_name="ad.safetensors"))
    assert result.name == "ad.safetensors"
    merged, meta = tensors(result.path)
    a, b, c = inputs(merge_models, "a", "b", "c")
    for key, value in merged.items():
        if not a[key].is_floating_point():
            continue
        expected = a[key] + (b[key] - c[key]) * 0.5
        assert value.dtype == torch.float16, key
        assert torch.equal(value, expected.to(torch.float16)), key  # computed in fp32, rounded once
        torch.testing.assert_close(value.float(), expected, rtol=1e-3, atol=1e-3)
    assert json.loads(meta["sd_merge_recipe"])["tertiary_model_hash"] is not None


def test_no_interpolation_bakes_in_the_vae(merge_engine, merge_models):
    result = merge_engine.merge_checkpoints(
        MergeRequest("a", interp_method="No interpolation", bake_in_vae="tiny-vae.safetensors", custom_name="baked"))
    merged, meta = tensors(result.path)
    (a,) = inputs(merge_models, "a")
    vae, _ = tensors(merge_models / "VAE" / "tiny-vae.safetensors")
    replaced = 0
    for key, value in merged.items():
        if key.startswith("first_stage_model."):
            expected = vae[key[len("first_stage_model."):]]
            replaced += 1
        else:
            expected = a[key]
        if not expected.is_floating_point():
            continue
        assert torch.equal(value, expected.to(torch.float16)), key
    assert replaced == len(vae)
    assert json.loads(meta["sd_merge_recipe"])["bake_in_vae"] == "tiny-vae.safetensors"


def test_refusals_name_the_field(merge_engine, merge_models):
    folder = merge_models / "Stable-diffusion"
    before = sorted(p.name for p in folder.rglob("*"))
    cases = [
        ({"primary_model_name": "a", "secondary_model_name": "sd2"}, "secondary_model_name", "famil"),
        ({"primary_model_name": "a", "secondary_model_name": "a-inpainting"}, "secondary_model_name", "shape"),
        ({"primary_model_name": "nope", "secondary_model_name": "b"}, "primary_model_name", "unknown"),
        ({"primary_model_name": "a", "secondary_model_name": "b", "bake_in_vae": "nope"}, "bake_in_vae", "unknown"),
        ({"primary_model_name": "a", "secondary_model_name": "b", "custom_name": "a"}, "custom_name", "exists"),
    ]
    for fields, field, words in cases:
        with pytest.raises(RequestError) as caught:
            merge_engine.merge_checkpoints(MergeRequest(**fields))
        assert caught.value.field == field and words in caught.value.message, (fields, caught.value)
    for fields, field in [({"custom_name": "../evil"}, "custom_name"), ({"custom_name": "sub/x"}, "custom_name"),
                          ({"multiplier": 1.5}, "multiplier"), ({"interp_method": "Sum"}, "interp_method"),
                          ({"secondary_model_name": ""}, "secondary_model_name"),
                          ({"interp_method": "Add difference"}, "tertiary_model_name")]:
        with pytest.raises(RequestError) as caught:
            MergeRequest(**{"primary_model_name": "a", "secondary_model_name": "b", **fields})
        assert caught.value.field == field
    assert sorted(p.name for p in folder.rglob("*")) == before  # nothing written


def test_a_hosted_demo_does_not_merge(merge_models, tmp_path):
    hosted = Engine(Paths(models_dir=merge_models, data_dir=tmp_path / "data", outdir=tmp_path / "out"),
                    EngineSettings(device="cpu", precision="full"), hosted_limits=CPU_LIMITS)
    folder = merge_models / "Stable-diffusion"
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(RequestError) as caught:  # visitors must not write files into the model folder
        hosted.merge_checkpoints(MergeRequest("a", "b"))
    assert caught.value.field == "primary_model_name" and "hosted demo" in caught.value.message
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_overwrite_and_interrupt(merge_engine, merge_models):
    folder = merge_models / "Stable-diffusion"
    first = merge_engine.merge_checkpoints(MergeRequest("a", "b", multiplier=0.0, custom_name="ow"))
    again = merge_engine.merge_checkpoints(MergeRequest("a", "b", multiplier=1.0, custom_name="ow", overwrite=True))
    assert first.path == again.path
    merged, _ = tensors(again.path)
    (b,) = inputs(merge_models, "b")
    assert all(torch.equal(v, b[k].half()) for k, v in merged.items() if v.is_floating_point())
    control = JobControl()
    result = merge_engine.merge_checkpoints(MergeRequest("a", "b", custom_name="stopped"), control=control,
                                            on_progress=lambda p: control.interrupt())
    assert result.interrupted and not result.name
    assert not (folder / "stopped.safetensors").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_api_merges_and_lists(merge_engine):
    client = TestClient(create_app(merge_engine))
    reply = client.post("/sdapi/v1/merge-checkpoints", json={
        "primary_model_name": "a", "secondary_model_name": "b", "interp_method": "Weighted sum",
        "multiplier": 0.5, "save_as_half": True, "custom_name": "api-merge"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["name"] == "api-merge.safetensors"
    names = [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert "api-merge" in names
    documented = client.get("/openapi.json").json()["paths"]["/sdapi/v1/merge-checkpoints"]["post"]
    assert "Checkpoint Merger" in documented["description"]
    for body, field in [({"primary_model_name": "a", "secondary_model_name": "b", "custom_name": "../x"},
                         "custom_name"),
                        ({"primary_model_name": "zzz", "secondary_model_name": "b"}, "primary_model_name"),
                        ({"primary_model_name": "a", "secondary_model_name": "sd2"}, "secondary_model_name"),
                        ({"primary_model_name": "a", "secondary_model_name": "b", "multiplier": 2}, "multiplier"),
                        ({"primary_model_name": "a", "secondary_model_name": "b", "multiplier": "x"}, "multiplier"),
                        ({"primary_model_name": "a", "secondary_model_name": "b", "custom_name": "api-merge"},
                         "custom_name")]:
        bad = client.post("/sdapi/v1/merge-checkpoints", json=body)
        assert bad.status_code == 422, (body, bad.text)
        assert bad.json()["field"] == field, bad.json()


def test_merge_tab_calls_the_engine_by_name():
    engine = FakeEngine()
    ui = build_ui(engine).webui
    assert set(ui.fields["merge"]) >= {"primary_model_name", "secondary_model_name", "tertiary_model_name",
                                       "interp_method", "multiplier", "save_as_half", "custom_name",
                                       "bake_in_vae", "overwrite"}
    out = ui.merge_tab.merge(primary_model_name="sd15", secondary_model_name="sdxl", tertiary_model_name=None,
                             interp_method="Weighted sum", multiplier=0.4, save_as_half=False,
                             custom_name=" mix ", bake_in_vae="None", overwrite=False)
    assert engine.merges == [MergeRequest("sd15", "sdxl", "", "Weighted sum", 0.4, False, "mix", "None", False)]
    assert "merged.safetensors" in out[0] and len(out) == 5  # the message, then the four checkpoint dropdowns
    with pytest.raises(gr.Error, match="custom_name"):
        ui.merge_tab.merge(primary_model_name="sd15", secondary_model_name="sdxl", custom_name="a/b")
    assert len(engine.merges) == 1


# --- pickled inputs (.ckpt / .pt) -------------------------------------------------------------------

def write_pickles(folder, *, zip_format: bool = True):
    """b as A1111's .ckpt (zip, under "state_dict"), c as an old-style (pre-zip) pickle, the VAE as .pt."""
    b, c = inputs(folder.parent, "b", "c")
    torch.save({"state_dict": b, "global_step": 7}, folder / "pb.ckpt")
    torch.save(c, folder / "pc-old.ckpt", _use_new_zipfile_serialization=False)
    vae, _ = tensors(folder.parent / "VAE" / "tiny-vae.safetensors")
    torch.save(vae, folder.parent / "VAE" / "tiny-vae.pt")


def test_ckpt_and_pt_inputs_merge_one_at_a_time_through_the_weights_only_reader(merge_engine, merge_models):
    folder = merge_models / "Stable-diffusion"
    write_pickles(folder)
    seen = []
    result = merge_engine.merge_checkpoints(
        MergeRequest("a", "pb.ckpt", "pc-old.ckpt", interp_method="Add difference", multiplier=0.5, save_as_half=False,
                     custom_name="from-pickles", bake_in_vae="tiny-vae.pt"), on_progress=seen.append)
    merged, meta = tensors(result.path)
    a, b, c = inputs(merge_models, "a", "b", "c")
    vae, _ = tensors(merge_models / "VAE" / "tiny-vae.safetensors")
    for key, value in merged.items():
        if key.startswith("first_stage_model."):
            assert torch.equal(value, vae[key[len("first_stage_model."):]].float()), key
        elif a[key].is_floating_point():
            assert torch.equal(value, a[key] + (b[key] - c[key]) * 0.5), key
        else:
            assert torch.equal(value, a[key]), key
    assert sorted(result.warnings) == sorted(
        f"{name} is a pickle, which cannot be streamed: it was read whole (weights only) and copied to a "
        "temporary .safetensors first" for name in ("pb.ckpt", "pc-old.ckpt", "tiny-vae.pt"))
    assert seen[-1].fraction == 1.0 and seen[-1].steps == len(a) + len(b) + len(c) + len(vae)  # copies counted
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["secondary_model_hash"] == sha256_file(folder / "pb.ckpt")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the temporary copies are gone
    assert merge_engine.find_checkpoint("from-pickles") is not None


class OpensAFile:
    """Unpickled by a plain pickle load, this opens (creates) a file: code run from a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_with_code_and_a_diffusers_folder_are_refused_naming_the_field(merge_engine, merge_models,
                                                                               tmp_path):
    folder = merge_models / "Stable-diffusion"
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": OpensAFile(marker)}, folder / "evil.ckpt")
    (folder / "pipeline").mkdir()
    (folder / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for fields, field, words in [
        ({"primary_model_name": "a", "secondary_model_name": "evil.ckpt"}, "secondary_model_name", "evil.ckpt"),
        ({"primary_model_name": "pipeline", "secondary_model_name": "a"}, "primary_model_name", "diffusers folder"),
        ({"primary_model_name": "a", "secondary_model_name": "b", "tertiary_model_name": "pipeline",
          "interp_method": "Add difference"}, "tertiary_model_name", "diffusers folder")]:
        with pytest.raises(RequestError) as caught:
            merge_engine.merge_checkpoints(MergeRequest(**fields))
        assert caught.value.field == field and words in caught.value.message, caught.value
    assert not marker.exists()  # weights_only refused it before anything ran, and nothing retried without
