"""sd-webui-controlnet's wire contract in the REST API, against the UI tests' fake engine:
units in alwayson_scripts (raw JSON and the webuiapi client) and the /controlnet routes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import PurePath

import numpy as np
import pytest
import webuiapi
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from test_webui import FakeCheckpoint, FakeEngine

from extensions.manager import ExtensionManager
from pipelines.core.control import ControlUnit
from pipelines.core.jobs import JobQueue
from pipelines.core.request import RequestError
from pipelines.core.settings import EngineSettings
from webui.api import create_app, mount_api


class Listed(FakeCheckpoint):
    """A fake listing entry with the rest of ModelFileInfo (what the API's answers read)."""

    sha256 = None

    @property
    def stem(self) -> str:
        return PurePath(self.name).stem

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name


CANNY = Listed("control_canny.safetensors", "/m/ControlNet/control_canny.safetensors", 1000, 1.0,
                       "SD 1.x", "abcdef0123", {"family": "SD 1.x", "control_type": "controlnet"})
DEPTH = Listed("sub/t2i_depth.safetensors", "/m/ControlNet/sub/t2i_depth.safetensors", 1000, 1.0,
                       "SD 1.x", None, {"family": "SD 1.x", "control_type": "t2i_adapter"})
BROKEN = Listed("broken.safetensors", "/m/ControlNet/broken.safetensors", 10, 1.0, None, None,
                        {"error": "not a ControlNet or T2I-Adapter file"})
SMALL = dict(prompt="a house", width=64, height=64, steps=2)


class ControlEngine(FakeEngine):
    """The fake engine with control models on disk and one preprocessor whose weights are missing."""

    def __init__(self):
        super().__init__()
        self.control_files = [CANNY, DEPTH, BROKEN]
        self.checkpoints = [Listed(c.name, c.path, c.size, c.mtime, c.family, c.short_hash) for c in self.checkpoints]
        self.extensions = ExtensionManager(None)  # none installed: the API mounts /ext with nothing in it
        self.queue = JobQueue(max_waiting=2)  # the API admits a job only while the queue has room

    def control_preprocessors(self) -> list[dict]:
        return [*super().control_preprocessors(),
                {"name": "depth", "available": False,
                 "missing": "depth needs config.json and model.safetensors in models/ControlNet-annotators/midas"}]


def drawing(color=(255, 255, 255), size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle((8, 8, 40, 30), fill=color)
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.fixture
def engine():
    return ControlEngine()


@pytest.fixture
def client(engine):
    return TestClient(create_app(engine))


def txt2img(client, *units, key="controlnet", **fields):
    return client.post("/sdapi/v1/txt2img", json={**SMALL, **fields, "alwayson_scripts": {key: {"args": list(units)}}})


def canny_unit(**fields):
    return {"image": b64(drawing()), "module": "canny", "model": "control_canny", **fields}


# --- units in alwayson_scripts -------------------------------------------------------------------

def test_raw_json_units_reach_the_engine_by_the_extensions_names(client, engine):
    image, mask = drawing((200, 30, 30)), Image.new("L", (64, 48), 255)
    response = txt2img(client, {
        "enabled": None, "input_image": "data:image/png;base64," + b64(image), "module": "canny",
        "model": "control_canny [8d3c0ab1]",  # the extension's old 8-digit hash: found by its stem
        "weight": 0.5, "resize_mode": 0, "control_mode": "My prompt is more important", "guidance_start": 0.1,
        "guidance_end": 0.8, "processor_res": 256, "threshold_a": 50, "threshold_b": 150, "pixel_perfect": True,
    }, {"enabled": False, "model": "no such model"}, {
        "image": {"image": b64(image), "mask": b64(mask)}, "module": "invert", "model": "T2I_DEPTH",
        "control_mode": 2, "resize_mode": "Resize and Fill", "threshold_a": -1, "processor_res": -1,
        "lowvram": True, "hr_option": "Both", "some_future_field": 1,
    }, key="ControlNet")
    assert response.status_code == 200, response.text
    request = engine.requests[-1]
    first, second = request.control_units
    assert (first.module, first.model, first.weight, first.resize_mode, first.control_mode) == (
        "canny", "control_canny.safetensors", 0.5, "Just Resize", "My prompt is more important")
    assert (first.guidance_start, first.guidance_end, first.processor_res) == (0.1, 0.8, 256)
    assert (first.threshold_a, first.threshold_b, first.pixel_perfect) == (50, 150, True)
    assert same_pixels(first.image, image) and first.mask is None
    assert (second.module, second.model, second.control_mode) == (
        "invert", "sub/t2i_depth.safetensors", "ControlNet is more important")
    assert second.resize_mode == "Resize and Fill" and second.threshold_a is None and second.processor_res == 512
    assert same_pixels(second.image, image) and second.mask.mode == "L"
    assert "controlnet" not in {key.lower() for key in request.extension_args}
    no_effect = [w for w in json.loads(response.json()["info"])["warnings"] if "no effect on this server" in w]
    assert len(no_effect) == 1  # listed once, named as the client sent them
    assert "lowvram (args 2)" in no_effect[0] and "some_future_field (args 2)" in no_effect[0]
    assert "hr_option" not in no_effect[0]  # its default value is what happens here anyway


def test_no_controlnet_script_means_no_units(client, engine):
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200
    assert engine.requests[-1].control_units == ()
    assert txt2img(client).status_code == 200  # "args": [] is what webuiapi sends for none
    assert engine.requests[-1].control_units == ()


@pytest.fixture
def webui_client(engine):
    # no server: the client's HTTP session is the app's test client (port 1 refuses the probe at once)
    api = webuiapi.WebUIApi(baseurl="http://127.0.0.1:1/sdapi/v1", sampler="Euler", steps=2)
    api.baseurl, api.session = "http://testserver/sdapi/v1", TestClient(create_app(engine))
    return api


def test_webuiapi_units_reach_the_engine(webui_client, engine):
    image = drawing()
    unit = webuiapi.ControlNetUnit(image=image, module="canny", model="control_canny [abcdef0123]", weight=0.7,
                                   control_mode=1, pixel_perfect=True, guidance_end=0.6)
    result = webui_client.txt2img(prompt="a house", width=64, height=64, controlnet_units=[unit],
                                  alwayson_scripts={})  # webuiapi fills a shared default dict otherwise
    assert result.info["warnings"] == []
    (got,) = engine.requests[-1].control_units
    assert (got.module, got.model, got.weight, got.control_mode) == (
        "canny", "control_canny.safetensors", 0.7, "My prompt is more important")
    assert (got.resize_mode, got.threshold_a, got.threshold_b, got.pixel_perfect) == ("Resize and Fill", 64, 64, True)
    assert got.guidance_end == 0.6 and same_pixels(got.image, image)
    # img2img: a unit without an image (webuiapi sends "") uses the input image
    webui_client.img2img(images=[image], width=64, height=64,
                         controlnet_units=[webuiapi.ControlNetUnit(module="none", model="t2i_depth")],
                         alwayson_scripts={})
    (got,) = engine.requests[-1].control_units
    assert got.image is None and got.model == "sub/t2i_depth.safetensors"
    assert engine.requests[-1].mode == "img2img"


def test_webuiapi_controlnet_routes(webui_client, engine):
    assert webui_client.controlnet_version() == 2
    assert webui_client.controlnet_model_list() == ["control_canny [abcdef0123]", "t2i_depth"]
    assert {"none", "canny", "invert", "depth"} <= set(webui_client.controlnet_module_list())
    result = webui_client.controlnet_detect([drawing()], module="canny", processor_res=96, threshold_a=10,
                                            threshold_b=20)
    assert result.info == "Success" and result.images[0].size == (128, 96)  # short side = processor_res
    unit, width, height = engine.previews[-1]
    assert (unit.module, unit.threshold_a, unit.threshold_b, width, height) == ("canny", 10, 20, 128, 96)


BAD_UNITS = [
    ([canny_unit(image="not an image!")], "controlnet.args[0].image", "base64"),
    ([{"input_image": "data:image/png;base64,AAAA", "module": "canny", "model": "control_canny"}],
     "controlnet.args[0].input_image", ""),
    ([{"module": "canny", "model": "control_canny"}], "controlnet.args[0].image", "needs an image"),
    ([canny_unit(), canny_unit(model="control_scribble")], "controlnet.args[1].model", "control_canny [abcdef0123]"),
    ([canny_unit(model="broken")], "controlnet.args[0].model", "not a ControlNet"),
    ([canny_unit(module="cany")], "controlnet.args[0].module", "unknown preprocessor"),
    ([canny_unit(module="depth")], "controlnet.args[0].module", "models/ControlNet-annotators/midas"),
    ([canny_unit(threshold_a=300)], "controlnet.args[0].threshold_a", "between 1 and 255"),
    ([canny_unit(weight=5)], "controlnet.args[0].weight", "between 0 and 2"),
    ([canny_unit(guidance_start=0.9, guidance_end=0.2)], "controlnet.args[0].guidance_start", "guidance_end"),
    ([canny_unit(control_mode=7)], "controlnet.args[0].control_mode", "Balanced"),
    ([canny_unit(resize_mode="Stretch")], "controlnet.args[0].resize_mode", "Just Resize"),
    ([canny_unit(processor_res=10)], "controlnet.args[0].processor_res", "between 64 and 2048"),
    ([canny_unit(enabled="maybe")], "controlnet.args[0].enabled", "true or false"),
    ([canny_unit(image="x", input_image="y")], "controlnet.args[0].input_image", "not both"),
    ([{"enabled": False}, canny_unit(), canny_unit(), canny_unit(), canny_unit()], "controlnet.args[4]", "at most 3"),
    (["canny"], "controlnet.args[0]", "object"),
]


@pytest.mark.parametrize("units, field, words", BAD_UNITS, ids=[case[1] + " " + case[2] for case in BAD_UNITS])
def test_a_bad_unit_is_a_422_naming_its_field_and_the_server_keeps_answering(client, engine, units, field, words):
    response = txt2img(client, *units)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and words in response.json()["error"]
    assert not engine.requests  # refused before the queue
    assert txt2img(client, canny_unit()).status_code == 200


def test_unit_images_are_held_to_the_upload_limits(engine):
    engine.settings = EngineSettings(device="cpu", max_upload_megapixels=0.001)  # 1000 pixels
    client = TestClient(create_app(engine))
    response = txt2img(client, {"enabled": False}, canny_unit(image={"image": b64(drawing()), "mask": None}))
    assert response.status_code == 422 and response.json()["field"] == "controlnet.args[1].image.image"
    assert "limited to" in response.json()["error"]
    small = drawing(size=(16, 16))
    assert txt2img(client, canny_unit(image=b64(small))).status_code == 200


def test_args_that_are_not_a_list_and_engine_errors_name_the_extensions_fields(client, engine):
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": 3}}})
    assert response.status_code == 422 and response.json()["field"] == "controlnet.args"
    # the engine names the request's unit 0; the client sent it as args[1] (args[0] is disabled)
    engine.error = RequestError("control_units[0].model", "an SDXL control model does not fit an SD 1.x checkpoint")
    response = txt2img(client, {"enabled": False}, canny_unit())
    assert response.status_code == 422
    assert response.json()["field"] == "controlnet.args[1].model" and "SDXL" in response.json()["error"]
    engine.error = None
    assert txt2img(client, canny_unit()).status_code == 200


# --- the /controlnet routes ----------------------------------------------------------------------

def test_controlnet_routes_answer_in_the_extensions_shapes(client):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/model_list").json() == {"model_list": ["control_canny [abcdef0123]", "t2i_depth"]}
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"][:2] == ["none", "invert"] and "canny" in modules["module_list"]
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]] == ["Preprocessor Resolution", "Canny Low Threshold",
                                                     "Canny High Threshold"]
    assert canny["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert "depth_midas" in aliases["module_list"] and "depth_midas" in aliases["module_detail"]
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3, "control_net_max_models_num": 3}


