"""The A1111-compatible REST API, served by uvicorn on a free port and driven by real clients:
the `webuiapi` PyPI client for the features, raw HTTP (requests) for validation and auth."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import requests
import uvicorn
import webuiapi
from conftest import make_engine
from fastapi import FastAPI
from PIL import Image, ImageDraw
from starlette.responses import PlainTextResponse
from starlette.routing import Mount

from pipelines.core.jobs import JobQueue
from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest
from pipelines.core.styles import style_database
from pipelines.generate.images import prepare_mask
from webui.api import ApiOptions, create_app, mount_api

INPAINT_CKPT = "inpaint/tiny-inpainting.safetensors"
SMALL = dict(width=64, height=64, steps=3)


@contextmanager
def serve(app):
    """Run `app` with uvicorn in a background thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def base_url(engine):
    # the listing's first checkpoint is the inpainting one; start from the plain one
    with serve(create_app(engine, options=ApiOptions(sd_model_checkpoint="tiny.safetensors"))) as url:
        yield url


@pytest.fixture
def api(base_url) -> webuiapi.WebUIApi:
    host, port = base_url.rsplit("//", 1)[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)


def post(base_url, route, body, **kwargs) -> requests.Response:
    return requests.post(f"{base_url}/sdapi/v1/{route}", json=body, timeout=60, **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def gradient_image(w=64, h=64) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    return Image.fromarray(np.stack([x + 0 * y, y + 0 * x, 255 - (x + y) / 2], -1).astype(np.uint8))


def square_mask(w=64, h=64, box=(16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- the webuiapi client ------------------------------------------------------------------------

def test_txt2img_matches_the_engine_and_reports_like_a1111(api, engine):
    result = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=1234, cfg_scale=7,
                         batch_size=2, **SMALL)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    info = result.info
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["prompt"] == "a red circle" and info["all_prompts"] == ["a red circle"] * 2
    assert info["sampler_name"] == "Euler" and info["steps"] == 3 and info["cfg_scale"] == 7
    assert info["sd_model_name"] == "tiny" and len(info["sd_model_hash"]) == 10
    assert info["width"] == 64 and info["batch_size"] == 2 and info["warnings"] == []
    assert len(info["infotexts"]) == 2 and "Seed: 1235," in info["infotexts"][1]
    assert result.parameters["prompt"] == "a red circle" and result.parameters["n_iter"] == 1
    assert result.images[0].info["parameters"] == info["infotexts"][0]
    # the same request straight to the engine gives the same pixels (PNG is lossless)
    direct = engine.generate(GenerationRequest(prompt="a red circle", negative_prompt="blurry", seed=1234,
                                               sampler="Euler", checkpoint="tiny.safetensors",
                                               batch_size=2, save_images=False, **SMALL))
    assert np.array_equal(pixels(result.images[0]), pixels(direct.images[0]))


def test_old_style_sampler_names_and_schedulers(api):
    result = api.txt2img(prompt="x", seed=1, sampler_name="DPM++ 2M Karras", **SMALL)
    assert result.info["sampler_name"] == "DPM++ 2M" and "Schedule type: Karras" in result.info["infotexts"][0]
    result = api.txt2img(prompt="x", seed=1, sampler_name="Euler", scheduler="sgm_uniform", **SMALL)
    assert "Schedule type: SGM Uniform" in result.info["infotexts"][0]


def test_img2img(api):
    result = api.img2img(images=[gradient_image(96, 48)], prompt="x", seed=5, denoising_strength=0.5,
                         resize_mode=1, **SMALL)
    assert result.image.size == (64, 64)
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    assert result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # include_init_images=False, as in A1111


@pytest.mark.parametrize("full_res", [False, True])
def test_inpainting_keeps_the_unmasked_area(api, full_res):
    init, mask = gradient_image(), square_mask()
    result = api.img2img(images=[init], mask_image=mask, prompt="x", seed=3, denoising_strength=1.0,
                         inpainting_fill=1, mask_blur=4, inpaint_full_res=full_res, inpaint_full_res_padding=8,
                         **SMALL)
    overlay = prepare_mask(mask, 64, 64, blur=4, invert=False, resize_mode="just resize")
    outside = np.asarray(overlay) == 0
    assert outside.sum() > 1000
    assert np.array_equal(pixels(result.image)[outside], pixels(init)[outside])
    inside = np.asarray(mask) == 255
    assert not np.array_equal(pixels(result.image)[inside], pixels(init)[inside]), "nothing was repainted"
    assert "Mask blur: 4" in result.info["infotexts"][0]


def test_inpainting_checkpoint_through_override_settings(api):
    result = api.img2img(images=[gradient_image()], mask_image=square_mask(), prompt="x", seed=3,
                         override_settings={"sd_model_checkpoint": INPAINT_CKPT}, **SMALL)
    assert result.info["sd_model_name"] == "tiny-inpainting"
    assert result.info["is_using_inpainting_conditioning"] is True


def test_extra_single_image(api):
    image = gradient_image(40, 30)
    result = api.extra_single_image(image=image, upscaler_1="Lanczos", upscaling_resize=2)
    assert result.image.size == (80, 60)
    assert "Postprocess upscaler: Lanczos" in result.image.info["parameters"]
    exact = api.extra_single_image(image=image, upscaler_1="Nearest", resize_mode=1,
                                   upscaling_resize_w=100, upscaling_resize_h=50)
    assert exact.image.size == (100, 50)
    blended = api.extra_single_image(image=image, upscaler_1="Lanczos", upscaler_2="Nearest",
                                     extras_upscaler_2_visibility=0.5, upscaling_resize=2)
    assert blended.image.size == (80, 60) and "Postprocess upscaler 2: Nearest" in blended.image.info["parameters"]
    unchanged = api.extra_single_image(image=image)  # the client's default upscaler_1 is "None"
    assert unchanged.image.size == (40, 30)


def test_png_info_round_trips_our_parameters(api):
    generated = api.txt2img(prompt="a cat\nwith a hat", negative_prompt="dog", seed=77, **SMALL)
    info = api.png_info(generated.image)
    assert info.info == generated.info["infotexts"][0]
    params = info.json["parameters"]
    assert params["Prompt"] == "a cat\nwith a hat" and params["Negative prompt"] == "dog"
    assert params["Seed"] == "77" and params["Steps"] == "3" and params["Size-1"] == "64"
    assert api.png_info(gradient_image()).info == ""  # no parameters: empty, not an error


def test_models_samplers_schedulers_and_lists(api):
    models = api.get_sd_models()
    names = {m["model_name"]: m for m in models}
    assert set(names) == {"tiny", "inpaint_tiny-inpainting"}
    tiny = names["tiny"]
    assert tiny["title"].startswith("tiny.safetensors") and tiny["filename"].endswith("tiny.safetensors")
    assert set(tiny) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    assert [u["name"] for u in api.get_upscalers()][:2] == ["None", "Lanczos"]
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_sd_vae() == []
    assert api.refresh_checkpoints() == {"checkpoints": 2}


def test_options_change_only_the_api_default(api, base_url):
    options = api.get_options()
    assert options["sd_model_checkpoint"].startswith("tiny.safetensors")
    assert options["sd_vae"] == "Automatic" and options["CLIP_stop_at_last_layers"] == 1
    try:
        answer = api.set_options({"sd_model_checkpoint": "tiny-inpainting", "CLIP_stop_at_last_layers": 2,
                                  "no_such_option": "x"})
        assert answer["updated"] == {"sd_model_checkpoint": INPAINT_CKPT, "CLIP_stop_at_last_layers": 2}
        assert answer["ignored"] == ["no_such_option"] and "not affected" in answer["scope"]
        assert api.util_get_current_model().startswith(INPAINT_CKPT)
        result = api.txt2img(prompt="x", seed=1, **SMALL)
        assert result.info["sd_model_name"] == "tiny-inpainting" and result.info["clip_skip"] == 2
        bad = post(base_url, "options", {"sd_model_checkpoint": "missing.safetensors"})
        assert bad.status_code == 422 and bad.json()["field"] == "sd_model_checkpoint"
        assert "tiny.safetensors" in bad.json()["error"]
    finally:
        api.set_options({"sd_model_checkpoint": "tiny.safetensors", "CLIP_stop_at_last_layers": 1})


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def run_in_thread(fn, **kwargs):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(**kwargs)), daemon=True)
    thread.start()
    return thread, box


