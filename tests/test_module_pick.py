"""Forge's "VAE / Text Encoder" pick: a Forge user with t5xxl_fp16 and t5xxl_fp8_e4m3fn in
models/text_encoder picks one, on the page, through the API (`forge_additional_modules`) or by
pasting an infotext (`Module 1: ...`); a file that does not fit the checkpoint is refused, naming
the field and the file, before anything loads; an SD 1.5 checkpoint says a chosen encoder was
not used."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_engine
from safetensors.torch import load_file, save_file
from test_webui import FakeEngine, fake_request, values
from tiny import write_tiny_sd1_checkpoint
from tiny_flux import flux_state_dicts, make_tiny_flux, write_tiny_flux
from tiny_sd3 import make_tiny_sd3, write_tiny_sd3

from pipelines.core import module_choice
from pipelines.core.request import GenerationRequest, RequestError
from webui.api import ApiOptions
from webui.api.bodies import Txt2ImgRequest
from webui.api.errors import ApiError
from webui.api.translate import prepare_generation
from webui.app import build_ui

BARE = "flux1-dev.safetensors"
FP8_T5 = "t5xxl_fp8_e4m3fn.safetensors"


@pytest.fixture(scope="module")
def forge_models(tmp_path_factory):
    """models/ as a Forge user has it: BFL's bare flux1-dev and an SD 1.5 file; ae.safetensors, another
    16-channel VAE and SD 1.5's VAE in VAE/; clip_l, clip_g, t5xxl_fp16 and an fp8 T5 (other weights)
    with T5's tokenizer in text_encoder/."""
    root = tmp_path_factory.mktemp("forge-models")
    files = write_tiny_flux(tmp_path_factory.mktemp("flux-files"), make_tiny_flux(seed=7))
    other = flux_state_dicts(make_tiny_flux(seed=8))
    for folder in ("Stable-diffusion", "VAE"):
        (root / folder).mkdir()
    shutil.copy(files.bare, root / "Stable-diffusion" / BARE)
    sd15 = root / "Stable-diffusion" / "sd15.safetensors"
    write_tiny_sd1_checkpoint(sd15, seed=0)
    shutil.copy(files.vae, root / "VAE" / "ae.safetensors")
    save_file(other["vae"], str(root / "VAE" / "other16.safetensors"))  # 16 channels, not named for Flux
    sd_vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(sd15)).items()
              if k.startswith("first_stage_model.")}
    save_file(sd_vae, str(root / "VAE" / "sd15_vae.safetensors"))
    shutil.copytree(files.text_encoder_dir, root / "text_encoder")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in other["t5xxl"].items()}, str(root / "text_encoder" / FP8_T5))
    sd3 = write_tiny_sd3(tmp_path_factory.mktemp("sd3-files"), make_tiny_sd3(seed=2))
    shutil.copy(sd3.text_encoder_dir / "clip_g.safetensors", root / "text_encoder" / "clip_g.safetensors")
    return root


@pytest.fixture(scope="module")
def engine(forge_models, tmp_path_factory):
    return make_engine(forge_models, tmp_path_factory.mktemp("module-pick-engine"))


def generate(engine, **fields):
    base = dict(prompt="a red circle", seed=3, steps=2, sampler="Euler", cfg_scale=1.0, width=64, height=64,
                checkpoint=BARE, save_images=False)
    return engine.generate(GenerationRequest(**{**base, **fields}))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float64)


def test_the_engine_lists_the_text_encoder_files(engine):
    assert engine.text_encoder_names() == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                           FP8_T5]


def test_a_chosen_t5_replaces_the_folders_first_and_is_a_cache_entry_of_its_own(engine):
    automatic = generate(engine)
    first = generate(engine, text_encoders=["t5xxl_fp16.safetensors"])  # what automatic pairing takes
    fp8 = generate(engine, text_encoders=[FP8_T5])
    assert np.array_equal(pixels(first), pixels(automatic))
    assert not np.array_equal(pixels(fp8), pixels(automatic))  # another T5: another prompt embedding
    again = generate(engine)
    assert np.array_equal(pixels(again), pixels(automatic))  # the automatic entry was left as it was
    entries = [m["name"] for m in engine.cache_memory()["models"]]
    assert entries.count(BARE) == 2 and engine.loaded_checkpoints() == [BARE]  # fp16 was the automatic one
    assert "Module 1: t5xxl_fp8_e4m3fn" in fp8.infotexts[0]  # Forge's line
    assert "Module 1" not in automatic.infotexts[0]


def test_a_pasted_module_line_picks_the_same_file(engine):
    fp8 = generate(engine, text_encoders=[FP8_T5])
    from pipelines.core import infotext

    fields = infotext.request_fields_from_infotext(fp8.infotexts[0])
    assert fields["text_encoders"] == ("t5xxl_fp8_e4m3fn",)
    assert np.array_equal(pixels(generate(engine, text_encoders=fields["text_encoders"])), pixels(fp8))
    assert module_choice.listed_names(fields["text_encoders"], engine.text_encoder_names()) == [FP8_T5]