def test_detect_returns_the_preprocessed_maps(client, engine):
    images = [drawing(), drawing((0, 255, 0), (40, 80))]
    response = client.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(i) for i in images],
        "controlnet_processor_res": 64, "controlnet_threshold_a": -1, "controlnet_threshold_b": 120})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["info"] == "Success" and len(answer["images"]) == 2
    maps = [Image.open(io.BytesIO(base64.b64decode(text))) for text in answer["images"]]
    assert [m.size for m in maps] == [(85, 64), (64, 128)]
    # the fake engine's "preprocessor" resizes the image: the map is made of the image sent
    assert same_pixels(maps[1], images[1].resize((64, 128)))
    unit = engine.previews[-1][0]
    assert (unit.module, unit.threshold_a, unit.threshold_b, unit.processor_res) == ("canny", None, 120, 64)
    # a module without a resolution slider keeps the image's size
    none = client.post("/controlnet/detect", json={"controlnet_module": "none", "controlnet_images": [b64(images[0])]})
    assert Image.open(io.BytesIO(base64.b64decode(none.json()["images"][0]))).size == (64, 48)


@pytest.mark.parametrize("body, field", [
    ({"controlnet_module": "nope", "controlnet_input_images": ["x"]}, "controlnet_module"),
    ({"controlnet_module": "depth", "controlnet_input_images": ["x"]}, "controlnet_module"),
    ({"controlnet_module": "canny", "controlnet_input_images": []}, "controlnet_input_images"),
    ({"controlnet_module": "canny", "controlnet_input_images": [b64(drawing()), "???"]}, "controlnet_input_images.1"),
    ({"controlnet_module": "canny", "controlnet_input_images": [b64(drawing())], "controlnet_threshold_b": 256},
     "controlnet_threshold_b"),
    ({"controlnet_module": "canny", "controlnet_input_images": [b64(drawing())], "controlnet_processor_res": 9999},
     "controlnet_processor_res"),
    ({"controlnet_module": "canny", "controlnet_input_images": [b64(drawing())], "controlnet_processor_res": "big"},
     "controlnet_processor_res"),
])
def test_detect_names_the_bad_field(client, body, field):
    response = client.post("/controlnet/detect", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    ok = client.post("/controlnet/detect",
                     json={"controlnet_module": "invert", "controlnet_input_images": [b64(drawing())]})
    assert ok.status_code == 200


def test_detect_maps_the_engines_errors_to_the_bodys_fields(client, engine):
    def refuse(unit, width, height, init_image=None):
        raise RequestError("image", "the image is all one colour")

    engine.preprocess_control = refuse
    response = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                       "controlnet_input_images": [b64(drawing())]})
    assert response.status_code == 422 and response.json()["field"] == "controlnet_input_images.0"