def test_progress_during_a_job_and_interrupt(api):
    thread, box = run_in_thread(api.txt2img, prompt="slow", seed=9, width=64, height=64, steps=150, n_iter=20)
    progress = wait_for(lambda: (p := api.get_progress())["state"]["sampling_step"] > 0 and p, "a step")
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    state = progress["state"]
    assert state["sampling_steps"] == 150 and state["job_count"] == 20 and state["job_no"] == 0
    assert state["interrupted"] is False and "Step" in progress["textinfo"]
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (8, 8)  # the latents, seen through the cheap RGB approximation
    raw = requests.get(f"{api.baseurl}/progress", params={"skip_current_image": "true"}, timeout=10).json()
    assert raw["current_image"] is None
    assert api.interrupt()["done"] is True
    thread.join(30)
    assert not thread.is_alive(), "interrupt did not stop the job"
    result = box["result"]
    assert result.info["interrupted"] is True and len(result.images) < 20
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert api.interrupt()["done"] is False  # nothing running now


def test_skip_ends_the_current_batch(api):
    thread, box = run_in_thread(api.txt2img, prompt="skip", seed=20, width=64, height=64, steps=12, n_iter=2)
    wait_for(lambda: (s := api.get_progress()["state"])["sampling_step"] > 0 and s["job_no"] == 0, "a step")
    assert api.skip()["done"] is True
    thread.join(30)
    result = box["result"]
    assert result.info["interrupted"] is False and result.info["all_seeds"] == [21]


