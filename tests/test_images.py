"""img2img / inpaint pixel helpers: what lands where in the frame, and what a mask touches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.core.request import RequestError
from pipelines.generate import images

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _stripes(width: int, height: int, horizontal: bool = True) -> Image.Image:
    """Three bands red | green | blue across the long side."""
    arr = np.zeros((height, width, 3), np.uint8)
    if horizontal:
        arr[:, : width // 4] = RED
        arr[:, width // 4: 3 * width // 4] = GREEN
        arr[:, 3 * width // 4:] = BLUE
    else:
        arr[: height // 4] = RED
        arr[height // 4: 3 * height // 4] = GREEN
        arr[3 * height // 4:] = BLUE
    return Image.fromarray(arr)


def _px(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


def _close(a, b, tol=12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["just resize", "crop and resize", "resize and fill", 0, 1, 2])
@pytest.mark.parametrize("size", [(64, 64), (96, 40), (40, 96), (513, 17)])
def test_every_mode_gives_exact_size_rgb(mode, size):
    for source in (_stripes(200, 100), _stripes(30, 90, horizontal=False), Image.new("RGBA", (7, 5))):
        out = images.resize_image(source, *size, mode)
        assert out.size == size and out.mode == "RGB"


def test_just_resize_stretches_everything_in():
    out = images.resize_image(_stripes(200, 100), 100, 100, "just resize")
    assert _close(_px(out, 5, 50), RED) and _close(_px(out, 50, 50), GREEN) and _close(_px(out, 95, 50), BLUE)


def test_crop_and_resize_of_a_wide_image_keeps_the_centre():
    # 2:1 image into a square: the outer quarters (red, blue) are cropped away.
    out = images.resize_image(_stripes(200, 100), 100, 100, "crop and resize")
    for x in (2, 50, 97):
        assert _close(_px(out, x, 50), GREEN), x


def test_crop_and_resize_of_a_tall_image_keeps_the_centre():
    out = images.resize_image(_stripes(100, 200, horizontal=False), 100, 100, "crop and resize")
    for y in (2, 50, 97):
        assert _close(_px(out, 50, y), GREEN), y


def test_resize_and_fill_fits_centres_and_stretches_edges():
    # 2:1 image into a square: the picture fills the middle half, the bands above and below
    # repeat its top and bottom rows (so every column keeps its colour top to bottom).
    out = images.resize_image(_stripes(200, 100), 100, 100, "resize and fill")
    arr = np.asarray(out)
    for x, colour in ((5, RED), (50, GREEN), (95, BLUE)):
        assert _close(arr[1, x], colour) and _close(arr[50, x], colour) and _close(arr[98, x], colour)
    # bands are copies of the picture's edge row
    assert np.array_equal(arr[0], arr[24]) and np.array_equal(arr[99], arr[75])

    tall = np.asarray(images.resize_image(_stripes(50, 100, horizontal=False), 100, 100, "resize and fill"))
    assert np.array_equal(tall[:, 0], tall[:, 25]) and np.array_equal(tall[:, 99], tall[:, 74])
    assert _close(tall[2, 0], RED) and _close(tall[97, 99], BLUE)


def test_transparent_image_is_flattened_onto_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert _px(images.resize_image(rgba, 10, 10, "just resize"), 5, 5) == (255, 255, 255)


def test_unknown_resize_mode_names_the_field():
    with pytest.raises(RequestError) as info:
        images.resize_image(Image.new("RGB", (8, 8)), 8, 8, "zoom")
    assert info.value.field == "resize_mode"


def _square_mask(size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_prepare_mask_accepts_alpha_rgb_and_l():
    l_mask = _square_mask()
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (16, 16, 48, 48))  # a red brush stroke on a clear layer
    rgb = l_mask.convert("RGB")
    expected = np.asarray(images.prepare_mask(l_mask, 64, 64, blur=0, invert=False, resize_mode="just resize"))
    for mask in (rgba, rgb):
        out = images.prepare_mask(mask, 64, 64, blur=0, invert=False, resize_mode="just resize")
        assert out.mode == "L" and np.array_equal(np.asarray(out), expected)
    assert expected[32, 32] == 255 and expected[2, 2] == 0


def test_prepare_mask_binarises_before_blur():
    soft = Image.fromarray(np.full((32, 32), 100, np.uint8))  # faint grey everywhere
    out = np.asarray(images.prepare_mask(soft, 32, 32, blur=0, invert=False, resize_mode=0))
    assert (out == 0).all()


def test_prepare_mask_invert_and_blur():
    inverted = np.asarray(images.prepare_mask(_square_mask(), 64, 64, blur=0, invert=True, resize_mode=0))
    assert inverted[32, 32] == 0 and inverted[2, 2] == 255

    blurred = np.asarray(images.prepare_mask(_square_mask(), 64, 64, blur=4, invert=False, resize_mode=0))
    assert blurred[32, 32] == 255 and blurred[2, 2] == 0
    edge = blurred[32, 10:22]
    assert 0 < edge.min() < 255 and 0 < edge.max() <= 255 and (np.diff(edge.astype(int)) >= 0).all()


def test_prepare_mask_follows_the_image_resize_mode():
    # mask over the right quarter of a 2:1 picture; "crop and resize" to a square cuts it off
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (160, 0, 200, 100))
    cropped = np.asarray(images.prepare_mask(mask, 100, 100, blur=0, invert=False, resize_mode="crop and resize"))
    stretched = np.asarray(images.prepare_mask(mask, 100, 100, blur=0, invert=False, resize_mode="just resize"))
    assert cropped.shape == (100, 100) and cropped.max() == 0
    assert stretched[50, 95] == 255 and stretched[50, 50] == 0


def test_crop_region_pads_and_clamps():
    mask = _square_mask((100, 80), (10, 20, 30, 40))
    assert images.crop_region(mask, 5) == (5, 15, 35, 45)
    assert images.crop_region(mask, 50) == (0, 0, 80, 80)
    assert images.crop_region(Image.new("L", (10, 10)), 4) is None


def test_expand_to_aspect_matches_processing_ratio_inside_image():
    x1, y1, x2, y2 = images.expand_to_aspect((40, 40, 60, 50), 512, 512, 200, 100)
    assert (x2 - x1, y2 - y1) == (20, 20) and (x1, y1) == (40, 35)
    # near the edge it slides back inside instead of going out of the picture
    assert images.expand_to_aspect((0, 0, 40, 10), 512, 512, 200, 100) == (0, 0, 40, 40)
    assert images.expand_to_aspect((150, 90, 200, 100), 512, 256, 200, 100) == (150, 75, 200, 100)
    # a box that would need more than the image gets clipped to the image
    assert images.expand_to_aspect((0, 0, 200, 50), 256, 512, 200, 100) == (0, 0, 200, 100)


def test_fill_replaces_masked_pixels_with_surrounding_colours_only():
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :64] = RED
    arr[:, 64:] = BLUE
    source = Image.fromarray(arr)
    mask = _square_mask((128, 64), (40, 16, 88, 48))
    filled = np.asarray(images.fill_masked(source, mask))
    outside = np.asarray(mask) == 0
    assert np.array_equal(filled[outside], arr[outside])
    assert filled[32, 44, 0] > filled[32, 44, 2]  # left of the hole: reddish
    assert filled[32, 84, 2] > filled[32, 84, 0]  # right of the hole: bluish
    assert filled[32, 64, 1] < 10  # no colour that was not around the hole
    # smooth: no big jumps inside the filled area
    row = filled[32, 40:88].astype(int)
    assert np.abs(np.diff(row, axis=0)).max() < 40
    assert np.array_equal(filled, np.asarray(images.fill_masked(source, mask)))  # deterministic


def test_fill_with_everything_masked_is_grey():
    out = images.fill_masked(Image.new("RGB", (16, 16), RED), Image.new("L", (16, 16), 255))
    assert _px(out, 8, 8) == (127, 127, 127)


def test_composite_is_exactly_original_outside_the_mask():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    generated = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = images.prepare_mask(_square_mask(), 64, 64, blur=4, invert=False, resize_mode=0)
    out = np.asarray(images.composite(generated, original, mask))
    m = np.asarray(mask)
    assert np.array_equal(out[m == 0], np.asarray(original)[m == 0])
    assert np.array_equal(out[m == 255], np.asarray(generated)[m == 255])
    between = (m > 0) & (m < 255)
    assert between.any()
    lo = np.minimum(np.asarray(original), np.asarray(generated))[between]
    hi = np.maximum(np.asarray(original), np.asarray(generated))[between]
    assert ((out[between] >= lo) & (out[between] <= hi)).all()


def test_composite_rejects_mismatched_sizes():
    with pytest.raises(ValueError):
        images.composite(Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8)), Image.new("L", (9, 8)))


def test_only_masked_pipeline_round_trip():
    original = _stripes(200, 100)
    mask = _square_mask((200, 100), (90, 40, 110, 60))
    box = images.expand_to_aspect(images.crop_region(mask, 8), 64, 64, 200, 100)
    assert (box[2] - box[0]) == (box[3] - box[1])
    generated_crop = Image.new("RGB", (64, 64), (9, 9, 9))
    pasted = images.paste_region(generated_crop, original, box)
    out = np.asarray(images.composite(pasted, original, mask))
    assert tuple(out[50, 100]) == (9, 9, 9)
    assert np.array_equal(out[np.asarray(mask) == 0], np.asarray(original)[np.asarray(mask) == 0])
