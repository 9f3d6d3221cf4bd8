"""Face restoration (A1111's restore_faces): detection, restore and paste-back, the engine, the page and the API.

The restorer is a random-weight RestoreFormer built through spandrel's own architecture at a
reduced width and saved in A1111's models/GFPGAN folder, so it is found, listed, read and run by
the same code as a real GFPGANv1.4 / RestoreFormer file. Random weights draw nonsense, which is
enough to see where the picture changed: inside the widened face box, and nowhere else.
The tiny SD model draws noise, in which no face can be found, so the engine tests hand the
paste-back path a known face box (the detector is tested on a drawn face on its own).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from spandrel.architectures.RestoreFormer import RestoreFormer
from test_api import b64png, serve
from test_webui import fake_request, values

from pipelines.core.infotext import parse_infotext, request_fields_from_infotext
from pipelines.core.request import GenerationRequest, RequestError, UpscaleRequest
from pipelines.core.settings import EngineSettings, Paths
from pipelines.engine import Engine
from pipelines.generate import faces
from webui.api import ApiOptions, create_app
from webui.app import build_ui

FACE_BOX = (16, 16, 32, 32)  # left, top, width, height in a 64x64 picture


def write_tiny_restoreformer(path: Path, seed: int = 0) -> Path:
    """A RestoreFormer state dict at 32 channels (GroupNorm's 32 groups is the floor), six levels so
    its attention sees 16x16 tokens at 512x512 input, as the real one does."""
    torch.manual_seed(seed)
    model = RestoreFormer(n_embed=16, embed_dim=32, ch=32, out_ch=3, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1,
                          attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=512, z_channels=32,
                          double_z=False, enable_mid=True, head_size=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def draw_face(size: int = 192, background=(40, 90, 60)) -> Image.Image:
    """A cartoon face (skin oval, brows, dark eyes, nose, mouth) that OpenCV's frontal cascade finds."""
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    left, top, w, h = size * 0.25, size * 0.19, size * 0.5, size * 0.62
    at = lambda fx, fy: (left + w * fx, top + h * fy)  # a point in face coordinates
    d.ellipse((*at(0, 0), *at(1, 1)), fill=(225, 190, 160))
    d.rectangle((*at(0.18, 0.28), *at(0.42, 0.32)), fill=(60, 40, 30))
    d.rectangle((*at(0.58, 0.28), *at(0.82, 0.32)), fill=(60, 40, 30))
    d.ellipse((*at(0.22, 0.36), *at(0.40, 0.44)), fill=(30, 30, 30))
    d.ellipse((*at(0.60, 0.36), *at(0.78, 0.44)), fill=(30, 30, 30))
    d.polygon([at(0.5, 0.45), at(0.44, 0.62), at(0.56, 0.62)], fill=(200, 160, 130))
    d.ellipse((*at(0.35, 0.70), *at(0.65, 0.78)), fill=(150, 50, 50))
    return img


def changed_where(before: Image.Image, after: Image.Image) -> np.ndarray:
    return np.any(np.asarray(before, dtype=np.int16) != np.asarray(after, dtype=np.int16), axis=-1)


def inside(box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    left, top, right, bottom = box
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture(scope="module")
def face_models(models_dir, tmp_path_factory) -> Path:
    """A models folder with the tiny checkpoints and a tiny restorer in models/GFPGAN, beside
    facexlib's parser weights as A1111 keeps them (not a restorer: left out of the list)."""
    root = tmp_path_factory.mktemp("face_models")
    write_tiny_restoreformer(root / "GFPGAN" / "RestoreFormer.safetensors")
    (root / "GFPGAN" / "parsing_parsenet.pth").write_bytes(b"not a restorer")  # no detector: the cascade looks
    return root


@pytest.fixture(scope="module")
def face_engine(models_dir, face_models, tmp_path_factory) -> Engine:
    tmp = tmp_path_factory.mktemp("face_engine")
    return Engine(Paths(models_dir=face_models, ckpt_dir=models_dir / "Stable-diffusion", data_dir=tmp / "data",
                        outdir=tmp / "outputs"), EngineSettings(device="cpu", precision="full"))


@pytest.fixture
def known_face(monkeypatch):
    """The detector answers FACE_BOX for every picture (the tiny SD model draws no real face)."""
    monkeypatch.setattr(faces, "detect_faces", lambda image: [FACE_BOX])


def req(**fields) -> GenerationRequest:
    base = {"prompt": "a portrait", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler": "Euler",
            "save_images": False, "checkpoint": "tiny.safetensors"}
    return GenerationRequest(**{**base, **fields})


# --- finding and pasting faces ---------------------------------------------------------------

def test_the_bundled_cascade_finds_a_drawn_face_and_nothing_in_a_plain_picture():
    found = faces.detect_faces(draw_face(192))
    assert len(found) == 1
    x, y, w, h = found[0]
    assert abs((x + w / 2) - 96) < 16 and abs((y + h / 2) - 96) < 24 and 60 < w < 150
    assert faces.detect_faces(Image.new("RGB", (192, 192), (40, 90, 60))) == []


def test_crop_box_is_a_square_with_margin_kept_inside_the_picture():
    assert faces.crop_box((40, 40, 20, 20), (100, 100)) == (32, 32, 68, 68)  # 20 * (1 + 2 * 0.4)
    left, top, right, bottom = faces.crop_box((0, 0, 30, 30), (100, 80))  # at the corner: shifted in
    assert (left, top) == (0, 0) and right - left == bottom - top == 54
    assert faces.crop_box((0, 0, 90, 90), (100, 60)) == (15, 0, 75, 60)  # shrunk to the picture, centred


def test_restore_changes_the_face_region_only_with_a_feathered_edge(face_models):
    model = faces.load_face_model(face_models / "GFPGAN" / "RestoreFormer.safetensors")
    image = draw_face(192)
    image.info["parameters"] = "kept"
    restored, count = faces.restore(image, model)
    assert count == 1 and restored.size == image.size and restored.info["parameters"] == "kept"
    box = faces.crop_box(faces.detect_faces(image)[0], image.size)
    changed = changed_where(image, restored)
    assert not changed[~inside(box, changed.shape)].any()  # the rest is identical
    assert changed[inside(box, changed.shape)].mean() > 0.5  # the face is not
    # feathered: the box's border row is a blend, nearer the original than the centre is
    left, top, right, bottom = box
    before, after = (np.asarray(im, dtype=np.float32) for im in (image, restored))
    centre = np.abs(after - before)[(top + bottom) // 2, (left + right) // 2].mean()
    edge = np.abs(after - before)[top, left:right].mean()
    assert edge < centre or centre == 0
    mask = np.asarray(faces.feather_mask(100))
    assert mask[50, 50] == 255 and mask[0, 50] < 30 and mask[50, 0] < 30


# --- the engine ---------------------------------------------------------------------------------

def test_the_engine_lists_the_restorers_of_a1111s_folders(face_engine, face_models, engine):
    assert face_engine.face_restorers() == [{"name": "RestoreFormer", "cmd_dir": str(face_models / "GFPGAN")}]
    assert engine.face_restorers() == []  # the shared test models have none


def test_restore_faces_through_the_engine_changes_the_face_and_writes_the_infotext(face_engine, known_face):
    plain = face_engine.generate(req())
    restored = face_engine.generate(req(restore_faces=True))
    changed = changed_where(plain.images[0], restored.images[0])
    box = faces.crop_box(FACE_BOX, (64, 64))
    assert not changed[~inside(box, changed.shape)].any()
    assert changed[inside(box, changed.shape)].mean() > 0.5
    info = parse_infotext(restored.infotexts[0])
    assert info["Face restoration"] == "RestoreFormer" and "Face restoration" not in plain.infotexts[0]
    fields = request_fields_from_infotext(restored.infotexts[0])
    assert fields["restore_faces"] is True and fields["face_restorer"] == "RestoreFormer"
    assert request_fields_from_infotext(plain.infotexts[0])["restore_faces"] is False
    assert not restored.warnings


def test_a_picture_without_a_face_says_so(face_engine):
    result = face_engine.generate(req(restore_faces=True))  # the real detector: noise has no face
    assert "restore_faces: no face was found in the image" in result.warnings
    assert parse_infotext(result.infotexts[0])["Face restoration"] == "RestoreFormer"
    assert any("Haar cascade finds frontal faces only" in w for w in result.warnings)  # which detector looked, said


def test_no_restorer_or_an_unknown_one_is_a_clear_error(engine, face_engine):
    with pytest.raises(RequestError) as info:
        engine.generate(req(restore_faces=True))
    assert info.value.field == "restore_faces" and "GFPGAN" in info.value.message
    with pytest.raises(RequestError) as info:
        face_engine.generate(req(restore_faces=True, face_restorer="CodeFormer"))
    assert info.value.field == "face_restorer" and "RestoreFormer" in info.value.message
    with pytest.raises(RequestError) as info:
        req(code_former_weight=1.5)
    assert info.value.field == "code_former_weight"


# --- the page and the API ------------------------------------------------------------------------

def test_the_pages_restore_faces_checkbox_restores(face_engine, known_face):
    ui = build_ui(face_engine).webui
    assert ui.fields["txt2img"]["restore_faces"].label == "Restore faces"
    assert "RestoreFormer" in [c[0] for c in ui.fields["img2img"]["face_restorer"].choices]
    fields = values(ui, "txt2img", prompt="a portrait", steps=2, width=64, height=64, seed=5, sampler="Euler",
                    checkpoint="tiny.safetensors", restore_faces=True)
    images, infotext, _, _ = ui.generate("txt2img", fields, request=fake_request("faces"))
    assert "Face restoration: RestoreFormer" in str(infotext) and len(images) == 1


def test_the_page_without_a_restorer_shows_an_error_naming_the_field(engine):
    ui = build_ui(engine).webui
    fields = values(ui, "txt2img", prompt="x", steps=2, width=64, height=64, sampler="Euler",
                    checkpoint="tiny.safetensors", restore_faces=True)
    with pytest.raises(gr.Error, match=r"Restore faces \(restore_faces\)"):
        ui.generate("txt2img", fields, request=fake_request("faces"))


def test_the_api_restores_faces_lists_restorers_and_names_bad_fields(face_engine, engine, known_face):
    body = {"prompt": "a portrait", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "restore_faces": True}
    options = ApiOptions(sd_model_checkpoint="tiny.safetensors")
    with serve(create_app(face_engine, options=options)) as url:
        listed = requests.get(f"{url}/sdapi/v1/face-restorers", timeout=30).json()
        answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        plain = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "restore_faces": False}, timeout=120)
        unknown = requests.post(f"{url}/sdapi/v1/txt2img", timeout=30, json={
            **body, "override_settings": {"face_restoration_model": "CodeFormer"}})
        weight = requests.post(f"{url}/sdapi/v1/txt2img", timeout=30, json={
            **body, "override_settings": {"code_former_weight": 3}})
        # the face_restoration option restores faces for requests that leave restore_faces out
        requests.post(f"{url}/sdapi/v1/options", json={"face_restoration": True}, timeout=30)
        by_default = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "restore_faces": None}, timeout=120)
    assert listed == [{"name": "RestoreFormer", "cmd_dir": str(face_engine.paths.folder("gfpgan"))}]
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["restore_faces"] is True and info["face_restoration_model"] == "RestoreFormer"
    assert "Face restoration: RestoreFormer" in info["infotexts"][0]
    assert not any("restore_faces" in w for w in info["warnings"])
    assert answer.json()["images"][0] != plain.json()["images"][0]
    assert unknown.status_code == 422 and unknown.json()["field"] == "override_settings.face_restoration_model"
    assert weight.status_code == 422 and weight.json()["field"] == "override_settings.code_former_weight"
    assert by_default.status_code == 200 and json.loads(by_default.json()["info"])["restore_faces"] is True
    with serve(create_app(engine, options=options)) as url:
        missing = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=30)
    assert missing.status_code == 422 and missing.json()["field"] == "restore_faces"
    assert "models" in missing.json()["error"] and "GFPGAN" in missing.json()["error"]


