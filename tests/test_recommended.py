""""Use recommended settings" beside the sampler of txt2img, img2img and Inpaint
(webui/tabs/recommended.py), over the UI tests' fake engine: what the click sets and says."""

from __future__ import annotations

import gradio as gr
import pytest
from test_webui import FakeEngine

from pipelines.models import few_step
from webui.app import build_ui
from webui.tabs import recommended


@pytest.fixture
def shown(monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: said.append(message))
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: said.append(f"warning: {message}"))
    return said


@pytest.fixture
def engine():
    return FakeEngine()


def test_every_generation_tab_has_the_button_wired_to_its_own_fields(engine):
    ui = build_ui(engine).webui
    for mode in ("txt2img", "img2img", "inpaint"):
        fields = ui.fields[mode]
        clicks = [d for d in ui.blocks.config["dependencies"]
                  if any(t[1] == "click" and t[0] == component_id(ui, f"{mode}_recommended") for t in d["targets"])]
        assert len(clicks) == 1, mode
        outputs = clicks[0]["outputs"]
        assert outputs == [fields[name]._id for name in recommended.FILLED + recommended.OPTIONAL if name in fields]
        assert set(clicks[0]["inputs"]) == {fields["checkpoint"]._id, fields["prompt"]._id}


def component_id(ui, elem_id: str) -> int:
    return next(block._id for block in ui.blocks.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_a_few_step_lora_fills_sampler_schedule_steps_and_cfg_and_says_why(engine, shown):
    values = recommended.recommend(engine, "sd15", "a cat <lora:fast8:1>")
    assert values == ("Euler", "Karras", 8, 1.0)
    assert engine.recommended == [("sd15", "a cat <lora:fast8:1>")]
    assert shown == ["Fast 8-step LoRA: Euler, Karras, 8 steps, CFG 1. Set for fast8.safetensors (LoRA in the prompt)."]


def test_settings_the_server_does_not_offer_change_nothing_and_say_so(engine, shown):
    values = recommended.recommend(engine, "sd15", "<lora:Hyper-SD15-8steps-lora:1>")  # DDIM: not in its list
    assert all(isinstance(value, type(gr.skip())) for value in values)
    assert len(shown) == 1 and shown[0].startswith("warning: Hyper-SD 8-step LoRA")
    assert "does not offer DDIM with SGM Uniform" in shown[0]


def test_a_few_step_checkpoint_is_named_as_the_checkpoint(engine, shown):
    assert recommended.recommend(engine, "sdxl_lightning_4step", "a cat")[2] == 4
    assert "sdxl_lightning_4step (checkpoint)" in shown[0]


def test_nothing_recognised_changes_nothing_and_says_so(engine, shown):
    values = recommended.recommend(engine, "sd15", "a cat")
    assert all(isinstance(value, type(gr.skip())) for value in values) and len(values) == len(recommended.FILLED)
    assert shown == [recommended.NOTHING_FOUND]


def test_a_guidance_distilled_checkpoint_gets_its_own_settings_with_one_cfg_pass(engine, shown, monkeypatch):
    flux_dev = {"variant": "Flux.1 dev", "recommended": {"sampler": "Euler", "cfg_scale": 1.0, "steps": 20,
                                                         "distilled_cfg_scale": 3.5}}
    found = few_step.distilled_settings(flux_dev)
    assert found["steps"] == 20 and found["cfg_scale"] == 1.0 and found["schedule_type"] == "Automatic"
    assert "Flux.1 dev is guidance-distilled" in found["why"] and "Distilled CFG Scale 3.5" in found["why"]
    assert few_step.distilled_settings({"family": "sd15"}) is None  # any other checkpoint: nothing
    monkeypatch.setattr(engine, "recommended_settings", lambda checkpoint, prompt: {**found, "source": "flux1-dev"})
    assert recommended.recommend(engine, "flux1-dev", "a cat",
                                 optional=("distilled_cfg_scale",)) == ("Euler", "Automatic", 20, 1.0, 3.5)
    assert "Set for flux1-dev (checkpoint)" in shown[0]


def test_flux_fill_gets_its_guidance_and_full_strength_where_the_tab_has_them(engine, shown, monkeypatch):
    fill = {"variant": "Flux.1 Fill", "inpainting": True, "recommended": {"sampler": "Euler", "cfg_scale": 1.0, "steps": 20,
                                                      "distilled_cfg_scale": 30.0, "denoising_strength": 1.0}}
    found = few_step.distilled_settings(fill)
    monkeypatch.setattr(engine, "recommended_settings", lambda checkpoint, prompt: {**found, "source": "flux1-fill"})
    values = recommended.recommend(engine, "flux1-fill", "a cat", optional=recommended.OPTIONAL)
    assert values == ("Euler", "Automatic", 20, 1.0, 30.0, 1.0)
    assert "Inpaint" in shown[0]  # it says where a Fill model belongs
