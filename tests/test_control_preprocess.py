"""Control preprocessors: the table (core.control_modules) and the maps (generate.control_preprocess)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.core.checks import RequestError
from pipelines.core.control import ControlUnit
from pipelines.core.control_modules import (
    PREPROCESSORS,
    find_preprocessor,
    module_detail,
    module_list,
    pixel_perfect_resolution,
    unit_thresholds,
)
from pipelines.core.settings import Paths
from pipelines.generate import control_preprocess as cp


@pytest.fixture
def paths(tmp_path) -> Paths:
    return Paths(models_dir=tmp_path / "models", data_dir=tmp_path / "data", outdir=tmp_path / "out", demo_dir=None)


def square(size: int = 64, background: int = 0, fill: int = 255) -> Image.Image:
    """A light square in the middle of a dark image (or the other way round)."""
    image = Image.new("RGB", (size, size), (background,) * 3)
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1), fill=(fill,) * 3)
    return image


def white(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) > 127


# --- the table ------------------------------------------------------------------------------------

def test_module_names_and_details_speak_the_extensions_api():
    names = module_list()
    assert names[:3] == ["none", "invert", "canny"]
    assert {"depth", "depth_anything", "openpose_full", "lineart", "tile_resample", "shuffle",
            "inpaint_only"} <= set(names)
    aliases = module_list(alias_names=True)
    assert "depth_midas" in aliases and "invert (from white bg & black line)" in aliases
    assert find_preprocessor("depth_midas").name == "depth"  # labels are accepted as names
    canny = module_detail("canny")
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]] == ["Preprocessor Resolution", "Canny Low Threshold",
                                                     "Canny High Threshold"]
    assert canny["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1.0}
    assert module_detail("none")["sliders"] == []
    assert [s["name"] for s in module_detail("tile_resample")["sliders"]] == ["Down Sampling Rate"]
    assert PREPROCESSORS["canny"].model_hint == "canny" and PREPROCESSORS["depth"].model_hint == "depth"


def test_unknown_module_is_a_request_error_naming_module(paths):
    with pytest.raises(RequestError) as error:
        cp.preprocess(square(), "sharpen_everything", 64, None, None, paths=paths)
    assert error.value.field == "module" and "canny" in error.value.message


def test_thresholds_default_per_module_and_are_range_checked():
    assert unit_thresholds(ControlUnit(module="canny")) == (100, 200)
    assert unit_thresholds(ControlUnit(module="canny", threshold_a=-1, threshold_b=50)) == (100, 50)
    assert unit_thresholds(ControlUnit(module="threshold"))[0] == 127
    with pytest.raises(RequestError) as error:
        unit_thresholds(ControlUnit(module="canny", threshold_b=300))
    assert error.value.field == "threshold_b" and "255" in error.value.message
    with pytest.raises(RequestError) as error:
        unit_thresholds(ControlUnit(module="tile_resample", threshold_a=64))  # webuiapi's default, too big here
    assert error.value.field == "threshold_a"


def test_pixel_perfect_resolution_follows_the_extensions_rule():
    # a 1024x512 image into 512x512: covering it needs the short side at 512, fitting inside 256
    assert pixel_perfect_resolution((1024, 512), 512, 512, "Crop and Resize") == 512
    assert pixel_perfect_resolution((1024, 512), 512, 512, "Just Resize") == 512
    assert pixel_perfect_resolution((1024, 512), 512, 512, "Resize and Fill") == 256
    assert pixel_perfect_resolution((300, 200), 768, 512, "Crop and Resize") == 512  # both scales 2.56
    assert pixel_perfect_resolution((300, 300), 768, 512, "Resize and Fill") == round(300 * 512 / 300)


# --- built-in maps -----------------------------------------------------------------------------

def test_canny_finds_the_square_and_nothing_in_a_flat_image(paths):
    edges = white(cp.preprocess(square(), "canny", 64, 100, 200, paths=paths))
    assert edges[14:18, 20:44].any(axis=0).all() and edges[20:44, 14:18].any(axis=1).all()  # top and left sides
    assert not edges[:10].any() and not edges[28:36, 28:36].any()  # away from the sides: no edges
    flat = cp.preprocess(Image.new("RGB", (64, 64), (90, 140, 200)), "canny", 64, 100, 200, paths=paths)
    assert not white(flat).any()


def test_canny_thresholds_change_the_result(paths):
    faint = square(background=100, fill=120)  # a step of 20 grey levels
    assert white(cp.preprocess(faint, "canny", 64, 10, 20, paths=paths)).any()
    assert not white(cp.preprocess(faint, "canny", 64, 200, 250, paths=paths)).any()


def test_canny_works_at_the_processor_resolution(paths):
    assert cp.preprocess(square(), "canny", 128, None, None, paths=paths).size == (128, 128)
    assert cp.preprocess(Image.new("RGB", (200, 100)), "canny", 64, None, None, paths=paths).size == (128, 64)


def test_invert_and_threshold_do_what_they_say(paths):
    drawing = square(background=255, fill=0)  # black on white
    inverted = np.asarray(cp.preprocess(drawing, "invert", None, None, None, paths=paths))
    assert (inverted == 255 - np.asarray(drawing)).all()
    ramp = np.arange(64, dtype=np.uint8) * 4  # 0..252, left to right
    grey = Image.fromarray(np.tile(ramp[None, :, None], (64, 1, 3)))
    low = white(cp.preprocess(grey, "threshold", 64, 60, None, paths=paths))
    high = white(cp.preprocess(grey, "threshold", 64, 200, None, paths=paths))
    assert low[:, 16:].all() and not low[:, :16].any()  # 4 * 16 is the first value above 60
    assert high[:, 51:].all() and not high[:, :51].any()


def test_tile_resample_downsamples_and_shuffle_is_seeded(paths):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    assert cp.preprocess(photo, "tile_resample", None, 4.0, None, paths=paths).size == (24, 16)
    first = np.asarray(cp.preprocess(square(), "shuffle", 64, None, None, paths=paths, seed=3))
    again = np.asarray(cp.preprocess(square(), "shuffle", 64, None, None, paths=paths, seed=3))
    other = np.asarray(cp.preprocess(square(), "shuffle", 64, None, None, paths=paths, seed=4))
    assert (first == again).all() and (first != other).any()
    assert (first != np.asarray(square())).any()  # the layout moved ...
    assert first.max() > 200 and first.min() < 50  # ... its colours stayed


def test_line_extractors_find_a_drawn_line(paths):
    drawing = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(drawing).line((8, 32, 56, 32), fill=(0, 0, 0), width=3)  # black on white
    for module in ("scribble_xdog", "lineart_standard"):
        lines = np.asarray(cp.preprocess(drawing, module, 64, None, None, paths=paths).convert("L"))
        assert lines[31:34, 16:48].min() > 100, module  # the stroke: bright
        assert lines[:20].max() < 30 and lines[44:].max() < 30, module  # the paper: dark


def test_colour_grid_and_recolor(paths):
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    grid = np.asarray(cp.preprocess(photo, "color", 128, None, None, paths=paths))
    assert (grid[:64, :64] == grid[0, 0]).all() and (grid[64:, 64:] == grid[64, 64]).all()  # 64-pixel cells
    dark_light = Image.fromarray(np.repeat(np.array([[[40, 40, 40], [220, 220, 220]]], dtype=np.uint8), 8, axis=1))
    grey = np.asarray(cp.preprocess(dark_light, "recolor_luminance", None, 1.0, None, paths=paths))
    assert (grey[..., 0] == grey[..., 1]).all() and grey[0, 0, 0] < grey[0, -1, 0]  # lightness kept, colour gone
    brighter = np.asarray(cp.preprocess(dark_light, "recolor_luminance", None, 0.5, None, paths=paths))
    assert brighter[0, 0, 0] > grey[0, 0, 0]  # a gamma below 1 lifts the shadows


def test_every_built_in_preprocessor_makes_an_rgb_map(paths):
    mask = Image.new("L", (48, 32), 255)
    for name, row in PREPROCESSORS.items():
        if row.built_in:
            made = cp.preprocess(square(), name, 64, None, None, paths=paths, mask=mask)
            assert made.mode == "RGB" and min(made.size) > 0, name


# --- fitting to the output size -----------------------------------------------------------------

def halves(width: int = 128, height: int = 64) -> Image.Image:
    """Left third red, middle green, right third blue."""
    image = Image.new("RGB", (width, height), (0, 255, 0))
    ImageDraw.Draw(image).rectangle((0, 0, width // 3 - 1, height), fill=(255, 0, 0))
    ImageDraw.Draw(image).rectangle((2 * width // 3, 0, width, height), fill=(0, 0, 255))
    return image


def test_just_resize_stretches_everything_in():
    fitted = np.asarray(cp.fit_to_size(halves(), 64, 64, "Just Resize"))
    assert fitted.shape == (64, 64, 3)
    assert fitted[32, 2, 0] > 200 and fitted[32, 32, 1] > 200 and fitted[32, 61, 2] > 200


def test_crop_and_resize_keeps_the_centre():
    fitted = np.asarray(cp.fit_to_size(halves(), 32, 64, "Crop and Resize"))
    assert fitted.shape == (64, 32, 3)
    assert (fitted[..., 1] > 200).all()  # only the green middle is left


def test_resize_and_fill_fits_inside_and_fills_with_the_edge_colour():
    grey_frame = Image.new("RGB", (64, 32), (128, 128, 128))
    ImageDraw.Draw(grey_frame).rectangle((16, 8, 47, 23), fill=(255, 255, 255))
    fitted = np.asarray(cp.fit_to_size(grey_frame, 64, 64, "Resize and Fill"))
    assert fitted.shape == (64, 64, 3)
    assert (fitted[:16] == 128).all() and (fitted[48:] == 128).all()  # the fill: the border's colour
    assert (fitted[24:40, 24:40] == 255).all()  # the content, centred
    mask = cp.fit_to_size(Image.new("L", (64, 32), 0), 64, 64, "Resize and Fill", fill=255)
    assert (np.asarray(mask)[:16] == 255).all() and (np.asarray(mask)[16:48] == 0).all()


def test_binary_maps_stay_binary_when_fitted(paths):
    edges = cp.preprocess(square(128), "canny", 128, None, None, paths=paths)
    for size in ((48, 48), (200, 200)):
        fitted = np.asarray(cp.fit_to_size(edges, *size, "Just Resize"))
        assert set(np.unique(fitted)) == {0, 255}


def test_prepare_control_image_uses_the_init_image_and_the_output_size(paths):
    unit = ControlUnit(module="canny", model="control_canny", resize_mode="Crop and Resize", processor_res=64)
    with pytest.raises(RequestError) as error:
        cp.prepare_control_image(unit, 64, 64, paths=paths)
    assert error.value.field == "image"
    prepared = cp.prepare_control_image(unit, 96, 64, init_image=square(), paths=paths)
    assert prepared.size == (96, 64) and prepared.mode == "RGB" and white(prepared).any()
    own = cp.prepare_control_image(unit.replace(image=Image.new("RGB", (64, 64))), 96, 64, init_image=square(),
                                   paths=paths)
    assert not white(own).any()  # the unit's own (flat) image wins over the job's


def test_pixel_perfect_unit_detects_at_the_output_scale():
    unit = ControlUnit(module="canny", pixel_perfect=True, processor_res=1024, resize_mode="Resize and Fill")
    image = Image.new("RGB", (100, 50))
    assert cp.unit_resolution(unit, image, 64, 64) == 32  # 100x50 fits 64x64 at 0.64: the short side is 32
    assert cp.unit_resolution(unit.replace(pixel_perfect=False), image, 64, 64) == 1024


# --- inpaint ------------------------------------------------------------------------------------

def test_inpaint_map_and_tensor_mark_the_masked_pixels(paths):
    photo = Image.new("RGB", (64, 64), (255, 128, 0))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)  # repaint the left half
    unit = ControlUnit(module="inpaint_only", model="control_inpaint", resize_mode="Just Resize")
    with pytest.raises(RequestError) as error:
        cp.prepare_control_image(unit, 64, 64, init_image=photo, paths=paths)
    assert error.value.field == "mask"
    shown = np.asarray(cp.prepare_control_image(unit, 64, 64, init_image=photo, init_mask=mask, paths=paths))
    assert (shown[:, :32] == 0).all() and (shown[:, 32:] == (255, 128, 0)).all()
    tensor = cp.inpaint_control_tensor(photo, mask)
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32
    assert (tensor[0, :, :, :32] == -1).all()
    assert np.allclose(tensor[0, :, 0, 40], (1.0, 128 / 255, 0.0))
    fitted_mask = cp.prepare_control_mask(unit.replace(resize_mode="Resize and Fill"), 64, 128, init_mask=mask)
    assert (np.asarray(fitted_mask)[:32] == 255).all()  # the filled border is repainted too


# --- networks ----------------------------------------------------------------------------------

def write_tiny_depth_anything(folder) -> None:
    """A random-weight Depth Anything folder as transformers saves it (config, weights, processor)."""
    import torch  # heavy: only the network tests need it
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                            image_size=56, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14)
    processor.save_pretrained(folder)


def test_missing_annotator_names_the_file_and_both_folders(paths):
    with pytest.raises(RequestError) as error:
        cp.preprocess(square(), "openpose_full", 64, None, None, paths=paths)
    message = error.value.message
    assert error.value.field == "module"
    assert "body_pose_model.pth" in message and str(paths.folder("annotators") / "openpose") in message
    assert "extensions/sd-webui-controlnet/annotator/downloads/openpose" in message.replace("\\", "/")
    original = paths.models_dir.parent / cp.A1111_DOWNLOADS / "midas" / "dpt_hybrid-midas-501f0c75.pt"
    original.parent.mkdir(parents=True)
    original.write_bytes(b"the extension's own format")
    with pytest.raises(RequestError) as error:
        cp.preprocess(square(), "depth", None, None, None, paths=paths)
    message = error.value.message
    assert "config.json" in message and "preprocessor_config.json" in message and "Intel/dpt-hybrid-midas" in message
    assert "dpt_hybrid-midas-501f0c75.pt found there cannot be read" in message


def test_tiny_depth_model_runs_offline_from_a1111s_folder(paths, no_network):
    import torch  # heavy: only the network tests need it
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    folder = paths.models_dir.parent / cp.A1111_DOWNLOADS / "depth_anything"
    write_tiny_depth_anything(folder)
    cp.unload_annotators()
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    depth = np.asarray(cp.preprocess(photo, "depth_anything", None, None, None, paths=paths))
    assert depth.shape == (48, 80, 3) and (depth[..., 0] == depth[..., 2]).all()
    assert depth.min() == 0 and depth.max() == 255  # stretched to the full range
    # the same numbers as transformers' own model on the same folder
    model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True).eval()
    inputs = AutoImageProcessor.from_pretrained(folder, local_files_only=True)(images=photo, return_tensors="pt")
    with torch.inference_mode():
        reference = torch.nn.functional.interpolate(model(**inputs).predicted_depth[:, None], size=(48, 80),
                                                    mode="bicubic", align_corners=False)[0, 0].numpy()
    reference = (reference - reference.min()) / (reference.max() - reference.min()) * 255
    assert np.abs(depth[..., 0].astype(np.float32) - reference).max() <= 1.0
    unit = ControlUnit(image=photo, module="depth_anything", model="control_depth", resize_mode="Crop and Resize")
    assert cp.prepare_control_image(unit, 64, 64, paths=paths).size == (64, 64)
    cp.unload_annotators()


def test_status_lists_available_and_missing(paths):
    write_tiny_depth_anything(paths.folder("annotators") / "depth_anything")
    openpose = paths.folder("annotators") / "openpose"
    openpose.mkdir(parents=True)
    for name in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"):
        (openpose / name).write_bytes(b"weights")
    status = {row["name"]: row for row in cp.preprocessor_status(paths)}
    assert set(status) == set(PREPROCESSORS)
    assert status["canny"] == {"name": "canny", "available": True, "missing": ""}
    assert status["depth_anything"]["available"] is True
    assert status["depth"]["available"] is False and "config.json" in status["depth"]["missing"]
    assert status["lineart"]["available"] is False and "sk_model.pth" in status["lineart"]["missing"]
    # weights present but no network for them here: said so, not "missing"
    assert status["openpose"]["available"] is False and "not built in yet" in status["openpose"]["missing"]
