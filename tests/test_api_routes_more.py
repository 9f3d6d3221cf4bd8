"""The rest of A1111's API that clients call: styles, face restorers, Real-ESRGAN models,
hypernetworks, latent upscale modes, refresh routes, memory, extensions, and /options with
A1111's common keys (read back; those without effect reported, bad values a 422 naming the key).
Through a served app and the `webuiapi` client, like tests/test_api.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import make_engine
from fastapi.testclient import TestClient
from test_api import SMALL, api, base_url, post  # noqa: F401 - api, base_url: the served app's fixtures
from test_upscale_models import write_tiny_compact, write_tiny_esrgan

from extensions.api import API_VERSION
from extensions.manager import ExtensionManager
from pipelines.core.request import LATENT_UPSCALE_MODES
from pipelines.core.styles import style_database
from webui.api import create_app


class StandIn:
    """The engine with some attributes replaced (as a remote worker or a test double would)."""

    def __init__(self, engine, **replaced):
        self._engine = engine
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._engine, name)


# --- listings ---------------------------------------------------------------------------------

def test_list_routes_answer_in_a1111_shapes(api, engine):
    style_database(engine).save_style("more-routes-style", "{prompt}, oil painting", "photo")
    styles = {s["name"]: s for s in api.get_prompt_styles()}
    assert styles["more-routes-style"] == {"name": "more-routes-style", "prompt": "{prompt}, oil painting",
                                           "negative_prompt": "photo"}
    assert [m["name"] for m in api.get_latent_upscale_modes()] == list(LATENT_UPSCALE_MODES)
    assert api.get_face_restorers() == [] and api.get_hypernetworks() == []
    assert api.get_realesrgan_models() == []  # the session engine has no upscaler folder


def test_the_docs_say_what_is_not_supported(base_url):
    paths = requests.get(f"{base_url}/openapi.json", timeout=10).json()["paths"]
    assert "not supported" in paths["/sdapi/v1/hypernetworks"]["get"]["description"]
    assert "models/GFPGAN" in paths["/sdapi/v1/face-restorers"]["get"]["description"]  # where to put them
    assert "get" not in paths["/sdapi/v1/refresh-vae"] and "post" in paths["/sdapi/v1/refresh-vae"]


def test_realesrgan_models_are_the_upscaler_folder_s_real_esrgan_files(tmp_path):
    esrgan = tmp_path / "models" / "ESRGAN"  # the default upscaler folder
    write_tiny_esrgan(esrgan / "RealESRGAN_x4plus.pth", scale=4)
    write_tiny_esrgan(esrgan / "4x-PlainESRGAN.pth", scale=4)  # the original ESRGAN's kind: not listed
    write_tiny_compact(esrgan / "anime" / "realesr-animevideov3.safetensors", scale=2)
    engine = make_engine(tmp_path / "models", tmp_path)
    found = TestClient(create_app(engine)).get("/sdapi/v1/realesrgan-models")
    assert found.status_code == 200, found.text
    listed = {m["name"]: m for m in found.json()}
    assert set(listed) == {"RealESRGAN_x4plus", "anime/realesr-animevideov3"}
    assert listed["RealESRGAN_x4plus"] == {"name": "RealESRGAN_x4plus", "scale": 4,
                                           "path": str(esrgan / "RealESRGAN_x4plus.pth")}
    assert listed["anime/realesr-animevideov3"]["scale"] == 2
    # the names are what upscaler_1 takes
    assert {"RealESRGAN_x4plus", "4x-PlainESRGAN"} <= set(engine.upscaler_names())


def test_refresh_vae_and_loras_rescan_their_folders(tmp_path):
    engine = make_engine(tmp_path / "models", tmp_path)
    client = TestClient(create_app(engine))
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/loras").json() == []
    (tmp_path / "models" / "VAE").mkdir(parents=True)
    (tmp_path / "models" / "VAE" / "new-vae.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    (tmp_path / "models" / "Lora" / "style.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for route in ("refresh-vae", "refresh-loras"):
        answer = client.post(f"/sdapi/v1/{route}")
        assert answer.status_code == 200 and answer.json() is None, route
    assert [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()] == ["new-vae.safetensors"]
    assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["style"]


# --- memory and extensions ------------------------------------------------------------------------

def test_memory_on_the_cpu(api):
    memory = api.get_memory()
    ram = memory["ram"]
    assert set(ram) == {"free", "used", "total"} and all(isinstance(v, int) and v > 0 for v in ram.values())
    assert ram["used"] < ram["total"] and ram["free"] <= ram["total"]
    assert set(memory["cuda"]) == {"error"} and "cpu" in memory["cuda"]["error"]


def test_memory_on_cuda_reports_the_device(engine):
    gib = 1 << 30
    report = {**engine.cache_memory(), "device": "cuda:0", "vram_allocated_bytes": 2 * gib,
              "vram_reserved_bytes": 3 * gib, "vram_peak_allocated_bytes": 5 * gib,
              "vram_peak_reserved_bytes": 6 * gib, "vram_free_bytes": 10 * gib, "vram_total_bytes": 16 * gib}
    client = TestClient(create_app(StandIn(engine, cache_memory=lambda: report)))
    cuda = client.get("/sdapi/v1/memory").json()["cuda"]
    assert cuda == {"system": {"free": 10 * gib, "used": 6 * gib, "total": 16 * gib},
                    "allocated": {"current": 2 * gib, "peak": 5 * gib},
                    "reserved": {"current": 3 * gib, "peak": 6 * gib}}


def write_extension(root: Path, folder: str, **manifest) -> Path:
    path = root / folder
    path.mkdir(parents=True)
    (path / "extension.json").write_text(json.dumps({"id": folder, "api": API_VERSION, **manifest}))
    (path / "main.py").write_text("def setup(ext):\n    pass\n")
    return path


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_extensions_with_their_git_state(engine, tmp_path):
    root = tmp_path / "exts"
    cloned = write_extension(root, "cloned-ext", version="1.2.0")
    git(cloned, "init", "-q", "-b", "main")
    git(cloned, "add", ".")
    git(cloned, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "first")
    git(cloned, "remote", "add", "origin", "https://example.invalid/cloned-ext.git")
    write_extension(root, "plain-ext")
    write_extension(root, "off-ext")
    manager = ExtensionManager(tmp_path / "extensions.json")
    manager.discover(root)
    manager.set_enabled("off-ext", False)
    client = TestClient(create_app(StandIn(engine, extensions=manager)))
    listed = {e["name"]: e for e in client.get("/sdapi/v1/extensions").json()}
    assert set(listed) == {"cloned-ext", "plain-ext", "off-ext"}
    assert listed["cloned-ext"] == {
        "name": "cloned-ext", "remote": "https://example.invalid/cloned-ext.git", "branch": "main",
        "commit_hash": git(cloned, "rev-parse", "HEAD"), "version": "1.2.0",
        "commit_date": int(git(cloned, "log", "-1", "--format=%ct")), "enabled": True}
    assert listed["plain-ext"] == {"name": "plain-ext", "remote": None, "branch": None, "commit_hash": None,
                                   "version": None, "commit_date": None, "enabled": True}
    assert listed["off-ext"]["enabled"] is False


# --- options ------------------------------------------------------------------------------------

A1111_KEYS = {"send_seed": False, "samples_format": "jpg", "jpeg_quality": 95, "eta_noise_seed_delta": 31337,
              "face_restoration_model": "CodeFormer", "code_former_weight": 0.7, "randn_source": "GPU"}


def test_options_read_back_and_say_what_has_no_effect(api, base_url):
    before = api.get_options()
    assert before["samples_format"] == "png" and before["samples_save"] is True
    assert before["CLIP_stop_at_last_layers"] == 1 and before["eta_noise_seed_delta"] == 0
    try:
        answer = api.set_options({**A1111_KEYS, "CLIP_stop_at_last_layers": 2, "samples_save": True,
                                  "my_client.state": {"tab": 3, "tags": ["a", "b"]}})
        honoured = {"face_restoration_model": "CodeFormer", "code_former_weight": 0.7,  # defaults of restore_faces
                    "samples_format": "jpg", "jpeg_quality": 95}  # how saved images are written
        assert answer["updated"] == {"CLIP_stop_at_last_layers": 2, "samples_save": True, **honoured}
        assert answer["ignored"] == sorted([*(set(A1111_KEYS) - set(honoured)), "my_client.state"])
        reasons = answer["no_effect"]
        assert "samples_format" not in reasons and "jpeg_quality" not in reasons
        assert "face_restoration_model" not in reasons and "code_former_weight" not in reasons
        assert "not an option of this server" in reasons["my_client.state"]
        after = api.get_options()
        assert {key: after[key] for key in A1111_KEYS} == A1111_KEYS
        assert after["my_client.state"] == {"tab": 3, "tags": ["a", "b"]}
        assert after["CLIP_stop_at_last_layers"] == 2
        # what has an effect has it: the next request uses clip skip 2
        assert api.txt2img(prompt="x", seed=1, **SMALL).info["clip_skip"] == 2
        # a value this server does honour is not reported
        assert post(base_url, "options", {"samples_format": "PNG"}).json()["updated"] == {"samples_format": "png"}
    finally:
        api.set_options({key: before[key] for key in (*A1111_KEYS, "CLIP_stop_at_last_layers")})


@pytest.mark.parametrize("key,value", [
    ("jpeg_quality", 0), ("jpeg_quality", "high"), ("samples_format", "exe"), ("send_seed", "maybe"),
    ("code_former_weight", 2), ("face_restoration_model", "Magic"), ("eta_noise_seed_delta", -1),
    ("randn_source", "TPU"), ("samples_save", None),
])
def test_a_bad_value_of_a_known_key_is_a_422_naming_it_and_changes_nothing(base_url, key, value):
    response = post(base_url, "options", {"CLIP_stop_at_last_layers": 3, key: value})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == key and repr(value) in response.json()["error"]
    assert requests.get(f"{base_url}/sdapi/v1/options", timeout=10).json()["CLIP_stop_at_last_layers"] == 1


def saved_pngs(engine) -> set[Path]:
    return set(Path(engine.paths.outdir).rglob("*.png"))


def test_samples_save_false_keeps_the_api_from_saving(api, engine):
    try:
        api.set_options({"samples_save": False})
        before = saved_pngs(engine)
        api.txt2img(prompt="not saved", seed=2, save_images=True, **SMALL)
        assert saved_pngs(engine) == before
        api.set_options({"samples_save": True})
        api.txt2img(prompt="saved", seed=2, save_images=True, **SMALL)
        assert len(saved_pngs(engine) - before) == 1
    finally:
        api.set_options({"samples_save": True})
