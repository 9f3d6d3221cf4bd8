"""Upload limits: file size and pixel count, refused from the header before decoding, naming
the field, for the API's images and every image input of the web UI."""

from __future__ import annotations

import base64
import http.client
import io
import json

import gradio as gr
import pytest
import requests
from gradio.data_classes import FileData
from PIL import Image
from test_api import serve
from test_webui import FakeEngine

from pipelines.core.request import RequestError
from pipelines.core.settings import EngineSettings
from pipelines.core.uploads import UploadLimits
from webui.api import create_app
from webui.api.errors import ApiError
from webui.api.images import decode_image
from webui.app import build_ui

LIMITS = UploadLimits(max_bytes=200_000, max_pixels=1_000_000)


def png_bytes(width: int, height: int, mode: str = "1") -> bytes:
    """A small file holding many pixels (one colour compresses to almost nothing)."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), bytes(range(256)) * (width * height * 3 // 256 + 1)).save(
        buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_pixels_are_counted_from_the_header_before_decoding(monkeypatch):
    data = png_bytes(2000, 1000)  # 2 MP in a few kB
    assert len(data) < LIMITS.max_bytes
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(RequestError) as info:
        LIMITS.decode("init_images.0", data)
    assert info.value.field == "init_images.0"
    assert "2000x1000" in info.value.message and "limited to 1 megapixels" in info.value.message
    assert decoded == [], "the pixels were decoded before the limit was checked"


def test_file_size_limit_and_images_within_limits():
    with pytest.raises(RequestError, match=r"^mask: the file is 0\.5 MB; uploads are limited to 0\.190735 MB$"):
        LIMITS.decode("mask", noisy_png(400, 400))  # ~480 kB
    image = LIMITS.decode("mask", png_bytes(1000, 1000, "RGB"))
    assert image.size == (1000, 1000)
    with pytest.raises(RequestError, match="not an image"):
        LIMITS.decode("mask", b"plain text")


def test_default_pixel_limit_is_below_pillows_bomb_threshold():
    assert UploadLimits().max_pixels < Image.MAX_IMAGE_PIXELS
    assert UploadLimits.of(EngineSettings(max_upload_mb=2, max_upload_megapixels=3)) == UploadLimits(2 << 20, 3_000_000)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_api_refuses_big_base64_before_decoding_it():
    huge = "A" * (LIMITS.max_bytes * 2)  # never valid base64 of an image: refused on its length alone
    with pytest.raises(ApiError) as info:
        decode_image("image", huge, LIMITS)
    assert info.value.status == 422 and info.value.field == "image" and "MB" in info.value.message
    with pytest.raises(ApiError) as info:
        decode_image("mask", "data:image/png;base64," + b64(png_bytes(1200, 1200)), LIMITS)
    assert info.value.field == "mask" and "1200x1200" in info.value.message


class LimitedSettingsEngine:
    """The real engine with small upload limits in its settings."""

    def __init__(self, engine, limits: EngineSettings):
        self._engine = engine
        self.settings = limits

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_api_routes_name_the_field_over_the_limits(engine):
    small = LimitedSettingsEngine(engine, EngineSettings(max_upload_mb=0.1, max_upload_megapixels=0.5))
    big = b64(png_bytes(1000, 1000))  # 1 MP
    with serve(create_app(small)) as url:
        for route, body, field in (
            ("img2img", {"init_images": [big], "steps": 2, "width": 64, "height": 64}, "init_images.0"),
            ("img2img", {"init_images": [b64(png_bytes(64, 64, "RGB"))], "mask": big, "steps": 2,
                         "width": 64, "height": 64}, "mask"),
            ("extra-single-image", {"image": big, "upscaler_1": "Lanczos", "upscaling_resize": 2}, "image"),
            ("png-info", {"image": b64(noisy_png(300, 300))}, "image"),
        ):
            response = requests.post(f"{url}/sdapi/v1/{route}", json=body, timeout=60)
            assert response.status_code == 422, (route, response.text)
            assert response.json()["field"] == field
            assert "limited to" in response.json()["error"]
        # the server keeps answering, and images within the limits work
        ok = requests.post(f"{url}/sdapi/v1/png-info", json={"image": b64(png_bytes(64, 64))}, timeout=30)
        assert ok.status_code == 200


@pytest.fixture(scope="module")
def page():
    engine = FakeEngine()
    engine.settings = EngineSettings(max_upload_mb=1, max_upload_megapixels=1)
    return build_ui(engine)


def uploaded(tmp_path, data: bytes, name: str = "upload.png") -> FileData:
    path = tmp_path / name
    path.write_bytes(data)
    return FileData(path=str(path), orig_name=name)


def test_every_image_input_of_the_page_checks_pixels_before_decoding(page, tmp_path):
    ui = page.webui
    inputs = {"img2img": ui.fields["img2img"]["init_image"], "inpaint": ui.fields["inpaint"]["inpaint_image"],
              "upscale": ui.fields["sd_upscale"]["image"]}
    big = uploaded(tmp_path, png_bytes(1500, 1000))
    for where, component in inputs.items():
        payload = big
        if isinstance(component, gr.ImageEditor):
            payload = component.data_model(background=big, layers=[], composite=big)
        with pytest.raises(gr.Error) as info:
            component.preprocess(payload)
        assert str(info.value.message).startswith(component.label), where
        assert "1500x1000" in info.value.message, where
    fine = uploaded(tmp_path, png_bytes(64, 64, "RGB"), "fine.png")
    assert inputs["img2img"].preprocess(fine).size == (64, 64)


def test_api_refuses_a_body_too_big_to_hold_allowed_images_before_reading_it(engine):
    small = LimitedSettingsEngine(engine, EngineSettings(max_upload_mb=0.1))
    with serve(create_app(small)) as url:
        host, port = url.rsplit("//", 1)[1].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.putrequest("POST", "/sdapi/v1/img2img")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(1 << 30))  # announces 1 GB...
        connection.endheaders()
        connection.send(b'{"init_images": ["' + b"A" * 1000)  # ...and sends a little: answered anyway
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        assert response.status == 413
        assert answer["field"] == "body" and "at most 1 MB" in answer["error"]
        ok = requests.post(f"{url}/sdapi/v1/png-info", json={"image": b64(png_bytes(64, 64))}, timeout=30)
        assert ok.status_code == 200  # the server keeps answering
