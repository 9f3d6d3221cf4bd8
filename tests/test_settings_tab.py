"""The server's saved settings: the table's checks, the file in the data folder, the Settings
tab and /sdapi/v1/options reading and writing the same values."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from datetime import datetime

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from test_webui import FakeCheckpoint, FakeEngine

from pipelines.core.checks import RequestError
from pipelines.core.jobs import JobQueue
from pipelines.core.metadata_read import read_image_metadata
from pipelines.core.outputs import read_infotext
from pipelines.core.save_formats import SaveOptions, name_part, pattern_values, write_exif_image
from pipelines.core.user_settings import SETTINGS, SETTINGS_FILE, SettingsStore, check_setting
from webui.api import create_api
from webui.app import build_ui


@dataclass
class TitledCheckpoint(FakeCheckpoint):
    """What GET /options needs besides the UI's fields."""

    sha256: str | None = None

    @property
    def title(self) -> str:
        return self.name

    @property
    def stem(self) -> str:
        return self.name

    @property
    def model_name(self) -> str:
        return self.name


@pytest.fixture
def engine(tmp_path):
    engine = FakeEngine([TitledCheckpoint("sd15", "/m/sd15.safetensors", 1, 1.0, "SD 1.x")], data_dir=tmp_path / "data")
    engine.queue = JobQueue(max_waiting=2)  # room for API jobs (the UI tests' fake lets none wait)
    return engine


@pytest.fixture
def ui(engine):
    return build_ui(engine).webui


def api_client(engine) -> TestClient:
    app = FastAPI()
    app.include_router(create_api(engine))
    return TestClient(app)


def saved(engine) -> dict:
    return json.loads((engine.paths.data_dir / SETTINGS_FILE).read_text())


def tab_values(ui) -> dict:
    """The Settings tab's components by key, as a page shows them after a load."""
    return {component.elem_id.removeprefix("setting_"): value for component, value in
            ui.settings_tab.current().items()}


# --- the table and the file ------------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("samples_format", "exe", "choose one of: png, jpg, webp"),
    ("jpeg_quality", 0, "between 1 and 100"),
    ("jpeg_quality", "high", "whole number"),
    ("grid_save", "maybe", "true or false"),
    ("CLIP_stop_at_last_layers", 13, "between 1 and 12"),
    ("samples_filename_pattern", "../[seed]", "without folders"),
    ("samples_filename_pattern", "[seed]-[colour]", "unknown word [colour]"),
    ("theme", "purple", "light, dark"),
    ("no_such_setting", 1, "not a setting"),
])
def test_a_bad_value_is_refused_naming_the_key(key, value, message):
    with pytest.raises(RequestError) as error:
        check_setting(key, value)
    assert error.value.field == key and message in error.value.message


def test_values_are_taken_as_clients_send_them():
    assert check_setting("samples_format", "JPEG") == "jpg"
    assert check_setting("jpeg_quality", "95") == 95 and check_setting("jpeg_quality", 90.0) == 90
    assert check_setting("samples_filename_pattern", "[seed]-[prompt_words]") == "[seed]-[prompt_words]"


def test_changes_are_saved_and_read_back_by_the_next_start(tmp_path):
    path = tmp_path / "data" / SETTINGS_FILE
    store = SettingsStore(path)
    assert store.values()["samples_format"] == "png" and not path.exists()  # nothing saved until changed
    store.update({"samples_format": "webp", "jpeg_quality": 70, "grid_save": False})
    again = SettingsStore(path).values()
    assert (again["samples_format"], again["jpeg_quality"], again["grid_save"]) == ("webp", 70, False)
    assert SettingsStore(path).save_options() == SaveOptions(format="webp", quality=70, filename_pattern="", save_grids=False)


def test_a_bad_change_saves_nothing_and_keeps_the_file(tmp_path):
    path = tmp_path / SETTINGS_FILE
    store = SettingsStore(path)
    store.update({"jpeg_quality": 60})
    before = path.read_bytes()
    with pytest.raises(RequestError) as error:
        store.update({"samples_format": "webp", "jpeg_quality": 500})
    assert error.value.field == "jpeg_quality"
    assert path.read_bytes() == before and store.values()["samples_format"] == "png"
    assert [p.name for p in tmp_path.iterdir()] == [SETTINGS_FILE]  # no temp file left behind


