"""What the UI and the API learn about IP-Adapters before a job (the encoder each one reads, or which
file is missing and where it goes), the image embeddings kept across jobs, and the warnings a job
gives where its image prompts or its regions do not act."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_ip_adapter import BASE, make_registry, prompt_image, unit
from tiny import write_tiny_checkpoint
from tiny_ip_adapter import write_tiny_image_encoder, write_tiny_ip_adapter

from pipelines.core.regions import Region
from pipelines.core.request import GenerationRequest
from pipelines.generate import generation, ip_adapter, regions
from pipelines.models.build import load_components


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ipa_listing")
    components = load_components(write_tiny_checkpoint(root / "model.safetensors", family="sd1", seed=0, dtype=None))
    return root, components, make_registry(root / "models", components.unet, "sd1")


def listed(registry) -> dict[str, dict]:
    return {file.name: file.details for file in ip_adapter.control_model_list(registry, refresh=True)}


def test_each_adapter_says_which_encoder_it_reads_or_where_the_missing_one_goes(setup):
    root, components, registry = setup
    write_tiny_ip_adapter(root / "models" / "ipadapter" / "wide.safetensors", components.unet, "base", 3,
                          encoder_width=48)  # no encoder here projects to 48
    details = listed(registry)
    for name in ("ip-adapter-base_sd1.safetensors", "ip-adapter-plus_sd1.safetensors", "ip-adapter_sd1.bin"):
        assert details[name]["control_type"] == "ip_adapter"
        assert details[name]["image_encoder"] == "CLIP-ViT-tiny.safetensors" and "missing" not in details[name]
    wide = details["wide.safetensors"]
    assert "image_encoder" not in wide and not wide.get("error")
    assert "projection width 48" in wide["missing"] and "models/clip_vision" in wide["missing"]


def test_the_same_image_is_encoded_once_across_jobs(setup):
    _, components, registry = setup
    loads = []

    def counting_loader(path, dtype):
        loads.append(path)
        return ip_adapter.load_image_encoder(path, dtype)

    def prepare(image):
        request = GenerationRequest(**BASE, control_units=(unit("sd1", image=image),))
        _, units = ip_adapter.split_units(request.control_units, registry)
        return ip_adapter.prepare_image_prompts(request, units, registry=registry, unet=components.unet,
                                                device="cpu", load_encoder=counting_loader).prompts[0]

    ip_adapter.embedding_slot.cache_clear()
    first, again = prepare(prompt_image()), prepare(prompt_image().copy())  # equal pixels, another object
    assert len(loads) == 1 and torch.equal(first.embeds, again.embeds)
    other = prepare(prompt_image().transpose(0))  # other pixels: encoded anew
    assert len(loads) == 2 and not torch.equal(other.embeds, first.embeds)
    fresh = ip_adapter.encode_image_prompt(ip_adapter.load_image_encoder(
        registry.find("clip_vision", "CLIP-ViT-tiny.safetensors").path, components.unet.dtype),
        ip_adapter.image_processor(32), prompt_image(), False, "cpu")[0]
    assert np.allclose(fresh.numpy(), first.embeds.numpy())  # what the cache holds is the encoder's answer


def test_a_new_encoder_file_is_not_served_from_the_cache(setup, tmp_path):
    _, components, _ = setup
    registry = make_registry(tmp_path / "models", components.unet, "sd1")
    request = GenerationRequest(**BASE, control_units=(unit("sd1"),))
    _, units = ip_adapter.split_units(request.control_units, registry)

    def embeds():
        return ip_adapter.prepare_image_prompts(request, units, registry=registry, unet=components.unet,
                                                device="cpu").prompts[0].embeds

    before = embeds()
    write_tiny_image_encoder(tmp_path / "models" / "clip_vision" / "CLIP-ViT-tiny.safetensors", seed=5)
    registry.list("clip_vision", refresh=True)
    assert not torch.equal(embeds(), before)


def test_notes_where_image_prompts_do_not_act():
    request = GenerationRequest(**BASE, refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.6,
                                enable_hr=True, hr_checkpoint_name="other.safetensors", hr_upscaler="Latent")
    units = [(0, unit("sd1"))]
    first, second = ip_adapter.unused_notes(request, units)
    assert "Switch at 0.6" in first and "refiner.safetensors" in first
    assert "first pass" in second and "other.safetensors" in second
    assert ip_adapter.unused_notes(request, []) == []
    assert ip_adapter.unused_notes(GenerationRequest(**BASE, enable_hr=True, hr_upscaler="Latent"), units) == []


def test_notes_where_regions_do_not_act():
    boxes = (Region("red", box=(0, 0, 0.5, 1)),)
    refined = GenerationRequest(**BASE, regions=boxes, refiner_checkpoint="refiner.safetensors")
    (note,) = regions.unused_notes(refined)
    assert "refiner takes over" in note and "Switch at 0.8" in note
    (flow,) = regions.unused_notes(GenerationRequest(**{**BASE, "prompt": "a ADDCOL b"}), flow=True)
    assert "SD 3" in flow
    assert regions.unused_notes(GenerationRequest(**BASE, refiner_checkpoint="r.safetensors")) == []
    assert regions.unused_notes(GenerationRequest(**BASE, regions=boxes)) == []
    assert "tiles" in regions.tiles_note(refined) and regions.tiles_note(GenerationRequest(**BASE)) is None


# --- through the engine (once generate/generation.py gives the notes) ----------------------------------

NOTES_WIRED = "unused_notes" in Path(generation.__file__).read_text()


@pytest.mark.skipif(not NOTES_WIRED, reason="generate/generation.py does not give the notes yet")
def test_the_result_says_where_the_layout_does_not_act(engine):
    request = GenerationRequest(**{**BASE, "steps": 2}, checkpoint="tiny.safetensors",
                                regions=(Region("red", box=(0, 0, 0.5, 1)),),
                                refiner_checkpoint="tiny.safetensors", refiner_switch_at=0.5)
    result = engine.generate(request)
    assert any("refiner takes over" in warning for warning in result.warnings), result.warnings
    assert not any("refiner takes over" in w for w in engine.generate(request.replace(regions=())).warnings)