def test_the_api_does_not_interrupt_a_web_ui_job(api, engine):
    control = JobControl()
    request = GenerationRequest(prompt="ui job", seed=1, sampler="Euler", checkpoint="tiny.safetensors",
                                width=64, height=64, steps=150, save_images=False)
    thread, box = run_in_thread(engine.generate, request=request, control=control, owner="apiq7x2k9s")  # a session
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 0, "the UI job to run")
    answer = api.interrupt()
    assert answer["done"] is False and "web UI" in answer["detail"]
    assert control.interrupted is False
    control.interrupt()
    thread.join(30)
    assert box["result"].interrupted


# --- raw HTTP -------------------------------------------------------------------------------------

@pytest.mark.parametrize("route, body, field, mentions", [
    ("txt2img", {"width": 65}, "width", "multiple of 8"),
    ("txt2img", {"width": 10}, "width", "between"),
    ("txt2img", {"steps": 0}, "steps", "between"),
    ("txt2img", {"steps": "many"}, "steps", "integer"),
    ("txt2img", {"n_iter": 0}, "n_iter", "between"),
    ("txt2img", {"sampler_name": "Euler b"}, "sampler_name", "DPM++ 2M"),
    ("txt2img", {"sampler_index": "nope"}, "sampler_index", "Euler a"),
    ("txt2img", {"scheduler": "bogus"}, "scheduler", "karras"),
    ("txt2img", {"sampler_name": "LCM", "scheduler": "karras"}, "scheduler", "Uniform"),
    ("txt2img", {"seed": -5}, "seed", "-1"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}},
     "override_settings.sd_model_checkpoint", "tiny.safetensors"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 40}},
     "override_settings.CLIP_stop_at_last_layers", "between"),
    ("txt2img", {"override_settings": {"sd_vae": "other.safetensors"}}, "override_settings.sd_vae", "VAE"),
    ("txt2img", {"script_name": "ultimate sd upscale"}, "script_name", "x/y/z plot"),
    ("img2img", {}, "init_images", "input image"),
    ("img2img", {"init_images": ["not base64 at all!"]}, "init_images.0", "base64"),
    ("img2img", {"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images.0", "image"),
    ("img2img", {"init_images": ["https://example.com/cat.png"]}, "init_images.0", "URL"),
    ("img2img", {"init_images": ["GOOD"], "mask": "%%%"}, "mask", "base64"),
    ("img2img", {"init_images": ["GOOD"], "resize_mode": 7}, "resize_mode", "crop and resize"),
    ("img2img", {"init_images": ["GOOD"], "mask": "GOOD", "inpainting_fill": 9}, "inpainting_fill", "latent noise"),
    ("img2img", {"init_images": ["GOOD"], "denoising_strength": 2}, "denoising_strength", "between"),
    ("extra-single-image", {"image": "GOOD", "upscaler_1": "Magic"}, "upscaler_1", "Lanczos"),
    ("extra-single-image", {"image": "GOOD", "upscaler_1": "Lanczos", "upscaling_resize": 50},
     "upscaling_resize", "between"),
    ("extra-single-image", {"image": "GOOD", "gfpgan_visibility": 1}, "gfpgan_visibility", "installed"),
    ("extra-single-image", {"image": ""}, "image", "required"),
    ("png-info", {"image": "####"}, "image", "base64"),
    ("png-info", {}, "image", "required"),
])
def test_bad_input_is_a_422_naming_the_field(base_url, route, body, field, mentions):
    good = "data:image/png;base64," + b64png(gradient_image())
    body = {k: ([good if v == "GOOD" else v for v in value] if isinstance(value, list) else
                good if value == "GOOD" else value) for k, value in body.items()}
    body = {**SMALL, **body} if route in ("txt2img", "img2img") else body
    response = post(base_url, route, body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["field"] == field, answer
    assert mentions.lower() in answer["error"].lower(), answer
    assert answer["detail"][0]["loc"][0] == "body"


def test_malformed_json_and_wrong_body_types_are_422(base_url):
    response = requests.post(f"{base_url}/sdapi/v1/txt2img", data=b"{oops",
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 422 and response.json()["field"] == "body"
    response = post(base_url, "txt2img", ["a list"])
    assert response.status_code == 422 and response.json()["field"] == "body"
    response = post(base_url, "options", "text")
    assert response.status_code == 422


def test_unknown_fields_scripts_and_settings_are_warnings(base_url):
    body = {**SMALL, "prompt": "x", "seed": 1, "sampler_name": "Euler", "some_future_field": [1, 2],
            "alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {"args": [False]}},
            "override_settings": {"eta_noise_seed_delta": 31337}, "enable_hr": True,
            "hr_upscaler": "Latent", "sampler_index": None, "styles": None}
    response = post(base_url, "txt2img", body)
    assert response.status_code == 200, response.text
    warnings = json.loads(response.json()["info"])["warnings"]
    text = "\n".join(warnings)
    assert "'ADetailer'" in text and "ControlNet" not in text  # served now: tests/test_api_controlnet.py
    assert "eta_noise_seed_delta" in text  # restore_faces is real now: see tests/test_faces.py
    assert "enable_hr" not in text  # hires fix runs: see tests/test_hires_api.py
    assert "some_future_field" not in response.json()["parameters"]


def test_override_settings_do_not_leak_into_the_next_request(base_url):
    overridden = post(base_url, "txt2img", {
        **SMALL, "prompt": "x", "seed": 2, "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": "tiny-inpainting", "CLIP_stop_at_last_layers": 2}})
    assert overridden.status_code == 200, overridden.text
    info = json.loads(overridden.json()["info"])
    assert info["sd_model_name"] == "tiny-inpainting" and "Clip skip: 2" in info["infotexts"][0]
    plain = json.loads(post(base_url, "txt2img", {**SMALL, "prompt": "x", "seed": 2,
                                                  "sampler_name": "Euler"}).json()["info"])
    assert plain["sd_model_name"] == "tiny" and plain["clip_skip"] == 1 and "Clip skip" not in plain["infotexts"][0]
    options = requests.get(f"{base_url}/sdapi/v1/options", timeout=10).json()
    assert options["sd_model_checkpoint"].startswith("tiny.safetensors") and options["CLIP_stop_at_last_layers"] == 1


def test_images_are_pngs_with_the_parameters_chunk(base_url):
    response = post(base_url, "txt2img", {**SMALL, "prompt": "chunk", "seed": 4, "batch_size": 2})
    answer = response.json()
    assert set(answer) == {"images", "parameters", "info"} and isinstance(answer["info"], str)
    for raw, text in zip(answer["images"], json.loads(answer["info"])["infotexts"]):
        data = base64.b64decode(raw)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.info["parameters"] == text and text.startswith("chunk\n")
    no_images = post(base_url, "txt2img", {**SMALL, "prompt": "chunk", "seed": 4, "send_images": False}).json()
    assert no_images["images"] == []


def test_docs_and_openapi(base_url):
    schema = requests.get(f"{base_url}/openapi.json", timeout=10).json()
    assert "/sdapi/v1/txt2img" in schema["paths"] and "/sdapi/v1/progress" in schema["paths"]
    assert requests.get(f"{base_url}/docs", timeout=10).status_code == 200


# --- auth, failures and mounting ----------------------------------------------------------------

def test_auth_is_required_on_every_route_when_configured(engine):
    with serve(create_app(engine, auth=[("alice", "s3cret:x"), ("bob", "pw")])) as url:
        for path in ("/sdapi/v1/sd-models", "/sdapi/v1/progress", "/docs", "/openapi.json"):
            response = requests.get(url + path, timeout=10)
            assert response.status_code == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(url + "/sdapi/v1/sd-models", auth=("alice", "wrong"), timeout=10).status_code == 401
        assert requests.post(url + "/sdapi/v1/txt2img", data=b"{bad", timeout=10).status_code == 401
        assert requests.get(url + "/openapi.json", auth=("bob", "pw"), timeout=10).status_code == 200
        host, port = url.rsplit("//", 1)[1].split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port), username="alice", password="s3cret:x",
                                   sampler="Euler", steps=2)
        assert len(client.get_sd_models()) == 2
        assert client.txt2img(prompt="x", seed=1, width=64, height=64).image.size == (64, 64)