def test_a_full_disk_keeps_the_saved_file_and_the_values(tmp_path, monkeypatch):
    path = tmp_path / SETTINGS_FILE
    store = SettingsStore(path)
    store.update({"jpeg_quality": 60})
    from pipelines.core import fileio

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    with pytest.raises(OSError):
        store.update({"jpeg_quality": 61})
    assert json.loads(path.read_text())["jpeg_quality"] == 60 and store.get("jpeg_quality") == 60


def test_a_damaged_file_or_value_falls_back_to_the_defaults(tmp_path):
    path = tmp_path / SETTINGS_FILE
    path.write_text("{not json")
    assert SettingsStore(path).values()["samples_format"] == "png"
    path.write_text(json.dumps({"samples_format": "exe", "jpeg_quality": 55, "sd_vae": "gone.safetensors"}))
    values = SettingsStore(path).values()
    assert values["samples_format"] == "png" and values["jpeg_quality"] == 55
    assert values["sd_vae"] == "gone.safetensors"  # the engine's list decides when it is next changed


# --- one source of truth: the tab and /sdapi/v1/options ------------------------------------------

def test_the_api_and_the_tab_read_and_write_the_same_settings(engine, ui):
    client = api_client(engine)
    answer = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "theme": "dark",
                                                    "samples_format": "webp"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["updated"] == {"CLIP_stop_at_last_layers": 3, "theme": "dark", "samples_format": "webp"}
    assert "samples_format" not in answer.json()["no_effect"]  # saving honours it
    shown = tab_values(ui)
    assert (shown["CLIP_stop_at_last_layers"], shown["theme"], shown["samples_format"]) == (3, "dark", "webp")

    status = ui.settings_tab.apply(**{**shown, "CLIP_stop_at_last_layers": 2, "default_sampler": "Euler a"})
    assert "Saved 2 settings" in status[ui.components["settings"]["status"]]
    options = client.get("/sdapi/v1/options").json()
    assert (options["CLIP_stop_at_last_layers"], options["default_sampler"]) == (2, "Euler a")
    assert saved(engine)["CLIP_stop_at_last_layers"] == 2


def test_the_api_says_when_the_disk_refuses_and_changes_nothing(engine, monkeypatch):
    client = api_client(engine)
    from pipelines.core import fileio

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    answer = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 5})
    assert answer.status_code == 500 and "No space left" in answer.json()["error"]
    monkeypatch.undo()
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 4}).status_code == 200
    assert saved(engine)["CLIP_stop_at_last_layers"] == 4


def test_the_api_uses_the_saved_clip_skip_for_requests_that_do_not_set_it(engine, ui):
    ui.settings_tab.apply(**{**tab_values(ui), "CLIP_stop_at_last_layers": 4})
    client = api_client(engine)
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64}
                       ).status_code == 200
    assert engine.requests[-1].clip_skip == 4


def test_a_setting_changed_while_a_job_runs_does_not_change_that_job(engine, ui):
    ui.settings_tab.apply(**{**tab_values(ui), "CLIP_stop_at_last_layers": 2})
    seen = []

    def change_settings_mid_job(request, control):
        seen.append(request.clip_skip)
        ui.settings_tab.store.update({"CLIP_stop_at_last_layers": 7})

    engine.steps_hook = change_settings_mid_job
    client = api_client(engine)
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 3, "width": 64, "height": 64}
                       ).status_code == 200
    assert seen == [2, 2, 2]
    client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert seen[-1] == 7  # the next request starts from the new value


def test_the_tab_names_a_bad_value_and_saves_nothing(engine, ui):
    ui.settings_tab.apply(**{**tab_values(ui), "jpeg_quality": 90})
    with pytest.raises(gr.Error) as error:
        ui.settings_tab.apply(**{**tab_values(ui), "jpeg_quality": 101, "theme": "dark"})
    assert "jpeg_quality" in str(error.value) and SETTINGS["jpeg_quality"].label in str(error.value)
    assert saved(engine)["jpeg_quality"] == 90 and saved(engine)["theme"] == "light"
    assert "Nothing changed" in ui.settings_tab.apply(**tab_values(ui))[ui.components["settings"]["status"]]


def test_the_tab_offers_the_engines_samplers_and_vaes(ui):
    parts = ui.components["settings"]
    assert [c[0] for c in parts["default_sampler"].choices] == ["DPM++ 2M", "Euler a", "Euler"]
    assert [c[0] for c in parts["sd_vae"].choices] == ["Automatic", "None"]
    with pytest.raises(gr.Error, match="sd_vae"):
        ui.settings_tab.apply(**{**tab_values(ui), "sd_vae": "other.safetensors"})


