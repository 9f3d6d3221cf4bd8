"""RetinaFace detection from facexlib's released files, FFHQ alignment and the aligned paste-back.

The detector files are written as the released ones are (every key under DataParallel's
`module.`, torch.save of the state dict) with random weights, and read by the same code as a
real `detection_Resnet50_Final.pth` (weights only, strict). Random weights find random faces,
so the detection test sets the heads' weights by hand: every anchor of the coarsest level says
"face" with a box eight times its size (so all of them overlap: one face after NMS) and fixed
landmark offsets, which makes the expected face a matter of arithmetic.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from test_faces import draw_face, write_tiny_restoreformer

from pipelines.core.request import GenerationRequest
from pipelines.core.settings import MODEL_KINDS, EngineSettings, Paths
from pipelines.engine import Engine
from pipelines.generate import face_align, face_detect, faces
from pipelines.generate.face_align import FFHQ_TEMPLATE, Face
from pipelines.models.registry import HashCache, ModelRegistry

# released key names and shapes (facexlib v0.1.0's detection_Resnet50_Final.pth)
RESNET50_FACTS = {"module.body.conv1.weight": (64, 3, 7, 7), "module.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
                  "module.fpn.output3.0.weight": (256, 2048, 1, 1), "module.fpn.merge1.0.weight": (256, 256, 3, 3),
                  "module.ssh3.conv7x7_3.0.weight": (64, 64, 3, 3), "module.ClassHead.0.conv1x1.weight": (4, 256, 1, 1),
                  "module.BboxHead.1.conv1x1.weight": (8, 256, 1, 1),
                  "module.LandmarkHead.2.conv1x1.weight": (20, 256, 1, 1)}
MOBILENET_FACTS = {"module.body.stage1.0.0.weight": (8, 3, 3, 3), "module.body.stage3.1.3.weight": (256, 256, 1, 1),
                   "module.fpn.output1.0.weight": (64, 64, 1, 1), "module.ssh1.conv3X3.0.weight": (32, 64, 3, 3)}
EYES_NOSE_MOUTH = np.array([[-0.3, -0.2], [0.3, -0.2], [0.0, 0.05], [-0.2, 0.3], [0.2, 0.3]])  # in anchor units
BOX_GROWTH = 8.0  # the decoded box over the anchor's size


def released_state_dict(layout: face_detect.Layout, seed: int = 0, batch_counts: bool = True) -> OrderedDict:
    torch.manual_seed(seed)
    state = face_detect.RetinaFace(layout).state_dict()
    return OrderedDict((f"module.{k}", v) for k, v in state.items() if batch_counts or "num_batches" not in k)


def save_released(path: Path, state: OrderedDict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def face_on_coarse_anchors(state: OrderedDict) -> OrderedDict:
    """Heads set by hand: only the stride-32 level's 512-pixel anchors (the second per cell) are
    faces, sure of it, with the box BOX_GROWTH times the anchor and the landmarks at EYES_NOSE_MOUTH."""
    state = OrderedDict(state)
    for name in ("ClassHead", "BboxHead", "LandmarkHead"):
        for level in range(3):
            state[f"module.{name}.{level}.conv1x1.weight"].zero_()
            state[f"module.{name}.{level}.conv1x1.bias"].zero_()
        for level in range(3):  # channels: anchor * values + value
            bias = state[f"module.ClassHead.{level}.conv1x1.bias"]
            bias.copy_(torch.tensor([10.0, -10.0, 10.0, -10.0] if level < 2 else [10.0, -10.0, -10.0, 10.0]))
    offsets = torch.tensor(EYES_NOSE_MOUTH / face_detect.VARIANCES[0], dtype=torch.float32).flatten()
    state["module.LandmarkHead.2.conv1x1.bias"][10:] = offsets
    state["module.BboxHead.2.conv1x1.bias"][6:] = math.log(BOX_GROWTH) / face_detect.VARIANCES[1]
    return state


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retina")
    return save_released(root / "GFPGAN" / face_detect.MOBILENET.file,
                         face_on_coarse_anchors(released_state_dict(face_detect.MOBILENET)))


def moved(points: np.ndarray, degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = math.radians(degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ (scale * rotation).T + np.array(shift)


def square_in_picture(landmarks: np.ndarray, shape: tuple[int, int], grow: int = 0) -> np.ndarray:
    """Where the 512x512 face square lands in the picture (a boolean mask), grown or shrunk by pixels."""
    matrix = face_align.similarity_transform(landmarks, FFHQ_TEMPLATE)
    corners = face_align.apply_transform(face_align.invert_transform(matrix),
                                         np.array([[0, 0], [512, 0], [512, 512], [0, 512]]) - 0.5)
    pad = 2 * abs(grow) + 2  # drawn on a larger canvas, so the picture's border does not stop the erosion
    mask = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad), np.uint8)
    cv2.fillConvexPoly(mask, np.round((corners + pad) * 16).astype(np.int32), 1, shift=4)
    kernel = np.ones((2 * abs(grow) + 1, 2 * abs(grow) + 1), np.uint8)
    mask = cv2.dilate(mask, kernel) if grow > 0 else cv2.erode(mask, kernel) if grow < 0 else mask
    return mask[pad:pad + shape[0], pad:pad + shape[1]].astype(bool)


def smooth_picture(size: int = 256) -> Image.Image:
    """A picture without hard edges, so resampling it twice changes it little."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y - 3 * x), 0.3 + 0.3 * x * y], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


