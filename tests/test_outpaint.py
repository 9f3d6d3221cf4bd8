"""Outpainting: the canvas grows by the asked pixels, the new area is painted, and the original
pixels outside the blend band stay exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.core import infotext
from pipelines.core.request import GenerationRequest, RequestError
from pipelines.generate.outpaint import as_inpaint

SIZE = 64


def source() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def request(**changes) -> GenerationRequest:
    fields = dict(mode="img2img", prompt="a red circle", seed=5, steps=4, sampler="Euler", width=SIZE, height=SIZE,
                  init_image=source(), denoising_strength=0.9, mask_blur=4, save_images=False)
    return GenerationRequest(**{**fields, **changes})


def test_the_canvas_grows_and_the_original_stays_outside_the_band(engine):
    result = engine.generate(request(outpaint_right=32, outpaint_up=16))
    assert result.images, result.warnings
    image = np.asarray(result.images[0], dtype=np.int16)
    assert image.shape[:2] == (SIZE + 16, SIZE + 32)
    # the old area less the band along the grown edges: 4 pixels masked, then blurred (sigma 4)
    band = 4 + 3 * 4
    kept = image[16 + band:, : SIZE - band]
    assert np.array_equal(kept, np.asarray(source(), dtype=np.int16)[band:, : SIZE - band])
    assert not np.array_equal(image[16:20, :8], np.asarray(source(), dtype=np.int16)[:4, :8])  # the seam is painted
    new = image[:, SIZE:]
    assert new.std() > 5  # painted, not a flat fill
    assert infotext.parse_infotext(result.infotexts[0])["Outpaint"] == "right 32, up 16"


def test_the_request_becomes_an_inpaint_request_with_a_mask_over_the_new_area():
    inpaint, params = as_inpaint(request(outpaint_left=20, mask_blur=0).with_resolved_seeds())
    assert inpaint.mode == "inpaint" and (inpaint.width, inpaint.height) == (88, SIZE)  # 84 rounded up to 88
    mask = np.asarray(inpaint.mask)
    assert mask[:, :24].min() == 255 and mask[:, 24:].max() == 0  # the 4 extra pixels grow on the left too
    assert np.array_equal(np.asarray(inpaint.init_image)[:, 24:], np.asarray(source()))
    assert params == {"Outpaint": "left 20"}


def test_outpainting_limits_name_the_field():
    with pytest.raises(RequestError) as error:
        request(outpaint_down=1024, init_image=Image.new("RGB", (64, 1100)))
    assert error.value.field == "outpaint_down" and "canvas would be" in error.value.message
    with pytest.raises(RequestError) as error:
        GenerationRequest(mode="txt2img", outpaint_left=64)
    assert error.value.field == "outpaint_left"
    with pytest.raises(RequestError) as error:
        request(outpaint_up=-8)
    assert error.value.field == "outpaint_up"


def test_the_page_sends_outpainting_and_soft_inpainting():
    """img2img and Inpaint carry the Outpainting sliders and Inpaint the Soft inpainting box, by field name."""
    from test_webui import FakeEngine, fake_request, values

    from webui.app import build_ui

    engine = FakeEngine()
    ui = build_ui(engine).webui
    assert "soft_inpainting" not in ui.fields["img2img"] and "outpaint_left" not in ui.fields["txt2img"]
    ui.generate("img2img", values(ui, "img2img", init_image=source(), outpaint_right=32, outpaint_up=16,
                                  width=64, height=64, steps=2), request=fake_request("s"))
    sent = engine.requests[-1]
    assert (sent.outpaint_right, sent.outpaint_up, sent.size_for(512)) == (32, 16, (96, 80))
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 128), (10, 10, 40, 40))
    editor = {"background": source().convert("RGBA"), "layers": [layer], "composite": None}
    ui.generate("inpaint", values(ui, "inpaint", inpaint_image=editor, soft_inpainting=True, width=64, height=64,
                                  steps=2), request=fake_request("s"))
    assert engine.requests[-1].soft_inpainting is True
