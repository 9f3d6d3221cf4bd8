"""Handlers of the Checkpoints tab (webui/tabs/checkpoints.py), against a small fake engine."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import gradio as gr
import pytest
from test_webui import FakeEngine, fake_request, values

from webui.app import build_ui
from webui.tabs import checkpoints as checkpoints_tab
from webui.tabs.checkpoints import CheckpointsTab


@dataclass
class Ckpt:
    name: str
    path: str
    size: int
    mtime: float
    family: str | None = "SD 1.x"
    short_hash: str | None = None
    details: dict = field(default_factory=dict)


class FakeRegistry:
    """What the engine's model registry records and does for the Checkpoints tab."""

    def __init__(self, engine):
        self.engine = engine
        self.overrides: list = []
        self.progress: float | None = None
        self.release = threading.Event()

    def set_prediction_type(self, name, prediction):
        self.overrides.append((name, prediction))

    def hash_in_background(self, kind, name, on_progress=None):
        def work():
            self.release.wait(5)
            next(c for c in self.engine.checkpoints if c.name == name).short_hash = "abcdef0123"
            self.progress = None

        self.progress = 0.5
        thread = threading.Thread(target=work)
        thread.start()
        return thread

    def hash_progress(self, kind, name):
        return self.progress


class Engine(FakeEngine):
    def __init__(self):
        super().__init__(checkpoints=[
            Ckpt("b_model", "/m/b_model.safetensors", 2_000_000_000, 1_700_000_300.0,
                 details={"resolution": 512, "prediction": "epsilon", "title": "Bee", "author": "Ann",
                          "license": "MIT", "trigger_words": ["bee", "honey"]}),
            Ckpt("sub/a_model", "/m/sub/a_model.safetensors", 1_000, 1_700_000_100.0),
            Ckpt("broken", "/m/broken.safetensors", 10, 1_700_000_200.0, family=None,
                 details={"error": "truncated header"}),
        ])
        self.loaded = ["b_model"]
        self.registry = FakeRegistry(self)

    def load_checkpoint(self, name):
        if name == "broken":
            raise OSError("unexpected end of file")
        self.loaded = [name] + [n for n in self.loaded if n != name]

    def set_prediction_type(self, name, prediction):
        self.registry.set_prediction_type(name, prediction)

    def hash_checkpoint(self, name):
        return self.registry.hash_in_background("checkpoints", name)

    def hash_progress(self, name):
        return self.registry.hash_progress("checkpoints", name)

    def cache_memory(self):
        return {"cache_bytes": 2 * 1024**3, "budget_bytes": 8 * 1024**3, "vram_allocated_bytes": 1024**3,
                "vram_reserved_bytes": 2 * 1024**3}


@pytest.fixture
def tab():
    engine = Engine()
    return CheckpointsTab(engine, lambda: "loaded: " + ", ".join(engine.loaded), lambda names: names[0])


def test_rows_show_details_and_errors(tab):
    rows = {r[0]: r for r in tab.rows()}
    assert rows["b_model"][1:4] == ["SD 1.x", "512", "epsilon"]
    assert rows["b_model"][7:] == ["Bee", "Ann", "MIT", "bee, honey"]
    assert "sub/a_model" in rows
    assert rows["broken"][1].startswith("unreadable") and "truncated header" in rows["broken"][1]
    assert len(rows["b_model"]) == len(checkpoints_tab.HEADERS)


def test_filter_and_sort(tab):
    assert [r[0] for r in tab.filter("MODEL", "Name")] == ["b_model", "sub/a_model"]
    assert [r[0] for r in tab.filter("", "Name")] == ["b_model", "broken", "sub/a_model"]
    assert [r[0] for r in tab.filter("", "Newest first")] == ["b_model", "broken", "sub/a_model"]
    assert [r[0] for r in tab.filter("a_m", "Newest first")] == ["sub/a_model"]
    assert tab.filter("nothing", "Name") is None


def test_load_error_names_the_file_and_keeps_previous(tab):
    with pytest.raises(gr.Error) as info:
        tab.load("broken")
    message = str(info.value.message)
    assert "broken" in message and "/m/broken.safetensors" in message and "truncated header" in message
    assert "Still loaded: b_model" in message
    assert tab.engine.loaded == ["b_model"]
    name, loaded, table, status = tab.load("sub/a_model")
    assert name == "sub/a_model" and "sub/a_model" in loaded and "RAM" in status
    with pytest.raises(gr.Error, match="pick a checkpoint"):
        tab.load(None)


def test_unload_and_memory_line(tab):
    loaded, status = tab.unload("b_model")
    assert tab.engine.loaded == [] and "Unloaded" in status
    assert "RAM" in tab.memory()
    assert "VRAM" in tab.memory()


def test_prediction_override_calls_registry(tab):
    tab.set_prediction("b_model", "v-prediction")
    tab.set_prediction("b_model", "epsilon")
    tab.set_prediction("b_model", "Automatic")
    assert tab.engine.registry.overrides == [("b_model", "v_prediction"), ("b_model", "epsilon"),
                                             ("b_model", None)]
    with pytest.raises(gr.Error):
        tab.set_prediction(None, "epsilon")


def test_compute_hash_reports_progress(tab, monkeypatch):
    monkeypatch.setattr(checkpoints_tab, "HASH_POLL_S", 0.01)
    steps = tab.compute_hash("sub/a_model")
    _, first = next(steps)
    assert "50%" in first
    tab.engine.registry.release.set()
    *_, (table, last) = list(steps)
    assert "abcdef0123" in last
    assert any(r[5] == "abcdef0123" for r in table)


def test_select_row_picks_name_and_override(tab):
    tab.engine.checkpoints[0].details.update(prediction="v_prediction", prediction_source="user override")
    evt = SimpleNamespace(row_value=["b_model"])
    assert tab.select_row(evt) == ("b_model", "v-prediction")
    assert tab.select_row(SimpleNamespace(row_value=["sub/a_model"])) == ("sub/a_model", "Automatic")


def test_header_vae_dropdown_goes_into_each_request_by_name():
    engine = FakeEngine()
    engine.vae_choices = lambda: ["Automatic", "None", "kl-f8.safetensors"]
    ui = build_ui(engine).webui
    vae = ui.components["vae"]
    assert vae.choices and [c[0] for c in vae.choices] == ["Automatic", "None", "kl-f8.safetensors"]
    assert vae.value == "Automatic"
    for mode in ("txt2img", "img2img"):
        assert ui.fields[mode]["vae"] is vae  # one header component, a per-session value
    ui.generate("txt2img", values(ui, "txt2img", vae="kl-f8.safetensors"), request=fake_request("s1"))
    assert engine.requests[-1].vae == "kl-f8.safetensors"
    assert [c[0] for c in build_ui(FakeEngine()).webui.components["vae"].choices] == ["Automatic", "None"]