# --- reading the released files -----------------------------------------------------------------

def test_a_released_layout_resnet50_file_loads_strictly_through_the_safe_reader(tmp_path):
    state = released_state_dict(face_detect.RESNET50)
    for key, shape in RESNET50_FACTS.items():
        assert tuple(state[key].shape) == shape, key
    path = save_released(tmp_path / face_detect.RESNET50.file, state)
    net = face_detect.load_retinaface(path)
    assert isinstance(net.body, face_detect.ResNetBody) and not net.training
    assert torch.equal(net.fpn.output1[0].weight, state["module.fpn.output1.0.weight"])


def test_a_mobilenet_file_without_batch_counts_loads_and_a_wrong_file_is_named(tmp_path):
    state = released_state_dict(face_detect.MOBILENET, batch_counts=False)  # older torch wrote none
    for key, shape in MOBILENET_FACTS.items():
        assert tuple(state[key].shape) == shape, key
    net = face_detect.load_retinaface(save_released(tmp_path / face_detect.MOBILENET.file, state))
    assert isinstance(net.body, face_detect.MobileNetBody)
    wrong = save_released(tmp_path / "other" / face_detect.RESNET50.file, state)  # MobileNet under ResNet's name
    with pytest.raises(face_detect.DetectorLoadError, match="detection_Resnet50_Final.pth: not a resnet50"):
        face_detect.load_retinaface(wrong)
    (tmp_path / "code").mkdir()
    torch.save({"weights": Path("x")}, tmp_path / "code" / face_detect.MOBILENET.file)
    with pytest.raises(face_detect.DetectorLoadError, match="refused to load"):  # a pickle that is not just tensors
        face_detect.load_retinaface(tmp_path / "code" / face_detect.MOBILENET.file)


# --- detecting ---------------------------------------------------------------------------------

def test_anchors_and_decoding_follow_retinafaces_priors():
    priors = face_detect.anchors(64, 96)
    assert len(priors) == 2 * (8 * 12 + 4 * 6 + 2 * 3)  # two anchor sizes per cell, strides 8, 16, 32
    assert torch.allclose(priors[0], torch.tensor([4 / 96, 4 / 64, 16 / 96, 16 / 64]))
    assert torch.allclose(priors[1], torch.tensor([4 / 96, 4 / 64, 32 / 96, 32 / 64]))
    assert torch.allclose(priors[-1], torch.tensor([80 / 96, 48 / 64, 512 / 96, 512 / 64]))
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.1]])
    boxes, points = face_detect.decode(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 10), prior)
    assert torch.allclose(boxes, torch.tensor([[0.42, 0.45, 0.62, 0.55]]))  # shifted by 0.1 of its width
    assert torch.allclose(points, torch.full((1, 5, 2), 0.5))
    assert face_detect.detection_scale((64, 48)) == 640 / 48  # small pictures are enlarged
    assert face_detect.detection_scale((4000, 1000)) == 2150 / 4000  # long ones kept within the cap