# --- Extras (the Upscale tab and /extra-single-image) ---------------------------------------------

def test_extras_restore_faces_after_upscaling_blended_by_visibility(face_engine, engine):
    image = draw_face(192)
    box = faces.crop_box(faces.detect_faces(image)[0], image.size)
    full = face_engine.upscale(UpscaleRequest(image=image, scale=1.0, gfpgan_visibility=1.0, save_images=False))
    half = face_engine.upscale(UpscaleRequest(image=image, scale=1.0, gfpgan_visibility=0.5, save_images=False))
    changed = changed_where(image, full.images[0])
    assert not changed[~inside(box, changed.shape)].any() and changed[inside(box, changed.shape)].mean() > 0.5
    before, after, blended = (np.asarray(im, dtype=np.float32) for im in (image, full.images[0], half.images[0]))
    assert np.abs(blended - (before + after) / 2).max() <= 1.0  # half of each, up to rounding
    assert "GFPGAN visibility: 1" in full.infotexts[0]
    with pytest.raises(RequestError) as info:  # models/Codeformer is empty
        face_engine.upscale(UpscaleRequest(image=image, codeformer_visibility=0.5, save_images=False))
    assert info.value.field == "codeformer_visibility" and "Codeformer" in info.value.message
    with pytest.raises(RequestError) as info:
        engine.upscale(UpscaleRequest(image=image, gfpgan_visibility=0.5, save_images=False))
    assert info.value.field == "gfpgan_visibility"