def test_a_chosen_16_channel_vae_is_the_bare_transformers_vae(engine):
    automatic = generate(engine)  # ae.safetensors: the one VAE named for Flux
    chosen = generate(engine, vae="other16.safetensors")
    assert not np.array_equal(pixels(chosen), pixels(automatic))
    assert "VAE: other16.safetensors" in chosen.infotexts[0]
    as_module = generate(engine, text_encoders=["other16.safetensors"])  # Forge lists VAEs among its modules
    assert np.array_equal(pixels(as_module), pixels(chosen))


@pytest.mark.parametrize("fields, field, words", [
    ({"text_encoders": ["clip_g.safetensors"]}, "text_encoders", ("clip_g.safetensors", "CLIP-G", "Flux.1")),
    ({"text_encoders": [FP8_T5, "t5xxl_fp16.safetensors"]}, "text_encoders", (FP8_T5, "t5xxl_fp16", "choose one")),
    ({"text_encoders": ["t5xxl_bf16.safetensors"]}, "text_encoders", ("t5xxl_bf16", "available")),
    ({"vae": "sd15_vae.safetensors"}, "vae", ("sd15_vae.safetensors", "16-channel", "Flux.1")),
    ({"text_encoders": ["sd15_vae.safetensors"]}, "text_encoders", ("sd15_vae.safetensors", "neither")),
])
def test_a_file_that_does_not_fit_is_refused_before_anything_loads(engine, fields, field, words):
    engine.manager.unload_all()
    with pytest.raises(RequestError) as error:
        generate(engine, **fields)
    assert error.value.field == field
    assert all(word in error.value.message for word in words), error.value.message
    assert engine.loaded_checkpoints() == [] and engine.queue.running() is None


def test_an_sd15_checkpoint_says_a_chosen_encoder_was_not_used_and_refuses_a_flux_vae(engine):
    plain = generate(engine, checkpoint="sd15.safetensors", sampler="DPM++ 2M")
    picked = generate(engine, checkpoint="sd15.safetensors", sampler="DPM++ 2M", text_encoders=["clip_l.safetensors"])
    assert np.array_equal(pixels(picked), pixels(plain))
    assert any("clip_l.safetensors not used" in w and "SD 1.x" in w for w in picked.warnings), picked.warnings
    with pytest.raises(RequestError) as error:
        generate(engine, checkpoint="sd15.safetensors", vae="ae.safetensors")
    assert error.value.field == "vae" and "ae.safetensors" in error.value.message


def test_the_request_field_takes_a_list_of_names_and_names_itself_when_bad():
    assert GenerationRequest(text_encoders=["a.safetensors", " a.safetensors", ""]).text_encoders == ("a.safetensors",)
    assert GenerationRequest(text_encoders=None).text_encoders == ()
    with pytest.raises(RequestError) as error:
        GenerationRequest(text_encoders=[3])
    assert error.value.field == "text_encoders"


def test_forge_infotext_lines_round_trip():
    params = module_choice.infotext_params(["ae.safetensors", "D:\\forge\\models\\text_encoder\\clip_l.safetensors"])
    assert params == {"Module 1": "ae", "Module 2": "clip_l"}
    assert module_choice.from_infotext({**params, "Steps": "20"}) == ("ae", "clip_l")


# --- the API: Forge's forge_additional_modules -------------------------------------------------

FORGE_PATHS = ["D:\\0_AI\\forge\\models\\VAE\\ae.safetensors", "/srv/forge/models/text_encoder/" + FP8_T5]


def test_forge_additional_modules_in_override_settings_split_into_vae_and_text_encoders(engine):
    body = Txt2ImgRequest(prompt="x", override_settings={"sd_model_checkpoint": BARE,
                                                          "forge_additional_modules": FORGE_PATHS})
    prepared = prepare_generation(engine, body, ApiOptions())
    assert prepared.request.text_encoders == (FP8_T5,) and prepared.request.vae == "ae.safetensors"
    assert not any("forge_additional_modules" in w for w in prepared.warnings)  # not an ignored setting
    assert prepared.api_field("text_encoders") == "override_settings.forge_additional_modules"


def test_forge_additional_modules_as_a_server_option_apply_to_later_requests(engine):
    options = ApiOptions()
    report = options.update(engine, {"forge_additional_modules": FORGE_PATHS})
    assert report["updated"]["forge_additional_modules"] == ["ae.safetensors", FP8_T5]
    prepared = prepare_generation(engine, Txt2ImgRequest(prompt="x"), options)
    assert prepared.request.text_encoders == (FP8_T5,) and prepared.request.vae == "ae.safetensors"
    assert options.public(engine)["forge_additional_modules"] == ["ae.safetensors", FP8_T5]


