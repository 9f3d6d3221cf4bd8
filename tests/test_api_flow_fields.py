"""The API's SD 3 / Flux fields: Forge's Distilled CFG Scale and the schedule's Shift reach the request
by name, an out-of-range one is a 422 naming it, and absent means the model's own."""

from __future__ import annotations

import pytest
from test_webui import FakeEngine

from webui.api import ApiOptions
from webui.api.bodies import Txt2ImgRequest
from webui.api.errors import ApiError
from webui.api.translate import prepare_generation


def test_distilled_cfg_scale_and_shift_reach_the_request():
    body = Txt2ImgRequest(prompt="x", distilled_cfg_scale=2.5, shift=3.0)
    request = prepare_generation(FakeEngine(), body, ApiOptions()).request
    assert (request.distilled_cfg_scale, request.shift) == (2.5, 3.0)


def test_absent_means_the_models_own():
    request = prepare_generation(FakeEngine(), Txt2ImgRequest(prompt="x"), ApiOptions()).request
    assert request.distilled_cfg_scale is None and request.shift is None


@pytest.mark.parametrize("field, value", [("shift", 0.0), ("shift", 50.0), ("distilled_cfg_scale", -1.0)])
def test_an_out_of_range_value_names_its_field(field, value):
    with pytest.raises(ApiError) as info:
        prepare_generation(FakeEngine(), Txt2ImgRequest(prompt="x", **{field: value}), ApiOptions())
    assert info.value.status == 422 and info.value.field == field


def test_the_pages_zero_asks_for_the_models_own_shift_and_distilled_cfg():
    from webui import convert

    untouched = convert.generation_request("txt2img", {"prompt": "x", "shift": 0, "distilled_cfg_scale": 0})
    assert untouched.shift is None and untouched.distilled_cfg_scale is None
    chosen = convert.generation_request("txt2img", {"prompt": "x", "shift": 3, "distilled_cfg_scale": 2.5})
    assert (chosen.shift, chosen.distilled_cfg_scale) == (3, 2.5)
