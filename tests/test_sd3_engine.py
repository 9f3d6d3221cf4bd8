"""An SD 3 file dropped into models/Stable-diffusion gives an image through the engine, as any checkpoint;
what SD 3's loop cannot do yet is refused by name."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_engine
from tiny_sd3 import write_tiny_sd3

from pipelines.core import infotext
from pipelines.core.control import ControlUnit
from pipelines.core.request import GenerationRequest, RequestError


@pytest.fixture(scope="module")
def sd3_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-models")
    files = write_tiny_sd3(tmp_path_factory.mktemp("sd3-files"))
    (root / "Stable-diffusion").mkdir()
    shutil.copy(files.all_in_one, root / "Stable-diffusion" / "sd35.safetensors")
    return make_engine(root, tmp_path_factory.mktemp("sd3-engine"))


def test_an_sd3_checkpoint_makes_an_image_through_the_engine(sd3_engine):
    listed = sd3_engine.find_checkpoint("sd35.safetensors")
    assert listed is not None and listed.details.get("family_id") == "sd3"
    result = sd3_engine.generate(GenerationRequest(prompt="a red circle", seed=3, steps=3, sampler="Euler",
                                                   width=64, height=64, save_images=False))
    assert result.images and result.images[0].size == (64, 64)
    assert np.asarray(result.images[0]).std() > 1  # not a flat image
    params = infotext.parse_infotext(result.infotexts[0])
    assert params["Model"] == "sd35" and "Shift" in params


def test_what_sd3_cannot_do_yet_is_refused_by_name(sd3_engine):
    with pytest.raises(RequestError) as error:
        sd3_engine.generate(GenerationRequest(prompt="x", steps=2, width=64, height=64, save_images=False,
                                              control_units=[ControlUnit(model="any")]))
    assert error.value.field.startswith("control_units")