@pytest.mark.parametrize("modules, words", [
    (["/forge/models/text_encoder/t5xxl_bf16.safetensors"], ("t5xxl_bf16.safetensors", "neither")),
    (["ae.safetensors", "other16.safetensors"], ("ae.safetensors", "other16.safetensors", "choose one")),
    ("not a list", ("neither",)),
    ([1, 2], ("list",)),
])
def test_bad_forge_modules_are_a_422_naming_the_field(engine, modules, words):
    body = Txt2ImgRequest(prompt="x", override_settings={"forge_additional_modules": modules})
    with pytest.raises(ApiError) as error:
        prepare_generation(engine, body, ApiOptions())
    assert error.value.status == 422 and error.value.field == "override_settings.forge_additional_modules"
    assert all(word in error.value.message for word in words), error.value.message


# --- the page's header ---------------------------------------------------------------------------

def test_the_header_offers_the_text_encoder_files_beside_the_vae_and_sends_the_pick():
    engine = FakeEngine()
    engine.text_encoders = ["clip_l.safetensors", FP8_T5, "t5xxl_fp16.safetensors"]
    ui = build_ui(engine).webui
    pick = ui.components["text_encoders"]
    assert pick.multiselect and pick.visible and pick.value == []
    assert [value for _, value in pick.choices] == engine.text_encoders  # sent as listed file names
    assert [label for label, _ in pick.choices] == ["clip_l", "t5xxl_fp8_e4m3fn", "t5xxl_fp16"]
    assert ui.components["vae"].elem_id == "sd_vae"  # A1111's VAE dropdown stays as it was


def test_the_header_hides_the_pick_when_there_are_no_text_encoder_files():
    ui = build_ui(FakeEngine()).webui
    assert not ui.components["text_encoders"].visible


def test_each_generation_tab_sends_the_header_pick_with_its_request():
    engine = FakeEngine()
    engine.text_encoders = ["clip_l.safetensors", FP8_T5]
    ui = build_ui(engine).webui
    for mode in ("txt2img", "img2img", "inpaint"):
        assert ui.fields[mode]["text_encoders"] is ui.components["text_encoders"]  # an input by name, as the VAE
    ui.generate("txt2img", values(ui, "txt2img", prompt="x", text_encoders=[FP8_T5]), request=fake_request("s1"))
    assert engine.requests[-1].text_encoders == (FP8_T5,)


def test_sd3_loads_a_chosen_t5_and_keeps_the_folders_clips(tmp_path):
    from tiny_sd3 import sd3_state_dicts

    from pipelines.models.checkpoint_file import read_header
    from pipelines.models.flux_build import load_checkpoint_components
    from pipelines.models.sd3_files import T5XXL, encoder_weights

    files = write_tiny_sd3(tmp_path / "sd3", make_tiny_sd3(seed=2))
    prefix = "text_encoders.t5xxl.transformer."
    other_t5 = {k[len(prefix):]: v for k, v in sd3_state_dicts(make_tiny_sd3(seed=9))["t5xxl"].items()}
    chosen_file = tmp_path / "elsewhere" / "t5xxl_other.safetensors"
    chosen_file.parent.mkdir()
    save_file(other_t5, str(chosen_file))
    chosen = {T5XXL: encoder_weights(read_header(chosen_file))}
    automatic = load_checkpoint_components(files.transformer_only, text_encoder_dir=files.text_encoder_dir)
    picked = load_checkpoint_components(files.transformer_only, text_encoder_dir=files.text_encoder_dir, chosen=chosen)
    weight = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(picked.text_encoders[2].state_dict()[weight], other_t5[weight])
    assert not torch.equal(automatic.text_encoders[2].state_dict()[weight], other_t5[weight])
    for clip, same in zip(picked.text_encoders[:2], automatic.text_encoders[:2]):  # CLIP-L, CLIP-G: the folder's
        assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), same.state_dict().values()))


def test_read_parameters_puts_forges_module_lines_into_the_header_pick():
    engine = FakeEngine()
    engine.text_encoders = ["clip_l.safetensors", FP8_T5]
    ui = build_ui(engine).webui
    text = "a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Module 1: ae, Module 2: t5xxl_fp8_e4m3fn"
    updates = ui.read_parameters("txt2img", text, last=None, checkpoint="sd15")
    assert updates[ui.components["text_encoders"]] == [FP8_T5]  # ae is a VAE: not a models/text_encoder file


def test_forge_clients_list_the_modules_and_send_back_their_filenames(engine):
    from fastapi.testclient import TestClient

    from webui.api import create_app

    client = TestClient(create_app(engine))
    modules = client.get("/sdapi/v1/sd-modules").json()
    assert {m["model_name"] for m in modules} >= {"ae.safetensors", "clip_l.safetensors", FP8_T5}
    chosen = [m["filename"] for m in modules if m["model_name"] in ("ae.safetensors", FP8_T5)]
    assert client.post("/sdapi/v1/options", json={"forge_additional_modules": chosen}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["forge_additional_modules"] == ["ae.safetensors", FP8_T5]
    refused = client.post("/sdapi/v1/options", json={"forge_additional_modules": ["t5xxl_bf16.safetensors"]})
    assert refused.status_code == 422 and "forge_additional_modules" in refused.text