def test_broken_checkpoint_and_full_queue_are_clear_errors(models_dir, tmp_path):
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shutil.copy(models_dir / "Stable-diffusion" / "tiny.safetensors", folder)
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" * 4)
    engine = make_engine(tmp_path / "models", tmp_path)
    with serve(create_app(engine)) as url:
        response = post(url, "txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "broken"}})
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "override_settings.sd_model_checkpoint"
        assert "broken.safetensors" in response.json()["error"]
        engine.queue = JobQueue(max_waiting=0)  # every job is refused
        response = post(url, "txt2img", {**SMALL, "prompt": "x"})
        body = response.json()
        assert response.status_code == 503 and body["detail"] == "Queue full (0 waiting), try again in a moment"
        assert response.headers["Retry-After"]


class ExplodingEngine:
    """An engine whose generate has a bug: the API still answers with JSON."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        raise KeyError("a bug")


def test_an_internal_bug_is_a_json_500(engine):
    with serve(create_app(ExplodingEngine(engine))) as url:
        response = post(url, "txt2img", {**SMALL, "prompt": "x"})
        assert response.status_code == 500
        assert "KeyError" in response.json()["error"]


def test_mount_api_goes_before_a_catch_all_and_protects_the_docs(engine):
    app = FastAPI()  # has its own, unprotected /openapi.json
    app.router.routes.append(Mount("/", app=PlainTextResponse("the web UI")))
    mount_api(app, engine, auth=[("u", "p")])
    with serve(app) as url:
        assert requests.get(url + "/", timeout=10).text == "the web UI"
        assert requests.get(url + "/openapi.json", timeout=10).status_code == 401
        models = requests.get(url + "/sdapi/v1/sd-models", auth=("u", "p"), timeout=10)
        assert models.status_code == 200 and len(models.json()) == 2


def test_styles_apply_to_the_prompts_and_unknown_names_are_422(base_url, engine):
    database = style_database(engine)
    database.save_style("api-moody", "{prompt}, dark, moody", "bright")
    database.save_style("api-frame", "ornate frame", "")
    body = {**SMALL, "prompt": "a cat", "negative_prompt": "blurry", "seed": 3, "sampler_name": "Euler",
            "styles": ["api-moody", "api-frame"]}
    response = post(base_url, "txt2img", body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["prompt"], info["negative_prompt"]) == ("a cat, dark, moody, ornate frame", "blurry, bright")
    assert info["styles"] == ["api-moody", "api-frame"]
    assert info["infotexts"][0].startswith("a cat, dark, moody, ornate frame\nNegative prompt: blurry, bright\n")
    assert not any("styles" in warning for warning in info["warnings"])
    # the same pixels as sending the styled prompts themselves
    written_out = post(base_url, "txt2img", {**body, "styles": [], "prompt": info["prompt"],
                                             "negative_prompt": info["negative_prompt"]})
    assert response.json()["images"] == written_out.json()["images"]

    for styles, mentions in ((["api-moody", "no-such-style"], "'no-such-style'"), ("api-moody", "list")):
        answer = post(base_url, "txt2img", {**body, "styles": styles})
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"] == "styles" and mentions in answer.json()["error"], answer.json()
    assert "api-moody" in post(base_url, "txt2img", {**body, "styles": ["nope"]}).json()["error"]  # lists them


def test_progress_tells_the_caller_how_many_jobs_are_ahead(engine):
    """jobs_ahead (not in A1111): null with nothing queued, 1 while a web UI job runs before ours."""
    release, entered = threading.Event(), threading.Event()

    def page_job():
        with engine.queue.run(engine.queue.new_job("txt2img", owner="a-page-session")):
            entered.set()
            release.wait(60)

    with serve(create_app(engine, options=ApiOptions(sd_model_checkpoint="tiny.safetensors"))) as url:
        assert requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["jobs_ahead"] is None
        page = threading.Thread(target=page_job)
        page.start()
        entered.wait(10)
        answers = []
        ours = threading.Thread(target=lambda: answers.append(post(url, "txt2img", {**SMALL, "steps": 1})))
        ours.start()
        try:
            wait_for(lambda: requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["jobs_ahead"] == 1,
                     "our API job waiting behind the page's")
            assert requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["state"]["queued"] == 1
        finally:
            release.set()
            page.join(10)
            ours.join(120)
        assert answers[0].status_code == 200