def test_mounted_controlnet_routes_sit_behind_the_apis_auth_and_docs(engine):
    app = FastAPI()
    mount_api(app, engine, auth=[("u", "p")])
    client = TestClient(app)
    assert client.get("/controlnet/version").status_code == 401
    assert client.get("/controlnet/version", auth=("u", "p")).json() == {"version": 2}
    paths = client.get("/openapi.json", auth=("u", "p")).json()["paths"]
    assert "/controlnet/detect" in paths and "/sdapi/v1/txt2img" in paths


def test_units_are_control_units_the_request_checks(client, engine):
    # the same unit built by hand and through the API: one set of rules
    assert txt2img(client, canny_unit(weight=1.5)).status_code == 200
    (got,) = engine.requests[-1].control_units
    assert got == ControlUnit(image=got.image, module="canny", model="control_canny.safetensors", weight=1.5)


# --- the real engine ---------------------------------------------------------------------------------

def test_webuiapi_job_on_the_real_engine_gives_the_engines_pixels_and_infotext(tmp_path):
    from conftest import make_engine
    from tiny import write_tiny_sd1_checkpoint
    from tiny_control import write_tiny_controlnet

    from pipelines.core.request import GenerationRequest
    from webui.api import ApiOptions

    write_tiny_sd1_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    write_tiny_controlnet(tmp_path / "models" / "ControlNet" / "control_canny.safetensors")
    real = make_engine(tmp_path / "models", tmp_path)
    api = webuiapi.WebUIApi(baseurl="http://127.0.0.1:1/sdapi/v1", sampler="Euler", steps=2)
    api.baseurl = "http://testserver/sdapi/v1"
    api.session = TestClient(create_app(real, options=ApiOptions(sd_model_checkpoint="tiny.safetensors")))
    image = drawing(size=(64, 64))
    result = api.txt2img(prompt="a box", width=64, height=64, seed=3, alwayson_scripts={}, controlnet_units=[
        webuiapi.ControlNetUnit(image=image, module="canny", model="control_canny", resize_mode="Crop and Resize",
                                threshold_a=100, threshold_b=200)])
    unit = ControlUnit(image=image, module="canny", model="control_canny.safetensors", threshold_a=100, threshold_b=200)
    direct = real.generate(GenerationRequest(prompt="a box", width=64, height=64, seed=3, steps=2, sampler="Euler",
                                             checkpoint="tiny.safetensors", save_images=False, control_units=(unit,)))
    assert same_pixels(result.images[0], direct.images[0])
    (title,) = api.controlnet_model_list()  # hashed by the job: "name [hash]"
    assert title.startswith("control_canny [") and f'ControlNet 0: "Module: canny, Model: {title}, ' in (
        result.info["infotexts"][0])