def test_detect_gives_boxes_scores_and_landmarks_in_the_pictures_pixels(detector_file):
    net = face_detect.load_retinaface(detector_file)
    image = Image.new("RGB", (64, 64), (120, 100, 90))
    found = face_detect.detect(net, image, short_side=64)
    assert len(found) == 1  # the overlapping coarse boxes are one face after NMS
    face = found[0]
    assert face.score > 0.99 and face.landmarks.shape == (5, 2)
    left, top, width, height = face.box
    assert width == pytest.approx(512 * BOX_GROWTH) and height == pytest.approx(512 * BOX_GROWTH)
    centre = np.array([left + width / 2, top + height / 2])
    assert tuple(centre) in {(16.0, 16.0), (48.0, 16.0), (16.0, 48.0), (48.0, 48.0)}  # a stride-32 cell
    assert np.allclose(face.landmarks, centre + EYES_NOSE_MOUTH * 512, atol=1e-3)
    enlarged = face_detect.detect(net, image, short_side=128)[0]  # detected at 2x: still the picture's pixels
    assert enlarged.box[2] == pytest.approx(256 * BOX_GROWTH)
    plain = face_detect.detect(net, Image.new("RGB", (64, 64)), threshold=1.0)
    assert plain == []


# --- aligning ------------------------------------------------------------------------------------

