"""Upscaler registry and resizing to a factor or an exact size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from pipelines.core.request import RequestError
from pipelines.generate.upscalers import Upscaler, get_upscaler, upscale_image, upscaler_names


def _image(w=40, h=30) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@dataclass
class FakeNeural:
    """Stands in for a spandrel model: always upscales by its native 4x."""

    name: str = "4x-Fake"
    scale: float | None = 4

    def upscale(self, image: Image.Image, scale: float) -> Image.Image:
        return image.resize((image.width * 4, image.height * 4), Image.Resampling.NEAREST)


def test_builtin_names_always_present_and_extras_follow():
    assert upscaler_names()[:3] == ["Lanczos", "Nearest", "Bicubic"]
    assert upscaler_names(["4x-UltraSharp", FakeNeural(), "Lanczos"]) == [
        "Lanczos", "Nearest", "Bicubic", "4x-UltraSharp", "4x-Fake"]


def test_get_upscaler_and_unknown_name_error():
    assert get_upscaler("Lanczos").name == "Lanczos"
    assert get_upscaler("nearest").name == "Nearest"
    assert get_upscaler("4x-Fake", [FakeNeural()]).scale == 4
    assert isinstance(get_upscaler("Bicubic"), Upscaler)
    with pytest.raises(ValueError) as info:
        get_upscaler("ESRGAN_4x")
    assert isinstance(info.value, RequestError) and info.value.field == "upscaler"
    assert "upscaler" in str(info.value) and "Lanczos, Nearest, Bicubic" in str(info.value)


@pytest.mark.parametrize("name", ["Lanczos", "Nearest", "Bicubic"])
@pytest.mark.parametrize("scale, size", [(2, (80, 60)), (1.5, (60, 45)), (4, (160, 120)), (1, (40, 30))])
def test_upscale_by_factor(name, scale, size):
    out = upscale_image(_image(), name, scale=scale)
    assert out.size == size and out.mode == "RGB"


def test_nearest_2x_repeats_pixels():
    image = _image(4, 3)
    out = np.asarray(upscale_image(image, "Nearest", scale=2))
    assert np.array_equal(out[::2, ::2], np.asarray(image))


@pytest.mark.parametrize("target", [(100, 100), (128, 64), (41, 31), (1000, 750)])
def test_upscale_to_exact_target(target):
    for upscaler in ("Lanczos", FakeNeural()):
        assert upscale_image(_image(), upscaler, target_size=target).size == target


def test_target_with_other_aspect_crops_the_centre_instead_of_squashing():
    # left third red, middle green, right third blue; to a square the sides are cropped
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:60] = (0, 255, 0)
    arr[:, 60:] = (0, 0, 255)
    out = np.asarray(upscale_image(Image.fromarray(arr), "Nearest", target_size=(60, 60)))
    assert (out[:, 5:55, 1] > 200).all() and (out[:, 5:55, 0] < 50).all()


def test_neural_upscaler_result_is_brought_to_the_requested_factor():
    out = upscale_image(_image(), FakeNeural(), scale=2)
    assert out.size == (80, 60)
    assert upscale_image(_image(), "4x-Fake", scale=4, extra=[FakeNeural()]).size == (160, 120)


def test_bad_arguments():
    with pytest.raises(ValueError):
        upscale_image(_image(), "Lanczos")
    with pytest.raises(ValueError):
        upscale_image(_image(), "Lanczos", scale=2, target_size=(10, 10))
    with pytest.raises(RequestError) as info:
        upscale_image(_image(), "Lanczos", scale=0)
    assert info.value.field == "scale"
    with pytest.raises(RequestError) as info:
        upscale_image(_image(), "nope", scale=2)
    assert info.value.field == "upscaler"