def test_extras_faces_through_the_api_and_the_upscale_tab(face_engine):
    image = draw_face(128)
    with serve(create_app(face_engine, options=ApiOptions())) as url:
        answer = requests.post(f"{url}/sdapi/v1/extra-single-image", timeout=120, json={
            "image": b64png(image), "upscaler_1": "None", "gfpgan_visibility": 1})
        bad = requests.post(f"{url}/sdapi/v1/extra-single-image", timeout=30, json={
            "image": b64png(image), "upscaler_1": "None", "gfpgan_visibility": 2})
    assert answer.status_code == 200, answer.text
    restored = Image.open(io.BytesIO(base64.b64decode(answer.json()["image"])))
    assert restored.size == image.size and changed_where(image, restored.convert("RGB")).any()
    assert "GFPGAN visibility" in answer.json()["html_info"]
    assert bad.status_code == 422 and bad.json()["field"] == "gfpgan_visibility"
    ui = build_ui(face_engine).webui
    images, info = ui.upscale(image=image, upscaler="Lanczos", upscale_mode="Scale by", scale=1,
                              gfpgan_visibility=1.0)
    assert "GFPGAN visibility: 1" in info and len(images) == 1


class _Recorder(torch.nn.Module):
    """Stands in for GFPGAN / CodeFormer's network (410 MB / 375 MB at their only size): returns its
    input, and records the range it was given and the keyword arguments."""

    def forward(self, x, **kwargs):
        self.seen = (float(x.min()), float(x.max()), kwargs)
        return x, None


@pytest.mark.parametrize("arch, expected", [("GFPGAN", {"return_rgb": False}), ("CodeFormer", {"weight": 0.3})])
def test_gfpgan_and_codeformer_get_minus_one_to_one_and_codeformer_its_weight(arch, expected):
    from types import SimpleNamespace

    net = _Recorder()
    model = SimpleNamespace(model=net, architecture=SimpleNamespace(name=arch), device=torch.device("cpu"),
                            dtype=torch.float32)
    face = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (512, 2))[:, :512, None].repeat(3, axis=2))
    out = faces.run_model(model, face, code_former_weight=0.3)
    low, high, kwargs = net.seen
    assert low == -1.0 and high == 1.0 and kwargs == expected
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(face, dtype=np.int16)).max() <= 1