def test_a_new_page_starts_with_the_saved_sampler_vae_and_clip_skip(ui):
    ui.settings_tab.apply(**{**tab_values(ui), "default_sampler": "Euler", "sd_vae": "None",
                             "CLIP_stop_at_last_layers": 2})
    updates = ui.settings_tab.on_page_load()
    for mode in ("txt2img", "img2img", "inpaint"):
        assert updates[ui.fields[mode]["sampler"]] == "Euler"
    assert updates[ui.components["vae"]] == "None" and updates[ui.components["clip_skip"]] == 2


def test_pending_settings_say_so_on_the_page(ui):
    info = ui.components["settings"]["default_width"].info
    assert "default_width" in info and "not applied yet" in info
    for honoured in ("theme", "samples_format", "jpeg_quality", "grid_save", "show_progress_every_n_steps",
                     "show_progress_type"):
        assert "not applied yet" not in (ui.components["settings"][honoured].info or "")


def test_a_hosted_demo_shows_but_never_changes_the_settings(tmp_path):
    engine = FakeEngine(data_dir=tmp_path)
    engine.settings = replace(engine.settings, hosted=True)
    ui = build_ui(engine).webui
    assert ui.components["settings"]["apply"].interactive is False
    with pytest.raises(gr.Error, match="hosted"):
        ui.settings_tab.apply(**{**tab_values(ui), "theme": "dark"})
    assert not os.path.exists(tmp_path / SETTINGS_FILE)


# --- what the saving settings write (core.save_formats; core.outputs calls it once wired) ---------

INFOTEXT = "a red fox, (snow:1.2)\nNegative prompt: fog\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1234, " \
           "Size: 64x48, Model hash: abcdef1234, Model: tiny"


@pytest.mark.parametrize("fmt,pil_format", [("jpg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_carry_the_parameters_as_a1111_writes_them(tmp_path, fmt, pil_format):
    path = tmp_path / f"x{SaveOptions(format=fmt).suffix}"
    with open(path, "wb") as handle:
        write_exif_image(Image.new("RGB", (64, 48), (200, 40, 40)), handle, INFOTEXT, SaveOptions(format=fmt))
    with Image.open(path) as image:
        assert image.format == pil_format and image.size == (64, 48)
    assert read_infotext(path) == INFOTEXT
    assert read_image_metadata(path).fields["Seed"] == "1234"


def test_quality_changes_the_file_and_webp_keeps_transparency(tmp_path):
    noisy = Image.effect_noise((96, 96), 60).convert("RGB")
    sizes = {}
    for quality in (20, 95):
        with open(tmp_path / f"{quality}.jpg", "wb") as handle:
            write_exif_image(noisy, handle, None, SaveOptions(format="jpg", quality=quality))
        sizes[quality] = (tmp_path / f"{quality}.jpg").stat().st_size
    assert sizes[20] < sizes[95] / 2
    with open(tmp_path / "a.webp", "wb") as handle:
        write_exif_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), handle, "x", SaveOptions(format="webp"))
    with Image.open(tmp_path / "a.webp") as image:
        assert image.mode == "RGBA" and image.getpixel((0, 0))[3] == 0


def test_file_name_patterns_fill_in_a1111s_words():
    values = pattern_values("a red fox, (snow:1.2)", "fog", {"Seed": 1234, "Size": "64x48", "Model": "tiny",
                                                              "Sampler": "Euler a", "Steps": 4, "CFG scale": 7},
                            now=datetime(2026, 12, 3, 9, 30, 5))
    assert name_part("", values) == "1234"  # A1111's default: <number>-<seed>
    assert name_part("[seed]-[prompt_words]", values) == "1234-a red fox snow 1 2"
    assert name_part("[model_name]_[width]x[height]_[sampler]_[steps]_[cfg]_[datetime]", values) == \
        "tiny_64x48_Euler a_4_7_20261203093005"
    assert name_part("[prompt]", {"prompt": 'what? a "cat"/dog: <3'}) == "what_ a _cat_dog_ _3"
    assert len(name_part("[prompt]", {"prompt": "word " * 100})) <= 128
    assert name_part("[negative_prompt]", {"negative_prompt": ""}) == ""