def test_the_template_maps_onto_itself_and_a_moved_face_back_onto_it():
    identity = face_align.similarity_transform(FFHQ_TEMPLATE, FFHQ_TEMPLATE)
    assert np.allclose(identity, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    for degrees, scale, shift in ((25, 0.3, (40, 55)), (-70, 1.7, (-100, 300)), (180, 0.05, (3, 4))):
        landmarks = moved(FFHQ_TEMPLATE, degrees, scale, shift)
        aligned = face_align.apply_transform(face_align.alignment(landmarks), landmarks)
        assert np.abs(aligned - FFHQ_TEMPLATE).max() < 0.5
    noisy = moved(FFHQ_TEMPLATE, 10, 0.5, (20, 20)) + np.random.default_rng(0).normal(0, 1.0, (5, 2))
    matrix = face_align.alignment(noisy)
    a, b = matrix[0, 0], matrix[1, 0]
    assert matrix[0, 1] == pytest.approx(-b) and matrix[1, 1] == pytest.approx(a)  # still a similarity
    assert math.hypot(a, b) == pytest.approx(2.0, rel=0.02) and math.degrees(math.atan2(b, a)) == pytest.approx(
        -10, abs=1)
    with pytest.raises(ValueError):
        face_align.similarity_transform(FFHQ_TEMPLATE, FFHQ_TEMPLATE[:3])


@pytest.mark.parametrize("scale", [0.4, 0.15])  # a face bigger and smaller than the restorer's 512 square
def test_warp_restore_unwarp_with_an_identity_restorer_keeps_the_picture(scale):
    image = smooth_picture(256)
    landmarks = moved(FFHQ_TEMPLATE, 15, scale, (60, 20))
    out = faces.restore_each(image, [Face((0, 0, 1, 1), 1.0, landmarks)], lambda crop: crop)
    before, after = (np.asarray(im, dtype=np.int16) for im in (image, out))
    square = square_in_picture(landmarks, before.shape[:2], grow=1)
    assert np.array_equal(before[~square], after[~square])  # outside the face square: untouched
    difference = np.abs(after - before)[square]
    assert difference.mean() < 2.0 and np.percentile(difference, 99) <= 8  # inside: two resamplings' worth


def test_an_aligned_face_changes_only_its_region_and_fades_in():
    image = draw_face(192)
    image.info["parameters"] = "kept"
    landmarks = moved(FFHQ_TEMPLATE, -20, 0.25, (50, 40))
    red = Image.new("RGB", (512, 512), (255, 0, 0))
    out = faces.restore_each(image, [Face((0, 0, 1, 1), 1.0, landmarks)], lambda crop: red)
    changed = np.any(np.asarray(image) != np.asarray(out), axis=-1)
    assert not changed[~square_in_picture(landmarks, changed.shape, grow=1)].any()
    inner = square_in_picture(landmarks, changed.shape, grow=-round(0.12 * 512 * 0.25) - 2)
    assert (np.asarray(out)[inner] == (255, 0, 0)).all()  # the restorer's face, past the feather band
    assert out.info["parameters"] == "kept"


# --- in the engine's face restoration ----------------------------------------------------------------

def face_restoration(root: Path) -> faces.FaceRestoration:
    folders = {kind: root / MODEL_KINDS[kind].folder for kind in MODEL_KINDS}
    describers = {kind: faces.describe_face_file for kind in faces.FACE_KINDS}
    registry = ModelRegistry(folders, HashCache(root / "hashes.json"), describers=describers)
    return faces.FaceRestoration(registry, folders)


def test_the_detector_file_in_models_gfpgan_finds_faces_with_landmarks(detector_file):
    root = detector_file.parent.parent
    write_tiny_restoreformer(root / "GFPGAN" / "RestoreFormer.safetensors")
    restoration = face_restoration(root)
    assert [r.name for r in restoration.restorers()] == ["RestoreFormer"]  # the detector is no restorer
    assert restoration.detector_file() == detector_file
    image = smooth_picture(64)
    warnings: list[str] = []
    found = restoration.find_faces(image, warnings)  # restoring them: the engine test below
    assert len(found) == 1 and found[0].landmarks is not None and warnings == []


def test_without_a_usable_detector_the_cascade_looks_and_the_warning_says_so(tmp_path):
    (tmp_path / "GFPGAN").mkdir()
    restoration = face_restoration(tmp_path)
    assert restoration.detector_file() is None
    warnings: list[str] = []
    found = restoration.find_faces(draw_face(192), warnings)
    assert len(found) == 1 and found[0].landmarks is None and warnings == []  # a face found: nothing to say
    restoration.find_faces(Image.new("RGB", (96, 96)), warnings)
    restoration.find_faces(Image.new("RGB", (96, 96)), warnings)
    assert len(warnings) == 1 and "Haar cascade finds frontal faces only" in warnings[0]
    assert "detection_Resnet50_Final.pth" in warnings[0]
    (tmp_path / "GFPGAN" / face_detect.RESNET50.file).write_bytes(b"not weights")
    warnings.clear()
    found = restoration.find_faces(draw_face(192), warnings)
    assert len(found) == 1 and found[0].landmarks is None  # the cascade stood in
    assert len(warnings) == 1 and warnings[0].startswith("restore_faces: detection_Resnet50_Final.pth: refused")


def test_the_engine_restores_the_faces_retinaface_finds(models_dir, detector_file, tmp_path):
    root = detector_file.parent.parent
    write_tiny_restoreformer(root / "GFPGAN" / "RestoreFormer.safetensors")
    engine = Engine(Paths(models_dir=root, ckpt_dir=models_dir / "Stable-diffusion", data_dir=tmp_path / "data",
                          outdir=tmp_path / "outputs"), EngineSettings(device="cpu", precision="full"))
    request = GenerationRequest(prompt="a portrait", steps=2, width=64, height=64, seed=5, sampler="Euler",
                                save_images=False, checkpoint="tiny.safetensors")
    plain = engine.generate(request).images[0]
    restored = engine.generate(request.replace(restore_faces=True))
    (face,) = face_detect.detect(face_detect.load_retinaface(detector_file), plain)
    changed = np.any(np.asarray(plain) != np.asarray(restored.images[0]), axis=-1)
    assert changed.mean() > 0.3 and not changed[~square_in_picture(face.landmarks, changed.shape, 1)].any()
    assert "Face restoration: RestoreFormer" in restored.infotexts[0]
    assert not restored.warnings
